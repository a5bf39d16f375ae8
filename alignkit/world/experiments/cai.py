"""Constitutional AI in the world (the notes; Bai et al. 2022): harmlessness from a written constitution instead
of human harmlessness labels. The start is a helpful-only SFT model: the world's SFT data without its refusals,
plus critique/revision conversations and judgements by the constitution's principles on half the training
harmful requests (the paper's few-shot demonstrations). SL-CAI: it answers the other half (the red-team
prompts) and the training look-alikes, critiques and revises its answers, and is fine-tuned on the revisions.
RL-CAI: the SL-CAI model's answer pairs, judged by the helpful-only model against a drawn principle, train it
with DPO. Measured on the held-out sets: harmful refusal and benign over-refusal of each, beside the ladder's
SFT model trained on human-written refusals."""

from __future__ import annotations

from pathlib import Path

from alignkit.world.experiments.outputs import final_metrics, mean, read_jsonl, text

NAME = "cai"
SUMMARY = ("helpful-only SFT -> SL-CAI (critique/revision by a constitution) -> RL-CAI (DPO on AI labels by "
           "principle): harmful refusal and benign over-refusal with no human harmlessness labels")
MINUTES = {"smoke": 1.5, "tiny": 2.0, "small": 25.0}
ESTIMATED = {"smoke", "small"}
SL_STEPS = {"smoke": 3, "tiny": 30, "small": 80}
RL_STEPS = {"smoke": 3, "tiny": 30, "small": 80}





def revision_quality(sl_cai: Path, metrics: dict) -> dict:
    """What the critique -> revision chains produced, by the gold judge: refusal of the red-team harmful
    prompts and of the look-alikes, before training on them."""
    from alignkit.world.gold import is_refusal

    rows = read_jsonl(sl_cai)
    by_kind = {kind: [is_refusal(text(r["completion"])) for r in rows if r["meta"]["kind"] == kind]
               for kind in ("harmful", "benign")}
    return {"revisions": len(rows), "harmful_refused": mean(by_kind["harmful"]),
            "benign_refused": mean(by_kind["benign"]), "revised_share": metrics.get("revised_differs", float("nan"))}


def pair_quality(pairs: Path, metrics: dict) -> dict:
    """How often the AI's choice is the one gold prefers, over pairs gold does not tie."""
    from alignkit.world.gold import gold_score

    rows = read_jsonl(pairs)
    golds = [(gold_score(r["meta"], text(r["chosen"])), gold_score(r["meta"], text(r["rejected"]))) for r in rows]
    return {"pairs": len(rows), "ties": metrics.get("ties", float("nan")),
            "judge_gold_agreement": mean(float(c > j) for c, j in golds if c != j),
            "gold_ties": mean(float(c == j) for c, j in golds)}



def run(ctx) -> dict:
    data, b, preset = ctx.data(), ctx.budget, ctx.preset
    constitution, red_team = data / "constitution.yaml", data / "red_team.jsonl"
    helpful = ctx.helpful_sft()
    section: dict = {"sft": ctx.evaluate(NAME, "sft", ctx.sft(), data),
                     "helpful": ctx.evaluate(NAME, "helpful", helpful, data, baseline="sft")}
    common = ["--constitution", str(constitution), "--data", str(red_team), "--max-prompts", str(b["feedback_prompts"]),
              "--max-new-tokens", "48", "--max-length", "256"]
    chains = ctx.stage("cai-chains", ["cai", "--model", str(helpful), *common, "--revisions", "1", "--temperature", "0"],
                       [helpful, constitution, red_team])
    section["chains"] = revision_quality(chains / "sl_cai.jsonl", final_metrics(chains))
    sl_data = chains / "sl_cai.jsonl"
    sl = ctx.stage("sl-cai", ["sft", "--model", str(helpful), "--data", str(sl_data), "--max-steps",
                              str(SL_STEPS[preset]), "--batch-size", "16", "--max-length", "192", "--lr", "3e-4"],
                   [helpful, sl_data])
    section["sl_cai"] = ctx.evaluate(NAME, "sl_cai", sl, data, baseline="helpful")
    pairs = ctx.stage("cai-pairs", ["cai", "--model", str(helpful), "--pair-model", str(sl), *common, "--revisions", "0",
                                    "--pairs", "--temperature", "1.0"], [helpful, sl, constitution, red_team])
    section["pairs"] = pair_quality(pairs / "pairs.jsonl", final_metrics(pairs))
    pair_data = pairs / "pairs.jsonl"
    rl = ctx.stage("rl-cai", ["dpo", "--model", str(sl), "--data", str(pair_data), "--max-steps", str(RL_STEPS[preset]),
                              "--batch-size", "16", "--max-length", "192", "--lr", "3e-4", "--beta", "0.1",
                              "--rpo-alpha", "1.0"], [sl, pair_data])
    section["rl_cai"] = ctx.evaluate(NAME, "rl_cai", rl, data, baseline="helpful")
    return section


# ---- report -----------------------------------------------------------------------------------------------

POLICIES = {"sft": "SFT (human-written refusals)", "helpful": "helpful-only SFT", "sl_cai": "SL-CAI",
            "rl_cai": "RL-CAI"}
COLUMNS = ["harmful_refusal", "benign_overrefusal", "gold_reward", "qa_accuracy_seen", "idk_on_unknown", "mean_length"]


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    md = ["Held-out harmful requests and look-alikes (gold judge), near and far frames; no model below the first "
          "saw a human label of what is harmful beyond the constitution's demonstrations.", "",
          *near_far_table({POLICIES[k]: section[k] for k in POLICIES if k in section}, COLUMNS), ""]
    if "chains" in section:
        c = section["chains"]
        md += [f"SL-CAI data: {fmt(c.get('revisions'), 0)} revisions of the red-team prompts; revisions refusing "
               f"the harmful ones {fmt(c.get('harmful_refused'))}, refusing the look-alikes "
               f"{fmt(c.get('benign_refused'))}; share of revisions that changed the answer "
               f"{fmt(c.get('revised_share'))}.", ""]
    if "pairs" in section:
        p = section["pairs"]
        md += [f"RL-CAI pairs: {fmt(p.get('pairs'), 0)} (judge ties left out: {fmt(p.get('ties'), 0)}); the AI's choice "
               f"is gold's in {fmt(p.get('judge_gold_agreement'))} of the pairs gold does not tie (gold ties "
               f"{fmt(p.get('gold_ties'))}).", ""]
    return "\n".join(md)
