"""Distillation from a stronger model (the notes: Alpaca, Vicuna and s1 distil a stronger model cheaply). The
teacher is the world's model with a larger budget: the base model pretrained further, then SFT. The student
starts from the ordinary base model and gets equal student compute (the SFT step budget) three ways: SFT on
the human demonstrations (the ladder's SFT), sequence-level distillation (Kim & Rush 2016: SFT on the
teacher's greedy answers to the same prompts, `alignkit generate` then `alignkit sft`), and token-level
distillation on the teacher's next-token distributions over the human demonstrations (`alignkit distill`,
forward KL, Hinton et al. 2015). Held out by the gold judge, with win rates against the SFT student."""

from __future__ import annotations

import shlex
from pathlib import Path

from alignkit.world.experiments import sft_data
from alignkit.world.experiments.outputs import mean, read_jsonl, text

NAME = "distillation"
SUMMARY = ("a teacher with a larger budget; student by SFT on human demos vs sequence-level vs token-level "
           "distillation at equal student steps: gold reward, accuracy, win rate")
MINUTES = {"smoke": 2.0, "tiny": 8.0, "small": 45.0}
ESTIMATED = {"smoke", "tiny", "small"}
TEACHER_PRETRAIN = {"smoke": 5, "tiny": 250, "small": 4000}  # pretraining steps beyond the base model's
TEACHER_SFT = {"smoke": 10, "tiny": 400, "small": 1200}


def teacher(ctx, data: Path) -> Path:
    base, corpus, demos = ctx.base(), data / "corpus.jsonl", data / "sft.jsonl"
    more = ctx.stage("teacher-pretrain", ["pretrain", "--model", str(base), "--data", str(corpus), "--max-steps",
                                          str(TEACHER_PRETRAIN[ctx.preset]), "--batch-size", "16", "--max-length",
                                          "128", "--lr", "1e-3", "--warmup-steps", "20"], [base, corpus])
    return sft_data.sft(ctx, "teacher-sft", more, demos, TEACHER_SFT[ctx.preset])


def teacher_answers(ctx, model: Path, data: Path) -> Path:
    """The teacher's greedy answers to the SFT demonstrations' prompts, as SFT data (`alignkit generate`)."""
    from alignkit.cli import run as alignkit

    prompts = ctx.derived(NAME, "prompts.jsonl", [{"prompt": r["messages"][:-1]}
                                                 for r in read_jsonl(data / "sft.jsonl")])
    out = ctx.out / "derived" / NAME / f"teacher-answers-{ctx.key([str(model)], [model, prompts])[:12]}.jsonl"
    argv = ["generate", "--model", str(model), "--data", str(prompts), "--output", str(out),
            "--max-new-tokens", "48", "--batch-size", "64"]
    line = "alignkit " + shlex.join(argv)
    ctx.commands.append(line + (" (cached)" if out.is_file() else ""))
    if not out.is_file():
        print(f"\n== teacher-answers: {line}", flush=True)
        tmp = out.with_name(f".{out.name}")
        tmp.unlink(missing_ok=True)  # a killed run's partial answers
        argv[argv.index(str(out))] = str(tmp)
        ctx.time("teacher-answers", alignkit, argv)
        tmp.rename(out)
    return out


def run(ctx) -> dict:
    data, base, steps = ctx.data(), ctx.base(), ctx.budget["sft_steps"]
    demos = data / "sft.jsonl"
    section: dict = {"sft": ctx.evaluate(NAME, "sft", ctx.sft(), data)}
    big = teacher(ctx, data)
    section["teacher"] = ctx.evaluate(NAME, "teacher", big, data, baseline="sft")
    answers = teacher_answers(ctx, big, data)
    rows = read_jsonl(answers)
    section["teacher_answers"] = {"records": len(rows),
                                  "mean_words": mean(len(text(r["completion"]).split()) for r in rows)}
    seq = sft_data.sft(ctx, "seq-kd", base, answers, steps)
    section["seq_kd"] = ctx.evaluate(NAME, "seq_kd", seq, data, baseline="sft")
    tok = ctx.stage("token-kd", ["distill", "--teacher", str(big), "--model", str(base), "--data", str(demos),
                                 "--loss", "forward_kl", "--max-steps", str(steps), "--batch-size", "16",
                                 "--max-length", "192", "--lr", "1e-3"], [big, base, demos])
    section["token_kd"] = ctx.evaluate(NAME, "token_kd", tok, data, baseline="sft")
    kl = [r.get("kl_teacher_student") for r in read_jsonl(tok / "metrics.jsonl") if not r.get("final")]
    kl = [x for x in kl if x is not None]
    section["token_kd_kl"] = {"first": kl[0] if kl else float("nan"), "last": kl[-1] if kl else float("nan")}
    return section


# ---- report -----------------------------------------------------------------------------------------------

STUDENTS = {"teacher": "teacher (more pretraining, SFT)", "sft": "student: SFT on human demos",
            "seq_kd": "student: sequence-level KD", "token_kd": "student: token-level KD (forward KL)"}
COLUMNS = ["win_rate_vs_sft", "gold_reward", "qa_accuracy_seen", "qa_accuracy_unseen_multi", "arith_accuracy",
           "harmful_refusal", "benign_overrefusal", "eos_rate"]


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    kl = section.get("token_kd_kl", {})
    md = ["Students from the same base model at the same SFT step budget; the teacher had more pretraining. Held "
          "out by the gold judge; win rates against the SFT student on the same prompts.", "",
          *near_far_table({v: section[k] for k, v in STUDENTS.items() if k in section}, COLUMNS), "",
          f"Teacher answers used for sequence-level KD: {fmt(section.get('teacher_answers', {}).get('records'), 0)} "
          f"(mean {fmt(section.get('teacher_answers', {}).get('mean_words'), 1)} words). Token-level KD's "
          f"KL(teacher || student) per token: {fmt(kl.get('first'))} at the first step, {fmt(kl.get('last'))} at "
          "the last.", ""]
    return "\n".join(md)
