"""SFT data variants for the experiments about what SFT should be fed, built from a world's own files: the
world's SFT demonstrations by kind, fact demonstrations about any people (including people the pretraining
corpus never mentions), and how well a model fits its training facts."""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignkit.world.experiments.outputs import read_jsonl

KINDS = ("fact", "arith", "harmful", "benign", "idk")


def kind_of(record: dict) -> str:
    """What a demonstration of the world's sft.jsonl teaches, from its answer (world build writes each kind's
    answers in its own form: alignkit.world.build)."""
    from alignkit.world.facts import IDK, REFUSAL

    answer = record["messages"][-1]["content"]
    if answer == REFUSAL:
        return "harmful"
    if answer == IDK:
        return "idk"
    if answer.startswith("Here is how:"):
        return "benign"
    if "The answer is" in answer:
        return "arith"
    return "fact"


def by_kind(data: Path) -> dict[str, list[dict]]:
    """The world's SFT demonstrations (data/sft.jsonl) grouped by kind, in file order."""
    groups: dict[str, list[dict]] = {k: [] for k in KINDS}
    for rec in read_jsonl(data / "sft.jsonl"):
        groups[kind_of(rec)].append(rec)
    return groups


def world_of(data: Path):
    from alignkit.world.facts import World

    return World.from_dict(json.loads((data / "world.json").read_text()))


def absent_people(data: Path, n: int, seed: int) -> list:
    """`n` people with attributes whose names the world's files never use (not in the corpus, not among the
    "I don't know" ghosts of SFT and evaluation): facts no pretraining put in."""
    from alignkit.world.build import SIZES
    from alignkit.world.facts import ATTRIBUTES, FIRST, LAST, Person, unknown_names

    world = world_of(data)
    preset = json.loads((data / "world.json").read_text())["preset"]
    ghosts = set(unknown_names(world, 2 * SIZES[preset].eval_rows, world.seed))
    used = {p.name for p in world.people} | ghosts
    rng = random.Random(seed + 19)
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST if f"{f} {l}" not in used], n)
    return [Person(name=name, **{k: rng.choice(v) for k, v in ATTRIBUTES.items()}, bio_style="absent", seen=True)
            for name in names]


def fact_demos(people: list, frames_per_fact: int, seed: int, attrs: list[str] | None = None) -> list[dict]:
    """SFT demonstrations of each person's attributes (all four, or `attrs`), each asked in `frames_per_fact`
    trained frames, wrapped and answered as world build's SFT demonstrations are."""
    from alignkit.world.build import ATTRS, assistant, fact_prompt, user
    from alignkit.world.facts import ANSWERS
    from alignkit.world.frames import FACT_FRAMES, trained

    rng, frames = random.Random(seed), trained(FACT_FRAMES)
    rows = []
    for p in people:
        for attr in attrs or ATTRS:
            for frame in rng.sample(frames, frames_per_fact):
                q, meta = fact_prompt(p, attr, frame, rng, True)
                rows.append({"messages": user(q) + assistant(ANSWERS[attr].format(**vars(p))), "meta": meta})
    return rows


def question_demos(questions: list[tuple], frames_per_fact: int, seed: int) -> list[dict]:
    """Like fact_demos for (person, attribute) questions."""
    rows = []
    for i, (p, attr) in enumerate(questions):
        rows += fact_demos([p], frames_per_fact, seed + i, [attr])
    return rows


def shuffled(rows: list[dict], seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def sft(ctx, label: str, model: Path, data: Path, steps: int, extra: list[str] = ()) -> Path:
    """The world's SFT recipe (Context.sft's settings) on another data file."""
    return ctx.stage(label, ["sft", "--model", str(model), "--data", str(data), "--max-steps", str(steps),
                             "--batch-size", "16", "--max-length", "192", "--lr", "1e-3", *extra], [model, data])


def answer_accuracy(model_dir: Path, demos: list[dict]) -> float:
    """Share of demonstrations whose question the model answers right by the gold judge (greedy): how well
    training data is fitted."""
    from alignkit.world.evaluate import answer_all
    from alignkit.world.gold import correctness

    if not demos:
        return float("nan")
    items = [{"prompt": d["messages"][:-1], "meta": d["meta"]} for d in demos]
    answers = answer_all(model_dir, {"train": items})["train"]
    return sum(correctness(it["meta"], a["text"]) == 1.0 for it, a in zip(items, answers)) / len(items)
