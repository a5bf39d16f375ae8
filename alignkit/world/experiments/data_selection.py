"""A few good examples beat many (the notes: LIMA; the longest 1,000 of Alpaca, Zhao et al. 2024; IFD-selected
data, Li et al. 2024). A noisy SFT pool — the world's demonstrations plus planted bad ones: wrong facts,
truncated or garbled answers, exact and near duplicates, off-format answers — is curated by `alignkit curate`
(deduplication and heuristic filters), then SFT runs at equal steps on the whole pool, on the curated pool,
and on k records of the curated pool chosen by each selector (random, longest, IFD, reward, diverse). Reported:
the gold judge's held-out figures per choice, and curate's precision and recall at removing planted records."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from alignkit.world.experiments import sft_data
from alignkit.world.experiments.outputs import mean, read_jsonl

NAME = "data-selection"
SUMMARY = ("SFT on a noisy pool vs curated vs k chosen by random / longest / IFD / reward / diverse; curate's "
           "precision and recall on the planted bad records")
MINUTES = {"smoke": 2.0, "tiny": 2.8, "small": 45.0}
ESTIMATED = {"smoke", "small"}
PLANTED = {"wrong_fact": 150, "truncated": 120, "garbled": 100, "duplicate": 120, "near_duplicate": 80,
           "off_format": 80}
K = {"smoke": 200, "tiny": 800, "small": 2000}
STEPS = {"smoke": 4, "tiny": 300, "small": 1000}
WARMUP = {"smoke": (40, 2), "tiny": (200, 40), "small": (500, 100)}  # (records, steps) of the IFD scorer's warm-up
SELECTORS = ("random", "longest", "ifd", "reward", "diverse")
HELD_OUT = ("qa_seen", "qa_unseen_multi", "arith", "harmful", "benign", "unknown")


def _answer(rec: dict) -> str:
    return rec["messages"][-1]["content"]


def _with_answer(rec: dict, text: str) -> dict:
    return {"messages": rec["messages"][:-1] + [{"role": "assistant", "content": text}]}


def _wrong_fact(rec: dict, rng: random.Random) -> dict | None:
    from alignkit.world.facts import ATTRIBUTES

    text = _answer(rec)
    for values in ATTRIBUTES.values():
        for v in values:
            if re.search(rf"\b{re.escape(v)}\b", text):
                return _with_answer(rec, re.sub(rf"\b{re.escape(v)}\b", rng.choice([w for w in values if w != v]), text))
    return None


def _truncated(rec: dict, rng: random.Random) -> dict:
    words = _answer(rec).split()
    keep = max(1, rng.randint(len(words) // 3, max(1, len(words) - 1)))
    cut = " ".join(words[:keep]).rstrip(".!?")
    return _with_answer(rec, cut[:max(1, len(cut) - rng.randint(0, 2))])


def _garbled(rec: dict, rng: random.Random) -> dict:
    words = _answer(rec).rstrip(".").split()
    run = rng.sample(words, min(2, len(words)))
    return _with_answer(rec, " ".join(run * rng.randint(5, 9)) + ".")


def _near_duplicate(rec: dict, rng: random.Random) -> dict:
    """The same demonstration with one prompt word dropped."""
    words = rec["messages"][0]["content"].split()
    i = rng.randrange(len(words))
    return {"messages": [{"role": "user", "content": " ".join(words[:i] + words[i + 1:])}] + rec["messages"][1:]}


def _off_format(rec: dict, rng: random.Random) -> dict:
    text = _answer(rec).rstrip(".")
    return _with_answer(rec, rng.choice([f"#### {text} ####", f"{{{{answer}}}}: <<{text}>> ;;", f"[[{text}]] ~~~ |||"]))


def noisy_pool(data: Path, seed: int) -> tuple[list[dict], list[str]]:
    """The world's SFT demonstrations with the planted ones inserted at random places; the kind of each record
    ("clean" or a PLANTED kind), in pool order."""
    rng = random.Random(seed + 29)
    clean = sft_data.read_jsonl(data / "sft.jsonl")
    facts = [r for r in clean if sft_data.kind_of(r) == "fact"]
    made = {"wrong_fact": lambda r: _wrong_fact(r, rng), "truncated": lambda r: _truncated(r, rng),
            "garbled": lambda r: _garbled(r, rng), "duplicate": dict, "near_duplicate": lambda r: _near_duplicate(r, rng),
            "off_format": lambda r: _off_format(r, rng)}
    pool = [(r, "clean") for r in clean]
    for kind, n in PLANTED.items():
        source = facts if kind == "wrong_fact" else clean
        pool += [(made[kind](r), kind) for r in rng.sample(source, n)]
    rng.shuffle(pool)
    return [r for r, _ in pool], [k for _, k in pool]


def _index(source: str) -> int:
    return int(source.rsplit(":", 1)[1]) - 1


def removal_quality(curated: Path, kinds: list[str]) -> dict:
    """curate's removals against the planted records: precision, recall, and recall per planted kind. Of a
    planted record and the record it duplicates, removing either one removes the duplication: a clean record
    removed as the duplicate of a planted duplicate counts as catching it (not so for a planted wrong fact,
    truncated or off-format copy: removing the clean original leaves the defect in)."""
    removed = {_index(r["source"]): r for r in read_jsonl(curated / "removed.jsonl")}
    caught, wrong = set(), set()
    for i, r in removed.items():
        twin = r["detail"].get("duplicate_of")
        if kinds[i] != "clean":
            caught.add(i)
        elif twin is not None and kinds[_index(twin)] in ("duplicate", "near_duplicate"):
            caught.add(_index(twin))
        else:
            wrong.add(i)
    planted = [i for i, k in enumerate(kinds) if k != "clean"]
    reasons: dict[str, int] = {}
    for r in removed.values():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {"removed": len(removed), "planted": len(planted),
            "precision": 1 - len(wrong) / len(removed) if removed else float("nan"),
            "recall": len(caught) / len(planted) if planted else float("nan"),
            "recall_by_kind": {k: mean(float(i in caught) for i in planted if kinds[i] == k) for k in PLANTED},
            "clean_removed": len(wrong), "reasons": reasons}


def selected_quality(curated_kinds: list[str], chosen: Path, kept: Path) -> dict:
    """Which kinds of record a selector kept, as shares of its k (the planted records curation left)."""
    index = {line: i for i, line in enumerate(kept.read_text().splitlines())}
    lines = chosen.read_text().splitlines()
    kinds = [curated_kinds[index[line]] for line in lines]
    return {"k": len(kinds), "planted_share": mean(float(k != "clean") for k in kinds),
            "fact_share": mean(float(sft_data.kind_of(json.loads(line)) == "fact") for line in lines)}


def run(ctx) -> dict:
    data, base, preset = ctx.data(), ctx.base(), ctx.preset
    records, kinds = noisy_pool(data, ctx.seed)
    pool = ctx.derived(NAME, "pool.jsonl", records)
    section: dict = {"pool": {"records": len(records), **{k: kinds.count(k) for k in ("clean", *PLANTED)}}}
    curated = ctx.stage("curate", ["curate", "--data", str(pool)], [pool])
    section["curation"] = removal_quality(curated, kinds)
    kept = curated / "kept.jsonl"
    removed = {_index(r["source"]) for r in read_jsonl(curated / "removed.jsonl")}
    kept_kinds = [k for i, k in enumerate(kinds) if i not in removed]

    runs = {"all": pool, "curated": kept}
    # IFD is scored by a "pre-experienced" model (Li et al. 2024): briefly fine-tuned on a small random sample of
    # the pool, so that it reads the chat format; the base model's perplexities do not condition on it.
    sample = ctx.derived(NAME, "warmup.jsonl", random.Random(ctx.seed).sample(read_jsonl(kept), WARMUP[preset][0]))
    warm = sft_data.sft(ctx, "sft-ifd-warmup", base, sample, WARMUP[preset][1])
    scorers = {"ifd": ["--model", str(warm)], "diverse": ["--model", str(base)], "random": [], "longest": [],
               "reward": ["--reward-model", str(ctx.reward_model(data))]}
    section["selected"] = {}
    for selector in SELECTORS:
        model_flags = scorers[selector]
        inputs = [kept] + [Path(x) for x in model_flags[1::2]]
        chosen = ctx.stage(f"select-{selector}", ["curate", "--data", str(kept), "--no-filters",
                                                   "--near-dup-threshold", "0", "--select", selector, "--k",
                                                   str(K[preset]), *model_flags], inputs)
        runs[selector] = chosen / "kept.jsonl"
        section["selected"][selector] = selected_quality(kept_kinds, chosen / "kept.jsonl", kept)
    for name, path in runs.items():
        model = sft_data.sft(ctx, f"sft-{name}", base, path, STEPS[preset])
        section[name] = ctx.evaluate(NAME, name, model, data, sets=HELD_OUT)
    return section


# ---- report -----------------------------------------------------------------------------------------------

COLUMNS = ["gold_reward", "qa_accuracy_seen", "qa_accuracy_unseen_multi", "arith_accuracy", "harmful_refusal",
           "benign_overrefusal", "eos_rate"]


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    pool, cur = section.get("pool", {}), section.get("curation", {})
    md = [f"Pool: {fmt(pool.get('records'), 0)} records, {fmt(pool.get('clean'), 0)} of them the world's SFT "
          "demonstrations and the rest planted (" + ", ".join(f"{k} {fmt(pool.get(k), 0)}" for k in PLANTED) + ").", "",
          f"`alignkit curate` (defaults: exact and MinHash near-duplicates, heuristic filters) removed "
          f"{fmt(cur.get('removed'), 0)}: precision {fmt(cur.get('precision'))}, recall {fmt(cur.get('recall'))} "
          f"on the planted records (removing either copy of a planted duplicate counts); clean records removed "
          f"{fmt(cur.get('clean_removed'), 0)}. Removals by reason: "
          + ", ".join(f"{k} {fmt(v, 0)}" for k, v in cur.get("reasons", {}).items()) + ".", "",
          "| planted kind | " + " | ".join(PLANTED) + " |", "|---" * (len(PLANTED) + 1) + "|",
          "| recall | " + " | ".join(fmt(cur.get("recall_by_kind", {}).get(k)) for k in PLANTED) + " |", "",
          "SFT at equal steps on each choice (k records for the selectors, from the curated pool); held out by the "
          "gold judge:", "",
          *near_far_table({k: section[k] for k in ("all", "curated", *SELECTORS) if k in section}, COLUMNS), "",
          "| selector | planted share of its k | fact share of its k |", "|---|---|---|"]
    for s in SELECTORS:
        q = section.get("selected", {}).get(s, {})
        md.append(f"| {s} | {fmt(q.get('planted_share'))} | {fmt(q.get('fact_share'))} |")
    return "\n".join(md + [""])
