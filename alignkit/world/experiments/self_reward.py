"""Self-rewarding in the world (the notes: a model can judge its own answers and train on its own judgement,
since judging is easier than generating; Yuan et al. 2024). From the SFT model that also learnt to judge (SFT
with judgement demonstrations, `Context.judge_sft`, Yuan et al.'s IFT + EFT), three iterations of: sample 4
answers per training prompt, score them with the policy's own pointwise judgement, DPO on best vs worst. Per
iteration: the gold win rate against the starting model, how often the self-judge ranks two answers as gold
does, mean length and the garbled-answer rate (the loop amplifying its early errors, if it does)."""

from __future__ import annotations

from pathlib import Path

from alignkit.eval.metrics import garbled
from alignkit.world.experiments.outputs import mean, read_jsonl

NAME = "self-reward"
SUMMARY = ("3 self-rewarding iterations from SFT + judgement demos: gold win rate, the self-judge's agreement "
           "with gold, length and garbled answers per iteration")
MINUTES = {"smoke": 1.5, "tiny": 3.0, "small": 30.0}
ESTIMATED = {"smoke", "small"}
ITERATIONS = 3
GROUP = 4
DPO_STEPS = {"smoke": 2, "tiny": 25, "small": 80}


def judging(samples: Path) -> dict:
    """The self-judge against gold on its own samples: how often its scores order two answers to a prompt as
    gold does (gold ties left out, equal scores half), and the gold of what it chose vs rejected."""
    from alignkit.world.gold import gold_score

    agree, margin = [], []
    for rec in read_jsonl(samples):
        golds = [gold_score(rec["meta"], t.strip(), e) for t, e in zip(rec["completions"], rec["ended"])]
        s = rec["scores"]
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                if golds[i] != golds[j]:
                    agree.append(0.5 if s[i] == s[j] else float((s[i] > s[j]) == (golds[i] > golds[j])))
        best, worst = max(range(len(s)), key=lambda i: s[i]), min(range(len(s)), key=lambda i: s[i])
        margin.append(golds[best] - golds[worst])
    return {"self_judge_gold_agreement": mean(agree), "gold_best_minus_worst": mean(margin)}


def garbled_rate(rows: list[dict]) -> dict:
    return {d: mean(float(garbled(r["text"], r["ended"])) for r in rows if r["distance"] == d) for d in ("near", "far")}


def run(ctx) -> dict:
    data, b = ctx.data(), ctx.budget
    start, prompts = ctx.judge_sft(), data / "rl_prompts.jsonl"
    section: dict = {"judge_sft": ctx.evaluate(NAME, "judge_sft", start, data), "iterations": {}}
    loop = ctx.stage("self-reward", [
        "self-reward", "--model", str(start), "--data", str(prompts), "--iterations", str(ITERATIONS),
        "--max-prompts", str(b["feedback_prompts"]), "--group-size", str(GROUP), "--max-new-tokens", "48",
        "--max-length", "192", "--temperature", "1.0", "--dpo.max-steps", str(DPO_STEPS[ctx.preset]),
        "--dpo.batch-size", "16", "--dpo.lr", "3e-4", "--dpo.beta", "0.1", "--dpo.rpo-alpha", "1.0",
        # the smoke models never stop: let their cut answers pair so the pipeline still runs
        *(["--keep-truncated"] if ctx.preset == "smoke" else [])], [start, prompts])
    metrics = [r for r in read_jsonl(loop / "metrics.jsonl") if not r.get("final")]
    section["garbled"] = {"judge_sft": garbled_rate(ctx.rows(NAME, "judge_sft"))}
    for k in range(1, ITERATIONS + 1):
        label = f"iter{k}"
        section[label] = ctx.evaluate(NAME, label, loop / f"iter-{k}" / "dpo", data, baseline="judge_sft")
        section["garbled"][label] = garbled_rate(ctx.rows(NAME, label))
        row = next((r for r in metrics if r["step"] == k), {})
        section["iterations"][label] = {**judging(loop / f"iter-{k}" / "samples.jsonl"),
                                        **{key: row.get(key, float("nan")) for key in
                                           ("score_mean", "pairs", "ties", "truncated", "length_words", "label_mass")}}
    return section


# ---- report -----------------------------------------------------------------------------------------------

COLUMNS = ["win_rate_vs_judge_sft", "gold_reward", "mean_length", "eos_rate", "qa_accuracy_seen", "harmful_refusal"]


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    labels = ["judge_sft"] + [f"iter{k}" for k in range(1, ITERATIONS + 1)]
    md = ["Each iteration from the last: 4 samples per training prompt scored by the policy's own pointwise "
          "judgement, DPO on best vs worst. Held-out figures by the gold judge, against the starting model.", "",
          *near_far_table({k: section[k] for k in labels if k in section}, COLUMNS), "",
          "| iteration | self-judge agrees with gold (its samples) | gold of best minus worst | mean self-score | pairs "
          "| garbled, near | garbled, far |", "|---|---|---|---|---|---|---|"]
    for k in labels:
        it, g = section.get("iterations", {}).get(k, {}), section.get("garbled", {}).get(k, {})
        md.append(f"| {k} | {fmt(it.get('self_judge_gold_agreement'))} | {fmt(it.get('gold_best_minus_worst'))} | "
                  f"{fmt(it.get('score_mean'))} | {fmt(it.get('pairs'), 0)} | {fmt(g.get('near'))} | {fmt(g.get('far'))} |")
    return "\n".join(md + [""])
