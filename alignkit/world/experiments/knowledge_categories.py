"""What the base model knows, by SliCK category (Gekhman et al. 2024; the notes): `alignkit probe-knowledge` on
every fact of the world's people, few-shot in plain text; the category shares by how each person's bio
appeared in pretraining (three phrasings vs one: Allen-Zhu & Li's extractability); then SFT on each
category's facts alone, at equal size, with the rest of the world's SFT data, and held-out accuracy on
people SFT never asked about, overall and by the held-out question's own category (the notes: MaybeKnown
examples help most, Unknown ones teach made-up answers)."""

from __future__ import annotations

import random
from pathlib import Path

from alignkit.world.experiments import sft_data
from alignkit.world.experiments.outputs import mean, read_jsonl

NAME = "knowledge-categories"
SUMMARY = ("probe-knowledge's SliCK categories of the base model by bio phrasing; SFT on each category alone: "
           "held-out accuracy and made-up answers")
MINUTES = {"smoke": 1.5, "tiny": 2.1, "small": 40.0}
ESTIMATED = {"smoke", "small"}
CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
STEPS = {"smoke": 4, "tiny": 400, "small": 1200}
FRAMES = 8
MIN_QUESTIONS = {"smoke": 1, "tiny": 8, "small": 20}  # a category with fewer seen questions gets no SFT run
MAX_QUESTIONS = 40
HELD_OUT = ("qa_unseen_multi", "qa_unseen_single", "unknown")
PROBE = ["--variants", "4", "--shots", "4", "--samples", "4", "--temperature", "0.5", "--max-new-tokens", "16",
         "--match", "contains"]


def probe_files(ctx, data: Path) -> dict[str, Path]:
    """Every world fact twice: as a question (a trained frame, unwrapped) with its answer sentence, for the
    "Q: / A:" probe, and as a statement to complete in the bios' own words ("Ada Brook lives in") for the
    cloze probe; both with the value as the reference."""
    from alignkit.world.build import ATTRS, assistant, fact_prompt, user
    from alignkit.world.facts import ANSWERS
    from alignkit.world.frames import FACT_FRAMES, trained

    rng, frames = random.Random(ctx.seed + 23), trained(FACT_FRAMES)
    qa, cloze = [], []
    for p in sft_data.world_of(data).people:
        for attr in ATTRS:
            q, meta = fact_prompt(p, attr, rng.choice(frames), rng, False)
            meta = {**meta, "bio_style": p.bio_style, "seen": p.seen}
            value = getattr(p, attr)
            qa.append({"messages": user(q) + assistant(ANSWERS[attr].format(**vars(p))), "answer": value, "meta": meta})
            stem = ANSWERS[attr].split("{" + attr + "}")[0].format(name=p.name).strip()
            cloze.append({"prompt": stem, "completion": f"{value}.", "answer": value, "meta": meta})
    return {"plain": ctx.derived(NAME, "probe_qa.jsonl", qa), "cloze": ctx.derived(NAME, "probe_cloze.jsonl", cloze)}


def shares(rows: list[dict], keep=lambda r: True) -> dict:
    chosen = [r for r in rows if keep(r)]
    return {c: mean(float(r["category"] == c) for r in chosen) for c in CATEGORIES}


def heldout_by_category(ctx, name: str, probed: dict) -> dict:
    """Held-out accuracy and made-up answers on the unseen people's questions, by each question's category."""
    sets, rows = ctx.sets(ctx.data()), ctx.rows(NAME, name)
    items = [it for s in HELD_OUT if s != "unknown" for it in sets[s]]
    facts = [r for r in rows if r["set"] != "unknown"]
    out = {}
    for c in CATEGORIES:
        picked = [r for it, r in zip(items, facts) if probed.get((it["meta"]["name"], it["meta"]["attr"])) == c]
        out[c] = {"accuracy": mean(float(r["correct"] == 1.0) for r in picked),
                  "made_up": mean(float(r["correct"] == 0.0) for r in picked), "questions": len(picked)}
    return out


