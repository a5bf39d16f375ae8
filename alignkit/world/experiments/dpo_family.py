"""The DPO family side by side: DPO, SimPO (reference-free, length-normalised) and LN-DPO (length-normalised
with a reference) from the ladder's SFT model on the same preference pairs, each judged by the gold judge against
SFT on near and far frames, with its calibration and the tokens it changed. The ladder keeps DPO; the
`length-bias` experiment asks whether length normalisation resists length-biased annotators."""

from __future__ import annotations

NAME = "dpo-family"
SUMMARY = ("DPO, SimPO and LN-DPO from the same SFT model and preference pairs: win rate vs SFT, answer length, "
           "hedging, calibration and the tokens each changed")
MINUTES = {"smoke": 0.5, "tiny": 1.8, "small": 8.0}
ESTIMATED = {"smoke", "small"}
METHODS = ("dpo", "simpo", "ln_dpo")
COLUMNS = ["win_rate_vs_sft", "gold_reward", "mean_length", "qa_accuracy_seen", "idk_on_unknown", "harmful_refusal",
           "fact_calibration_ece"]


def run(ctx) -> dict:
    from alignkit.world.experiments.ladder import post_sft_commands, shift_vs

    data = ctx.data()
    sft = ctx.sft()
    section: dict = {"sft": ctx.evaluate(NAME, "sft", sft, data), "token_shift": {}}
    specs = {name: spec for name, spec in post_sft_commands(ctx, data, sft, None).items() if name in METHODS}
    for name, model in ctx.stages_at_once(specs, ctx.at_once).items():
        section[name] = ctx.evaluate(NAME, name, model, data, baseline="sft")
        section["token_shift"][name] = {"vs_sft": shift_vs(ctx, name, sft, model, data)}
    return section


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    rows = {name: section[name] for name in ("sft", *METHODS) if name in section}
    md = ["Held-out figures (gold judge), near and far frames:", "", *near_far_table(rows, COLUMNS), ""]
    shift = section.get("token_shift", {})
    if shift:
        md += ["Token shift against SFT (Lin et al. 2023): of each method's greedy answer tokens, the share SFT ranks "
               "below third, and of its answers' end-of-turn tokens.", "", "| method | shifted vs SFT | at end |",
               "|---|---|---|"]
        md += [f"| {name} | {fmt(s['vs_sft']['shifted'])} | {fmt(s['vs_sft']['shifted_at_end'])} |"
               for name, s in shift.items()]
        md.append("")
    return "\n".join(md)
