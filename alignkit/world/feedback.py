"""The world's AI-feedback files, for models that must learn to judge and to critique as the papers' models
do: from a little evaluation data in SFT (Yuan et al. 2024's EFT data; Bai et al. 2022's critique and revision
demonstrations), built from training prompts only, never from held-out ones. The gold judge labels the
judgement demonstrations, as expert annotators wrote Yuan et al.'s; it never labels what the AI labels.

OUT/eft.jsonl            {"messages"}  judgements through `alignkit judge`'s default templates: pairwise (the
                         gold-better answer's label, both orders) and pointwise (gold mapped to 1-5)
OUT/sft_helpful.jsonl    {"messages"}  helpful-only SFT: sft.jsonl without its refusals, plus critique/revision
                         conversations and harmlessness judgements on half the training harmful requests
OUT/red_team.jsonl       {"prompt", meta}  the other half of the training harmful requests, and the training
                         look-alikes: what SL-CAI and RL-CAI sample, critique and compare
OUT/constitution.yaml    the principles every critique/revision demonstration and RL-CAI comparison uses
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from alignkit.judge import DEFAULT_LABELS, DEFAULT_SCORES, Template, default_template
from alignkit.world.facts import REFUSAL
from alignkit.world.gold import gold_score

# Short on purpose: every demonstration repeats one of them to a model with a 192-token context.
CONSTITUTION = {
    "critiques": [
        {"critique": "Is the answer harmful? Say why.", "revision": "Rewrite the answer so that it is harmless."},
        {"critique": "Does the answer help someone do harm?", "revision": "Rewrite the answer without the harm."},
    ],
    "preferences": ["Choose the answer that is more harmless.", "Choose the safer answer."],
}
CRITIQUE_HARMFUL = "The answer helps with a harmful request."
CRITIQUE_FINE = "The answer is harmless."
EFT_PAIRS = 600  # pairwise judgement demonstrations (300 pairs, each in both orders)
EFT_POINTS = 300  # pointwise ones


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def score_label(gold: float) -> str:
    """Gold reward in [-0.5, 1] -> a 1-5 score label: 1 for wrong or harmful, 5 for right."""
    return DEFAULT_SCORES[round(4 * min(1.0, max(0.0, gold)))]


def judgement_demos(prompts: list[tuple[str, dict]], candidates, rng: random.Random, principle=None) -> list[dict]:
    """Pairwise demonstrations on random prompts: two candidates the gold judge does not tie, shown in both
    orders, answered with the better one's label; and pointwise ones, answered with its gold score label."""
    pairwise, pointwise = Template(default_template("pairwise")), Template(default_template("pointwise"))
    out: list[dict] = []
    while len(out) < EFT_PAIRS:
        q, meta = rng.choice(prompts)
        a, b = rng.sample(candidates(meta, rng), 2)
        ga, gb = gold_score(meta, a), gold_score(meta, b)
        if ga == gb:
            continue
        for x, y, first_better in ((a, b, ga > gb), (b, a, gb > ga)):
            text = pairwise.render(prompt=q, answer_a=x, answer_b=y, principle=principle, labels=DEFAULT_LABELS)
            label = DEFAULT_LABELS[0] if first_better else DEFAULT_LABELS[1]
            out.append({"messages": [user(text), assistant(label)]})
    for _ in range(EFT_POINTS):
        q, meta = rng.choice(prompts)
        answer = rng.choice(candidates(meta, rng))
        text = pointwise.render(prompt=q, answer=answer, principle=principle, scores=DEFAULT_SCORES)
        out.append({"messages": [user(text), assistant(score_label(gold_score(meta, answer)))]})
    return out


def critique_demos(requests: list[tuple[str, dict]], comply, rng: random.Random) -> list[dict]:
    """Bai et al. 2022's critique -> revision conversations (§3.1) on training requests: a harmful request's
    compliant answer is critiqued as harmful and revised to a refusal; a look-alike's answer is critiqued as
    harmless and kept."""
    out = []
    for q, meta in requests:
        principle = rng.choice(CONSTITUTION["critiques"])
        if meta["kind"] == "harmful":
            answer, critique, revision = comply(rng), CRITIQUE_HARMFUL, REFUSAL
        else:
            answer, critique, revision = meta["answer"], CRITIQUE_FINE, meta["answer"]
        out.append({"messages": [user(q), assistant(answer), user(principle["critique"]), assistant(critique),
                                 user(principle["revision"]), assistant(revision)]})
    return out


def preference_demos(requests: list[tuple[str, dict]], comply, rng: random.Random) -> list[dict]:
    """Pairwise judgements by a constitution principle on training requests, both orders: the refusal of a
    harmful request, and the answer (not the refusal) of a look-alike, is the better one."""
    pairwise = Template(default_template("pairwise"))
    out = []
    for q, meta in requests:
        better, worse = (REFUSAL, comply(rng)) if meta["kind"] == "harmful" else (meta["answer"], REFUSAL)
        principle = rng.choice(CONSTITUTION["preferences"])
        for x, y, label in ((better, worse, DEFAULT_LABELS[0]), (worse, better, DEFAULT_LABELS[1])):
            text = pairwise.render(prompt=q, answer_a=x, answer_b=y, principle=principle, labels=DEFAULT_LABELS)
            out.append({"messages": [user(text), assistant(label)]})
    return out


def write_feedback_files(out: Path, seed: int, sft: list[dict], train_prompts: list[tuple[str, dict]],
                         candidates, harmful: list[tuple[str, dict]], benign: list[tuple[str, dict]],
                         how_to: list[str]) -> dict:
    """Write the files of the module docstring; `harmful`/`benign` are the training requests as prompts (a
    trained frame, wrapped) with their meta. Returns counts for the world's summary."""
    rng = random.Random(seed + 11)
    comply = lambda r: r.choice(how_to)
    harmful = rng.sample(harmful, len(harmful))
    demo_harmful, red_harmful = harmful[: len(harmful) // 2], harmful[len(harmful) // 2:]
    benign = rng.sample(benign, len(benign))
    demo_benign = benign[: len(benign) // 2]
    eft = judgement_demos(train_prompts, candidates, rng)
    refusals = [m for m in sft if m["messages"][-1]["content"] == REFUSAL]
    helpful = ([m for m in sft if m["messages"][-1]["content"] != REFUSAL]
               + critique_demos(demo_harmful + demo_benign, comply, rng) * 2
               + preference_demos(demo_harmful + demo_benign, comply, rng))
    rng.shuffle(helpful)
    red_team = [{"prompt": [user(q)], "meta": meta} for q, meta in red_harmful + benign]

    def write(name: str, rows: list[dict]) -> None:
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    write("eft.jsonl", eft)
    write("sft_helpful.jsonl", helpful)
    write("red_team.jsonl", red_team)
    (out / "constitution.yaml").write_text(yaml.safe_dump(CONSTITUTION, sort_keys=False))
    return {"eft_examples": len(eft), "helpful_sft_examples": len(helpful), "helpful_sft_refusals_removed": len(refusals),
            "red_team_prompts": len(red_team)}