def run(ctx) -> dict:
    data, base = ctx.data(), ctx.base()
    section: dict = {}
    categorised = {}
    for probe_fmt, questions in probe_files(ctx, data).items():
        probe = ctx.stage(f"probe-base-{probe_fmt}", ["probe-knowledge", "--model", str(base), "--data",
                                                      str(questions), "--format", probe_fmt, *PROBE],
                          [base, questions], trains=False)
        rows = categorised[probe_fmt] = read_jsonl(probe / "categories.jsonl")
        section[f"probe_{probe_fmt}"] = {
            "all": shares(rows), "multi": shares(rows, lambda r: r["meta"]["bio_style"] == "multi"),
            "single": shares(rows, lambda r: r["meta"]["bio_style"] == "single"),
            "questions": {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}}
    rows = categorised["cloze"]
    probed = {(r["meta"]["name"], r["meta"]["attr"]): r["category"] for r in rows}

    world = {p.name: p for p in sft_data.world_of(data).people}
    groups = sft_data.by_kind(data)
    rest = [r for k in ("arith", "harmful", "benign", "idk") for r in groups[k]]
    seen = {c: [(world[r["meta"]["name"]], r["meta"]["attr"]) for r in rows
                if r["category"] == c and r["meta"]["seen"]] for c in CATEGORIES}
    enough = [c for c in CATEGORIES if len(seen[c]) >= MIN_QUESTIONS[ctx.preset]]
    size = min([len(seen[c]) for c in enough] + [MAX_QUESTIONS])
    section["sft_questions_per_category"] = size
    section["seen_questions"] = {c: len(seen[c]) for c in CATEGORIES}
    section["heldout_by_category"] = {}
    for c in enough:
        name = f"sft_{c.lower()}"
        picked = random.Random(ctx.seed).sample(seen[c], size)
        demos = sft_data.question_demos(picked, FRAMES, ctx.seed)
        path = ctx.derived(NAME, f"{name}.jsonl", sft_data.shuffled(rest + demos, ctx.seed))
        model = sft_data.sft(ctx, f"sft-{c.lower()}", base, path, STEPS[ctx.preset])
        section[name] = ctx.evaluate(NAME, name, model, data, sets=HELD_OUT)
        section["heldout_by_category"][name] = heldout_by_category(ctx, name, probed)
    return section


# ---- report -----------------------------------------------------------------------------------------------

COLUMNS = ["qa_accuracy_unseen_multi", "qa_accuracy_unseen_single", "wrong_fact_unseen", "idk_unseen",
           "made_up_on_unknown"]


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    md = ["The base model probed few-shot on every fact of every person (4 prompt variants of 4 exemplars, greedy; "
          "4 samples at T = 0.5 per variant where greedy is never right), as questions in a \"Q: / A:\" format "
          "(plain) and as statements to complete in the bios' words (cloze; its categories choose the SFT data):", "",
          "| probe | bios | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 2) + "|"]
    for probe_fmt in ("plain", "cloze"):
        probe = section.get(f"probe_{probe_fmt}", {})
        for key, title in (("all", "all"), ("multi", "three phrasings"), ("single", "one phrasing")):
            md.append(f"| {probe_fmt} | {title} | " + " | ".join(fmt(probe.get(key, {}).get(c)) for c in CATEGORIES) + " |")
    probe = section.get("probe_cloze", {})
    counts = ", ".join(f"{c} {fmt(probe.get('questions', {}).get(c), 0)}" for c in CATEGORIES)
    md += ["", f"Cloze questions per category: {counts}; SFT on each category with at least the "
           f"preset's minimum of seen questions, {fmt(section.get('sft_questions_per_category'), 0)} questions each "
           "(8 frames), plus the world's other SFT data.", ""]
    runs = {k: v for k, v in section.items() if k.startswith("sft_") and isinstance(v, dict) and "near" in v}
    md += [*near_far_table(runs, COLUMNS), "", "Held-out accuracy (far and near together) by the held-out "
           "question's own category:", "", "| SFT on | " + " | ".join(CATEGORIES) + " |",
           "|---" * (len(CATEGORIES) + 1) + "|"]
    for name, by in section.get("heldout_by_category", {}).items():
        md.append(f"| {name} | " + " | ".join(f"{fmt(by.get(c, {}).get('accuracy'))}" for c in CATEGORIES) + " |")
    return "\n".join(md + [""])
