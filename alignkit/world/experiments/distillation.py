"""Distillation from a stronger model (the notes: Alpaca, Vicuna and s1 distil a stronger model cheaply; DeepSeek-R1
distils an RL-trained reasoner into small models). The teacher has the larger budget: the ladder's GRPO model (SFT,
then RL with a verifier on word problems, which finds the worked style of answer). The student starts from the
base model and gets the SFT step budget four ways: SFT on the human demonstrations (the ladder's SFT),
sequence-level distillation (Kim & Rush 2016: SFT on the teacher's greedy answers to the same prompts, `alignkit
generate` then `alignkit sft`), token-level distillation on the teacher's next-token distributions over the human
demonstrations (`alignkit distill`, forward KL, Hinton et al. 2015), and GKD (Agarwal et al. 2024: generalised JSD,
half the steps on the student's own samples). Held out by the gold judge, with win rates against the SFT student."""

from __future__ import annotations

import shlex
from pathlib import Path

from alignkit.world.experiments import sft_data
from alignkit.world.experiments.outputs import mean, read_jsonl, text

NAME = "distillation"
SUMMARY = ("a teacher with a larger budget; student by SFT on human demos vs sequence-level vs token-level "
           "distillation at equal student steps: gold reward, accuracy, win rate")
MINUTES = {"smoke": 2.0, "tiny": 2.4, "small": 45.0}
ESTIMATED = {"smoke", "small"}


def teacher(ctx, data: Path) -> Path:
    """The ladder's GRPO stage (the same command, so a ladder run of this seed has it cached)."""
    from alignkit.world.experiments.ladder import post_sft_commands

    command, inputs = post_sft_commands(ctx, data, ctx.sft(), None)["grpo"]
    return ctx.stage("grpo", command, inputs)


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
    section["kl_teacher_student"] = {}
    for name, flags in (("token_kd", ["--loss", "forward_kl"]),
                        ("gkd", ["--loss", "jsd", "--beta", "0.5", "--on-policy-fraction", "0.5", "--max-new-tokens",
                                 "64"])):
        student = ctx.stage(name.replace("_", "-"), ["distill", "--teacher", str(big), "--model", str(base), "--data",
                                                     str(demos), *flags, "--max-steps", str(steps), "--batch-size", "16",
                                                     "--max-length", "192", "--lr", "1e-3"], [big, base, demos])
        section[name] = ctx.evaluate(NAME, name, student, data, baseline="sft")
        kl = [r["kl_teacher_student"] for r in read_jsonl(student / "metrics.jsonl")
              if not r.get("final") and "kl_teacher_student" in r]
        section["kl_teacher_student"][name] = {"first": kl[0] if kl else float("nan"),
                                               "last": kl[-1] if kl else float("nan")}
    return section


# ---- report -----------------------------------------------------------------------------------------------

STUDENTS = {"teacher": "teacher (SFT, then GRPO)", "sft": "student: SFT on human demos",
            "seq_kd": "student: sequence-level KD", "token_kd": "student: token-level KD (forward KL)",
            "gkd": "student: GKD (JSD, half on-policy)"}
COLUMNS = ["win_rate_vs_sft", "gold_reward", "qa_accuracy_seen", "qa_accuracy_unseen_multi", "arith_accuracy",
           "harmful_refusal", "benign_overrefusal", "eos_rate"]


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    kl = section.get("kl_teacher_student", {})
    md = ["Students from the same base model at the same SFT step budget; the teacher is SFT followed by GRPO on word "
          "problems. Held out by the gold judge; win rates against the SFT student on the same prompts.", "",
          *near_far_table({v: section[k] for k, v in STUDENTS.items() if k in section}, COLUMNS), "",
          f"Teacher answers used for sequence-level KD: {fmt(section.get('teacher_answers', {}).get('records'), 0)} "
          f"(mean {fmt(section.get('teacher_answers', {}).get('mean_words'), 1)} words). KL(teacher || student) per "
          "trained token, first -> last step: " + "; ".join(f"{k} {fmt(v.get('first'))} -> {fmt(v.get('last'))}"
                                                            for k, v in kl.items()) + ".", ""]
    return "\n".join(md)
