"""Fine-tuning on facts the model does not know (the notes, after Schulman's behaviour-cloning argument and
Gekhman et al. 2024): SFT variants of equal size whose fact demonstrations are about people the base model
knows (several bio phrasings in pretraining, seen half) or about people no pretraining text mentions, in
shares 0 / 25 / 50 / 100%; everything else in the SFT data is the world's. Held out: accuracy on known
people SFT never asked about, confident wrong answers vs "I don't know" there and on people who do not
exist; and, per epoch, how well the known and the absent training facts are fitted."""

from __future__ import annotations

import math
from pathlib import Path

from alignkit.world.experiments import sft_data

NAME = "unknown-facts"
SUMMARY = ("SFT whose fact questions are 0-100% about people absent from pretraining: held-out accuracy, "
           "made-up answers, and known vs unknown facts fitted per epoch")
MINUTES = {"smoke": 1.5, "tiny": 2.0, "small": 40.0}
ESTIMATED = {"smoke", "small"}
SHARES = (0.0, 0.25, 0.5, 1.0)
STEPS = {"smoke": 6, "tiny": 400, "small": 1200}
FRAMES = 8  # trained frames per fact, as the world's SFT asks each seen fact
FIT_SAMPLE = 48  # training demonstrations of each kind whose fit is measured at every epoch
HELD_OUT = ("qa_unseen_multi", "qa_unseen_single", "unknown")


def label(share: float) -> str:
    return f"absent_{round(100 * share)}"


def variants(ctx, data: Path) -> dict[str, tuple[Path, list[dict], list[dict]]]:
    """label -> (SFT file, its known-fact demonstrations, its absent-fact demonstrations)."""
    world = sft_data.world_of(data)
    groups = sft_data.by_kind(data)
    rest = [r for k in ("arith", "harmful", "benign", "idk") for r in groups[k]]
    known = [p for p in world.people if p.seen and p.bio_style == "multi"]
    absent = sft_data.absent_people(data, len(known), ctx.seed)
    out = {}
    for share in SHARES:
        n_absent = round(share * len(known))
        known_demos = sft_data.fact_demos(known[:len(known) - n_absent], FRAMES, ctx.seed)
        absent_demos = sft_data.fact_demos(absent[:n_absent], FRAMES, ctx.seed + 1)
        rows = sft_data.shuffled(rest + known_demos + absent_demos, ctx.seed)
        out[label(share)] = (ctx.derived(NAME, f"{label(share)}.jsonl", rows), known_demos, absent_demos)
    return out


def fit_per_epoch(run: Path, n_records: int, known: list[dict], absent: list[dict], ctx, data: Path) -> dict:
    """Training-fact accuracy (known and absent) and held-out figures at every saved epoch."""
    from alignkit.world.evaluate import answer_all, prompt_rows, score

    sample_known, sample_absent = known[::max(1, len(known) // FIT_SAMPLE)], absent[::max(1, len(absent) // FIT_SAMPLE)]
    sets = {name: ctx.sets(data)[name] for name in HELD_OUT}
    per_epoch = math.ceil(n_records / 16)
    out: dict = {"epoch": [], "known_fit": [], "absent_fit": [], "qa_accuracy_unseen_multi": [],
                 "made_up_on_unknown": [], "wrong_fact_unseen": []}
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        step = int(ckpt.name.removeprefix("step-"))
        held = score(prompt_rows(sets, answer_all(ckpt, sets)))["far"]
        out["epoch"].append(step / per_epoch)
        out["known_fit"].append(sft_data.answer_accuracy(ckpt, sample_known))
        out["absent_fit"].append(sft_data.answer_accuracy(ckpt, sample_absent))
        for key in ("qa_accuracy_unseen_multi", "made_up_on_unknown", "wrong_fact_unseen"):
            out[key].append(held[key])
    return out


def run(ctx) -> dict:
    data, base = ctx.data(), ctx.base()
    steps = STEPS[ctx.preset]
    section: dict = {"fit": {}}
    for name, (path, known, absent) in variants(ctx, data).items():
        n = len(sft_data.read_jsonl(path))
        model = sft_data.sft(ctx, f"sft-{name}", base, path, steps,
                             ["--save-every", str(math.ceil(n / 16)), "--save-total-limit", "0"])
        section[name] = ctx.evaluate(NAME, name, model, data, sets=HELD_OUT)
        section["fit"][name] = ctx.time(f"fit {name}", fit_per_epoch, model, n, known, absent, ctx, data)
    return section


# ---- report -----------------------------------------------------------------------------------------------

COLUMNS = ["qa_accuracy_unseen_multi", "qa_accuracy_unseen_single", "wrong_fact_unseen", "idk_unseen",
           "made_up_on_unknown", "idk_on_unknown"]


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    names = [label(s) for s in SHARES if label(s) in section]
    md = ["SFT variants of equal size; `absent_N`: N% of the fact demonstrations are about people no pretraining text "
          "mentions (the rest about known people). Held out, by the gold judge: people in pretraining that SFT never "
          "asked about (unseen, multi- and single-phrased bios) and people who do not exist (unknown).", "",
          *near_far_table({n: section[n] for n in names}, COLUMNS), "",
          "Per saved epoch (far frames for the held-out figures): accuracy on the training facts about known and "
          "about absent people, held-out accuracy on known people, made-up answers about people who do not exist.", "",
          "| variant | epoch | known facts fitted | absent facts fitted | held-out accuracy (unseen multi) "
          "| made up (unknown) | wrong fact (unseen) |", "|---|---|---|---|---|---|---|"]
    for n in names:
        fit = section.get("fit", {}).get(n, {})
        for i, epoch in enumerate(fit.get("epoch", [])):
            cells = [fmt(fit[k][i]) if i < len(fit.get(k, [])) else "" for k in
                     ("known_fit", "absent_fit", "qa_accuracy_unseen_multi", "made_up_on_unknown", "wrong_fact_unseen")]
            md.append(f"| {n} | {fmt(epoch, 2)} | " + " | ".join(cells) + " |")
    return "\n".join(md + [""])
