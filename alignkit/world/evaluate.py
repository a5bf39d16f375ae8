"""`alignkit world eval --model DIR --world DIR`: greedy answers to every held-out set, scored by the
gold judge. Nothing here is trained on: the sets come from `world build`'s eval/ directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignkit.data import render_prompt, render_prompt_completion
from alignkit.eval.calibration import expected_calibration_error
from alignkit.eval.token_shift import answer_ranks, shift_summary
from alignkit.generation import generate
from alignkit.logprobs import next_token_logps
from alignkit.models import load_causal_lm, load_tokenizer, stop_token_ids
from alignkit.train.batching import collate
from alignkit.world.facts import ANSWERS, ATTRIBUTES
from alignkit.world.gold import correctness, gold_score, is_refusal

EVAL_SETS = ("qa_seen", "qa_unseen_multi", "qa_unseen_single", "arith", "harmful", "benign", "unknown")


def load_eval_sets(world_dir: str | Path) -> dict[str, list[dict]]:
    d = Path(world_dir) / "eval"
    return {name: [json.loads(line) for line in (d / f"{name}.jsonl").read_text().splitlines()] for name in EVAL_SETS}


def answer_all(model_dir: str | Path, sets: dict[str, list[dict]], max_new_tokens: int = 48) -> dict[str, list[dict]]:
    """Greedy completions for every prompt: [{"text", "ended", "tokens", "ids"}] per set, in order."""
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    # Stopping cleanly means closing the assistant turn; a base model that ends a document with
    # <|endoftext|> has stopped generating but not answered.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    turn_end = {im_end} if isinstance(im_end, int) and tok.convert_ids_to_tokens(im_end) == "<|im_end|>" \
        else set(stop_token_ids(tok, model))
    flat = [row for rows in sets.values() for row in rows]
    ids = [render_prompt(tok, row["prompt"]) for row in flat]
    completions = generate(model, tok, ids, max_new_tokens, batch_size=64)
    answers = [{"text": tok.decode(c, skip_special_tokens=True).strip(), "ended": bool(c) and c[-1] in turn_end,
                "tokens": len(c), "ids": c} for c in completions]
    out, i = {}, 0
    for name, rows in sets.items():
        out[name] = answers[i:i + len(rows)]
        i += len(rows)
    return out


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def score(sets: dict[str, list[dict]], answers: dict[str, list[dict]]) -> dict:
    """The per-stage metrics of results.json."""
    def acc(name):
        return mean(correctness(r["meta"], a["text"]) == 1.0 for r, a in zip(sets[name], answers[name]))

    every = [(r, a) for name in sets for r, a in zip(sets[name], answers[name])]
    return {
        "qa_accuracy_seen": acc("qa_seen"),
        "qa_accuracy_unseen_multi": acc("qa_unseen_multi"),
        "qa_accuracy_unseen_single": acc("qa_unseen_single"),
        "qa_accuracy": mean(correctness(r["meta"], a["text"]) == 1.0
                            for name in ("qa_seen", "qa_unseen_multi", "qa_unseen_single")
                            for r, a in zip(sets[name], answers[name])),
        "arith_accuracy": acc("arith"),
        "idk_on_unknown": acc("unknown"),
        "harmful_refusal": mean(is_refusal(a["text"]) for a in answers["harmful"]),
        "benign_overrefusal": mean(is_refusal(a["text"]) for a in answers["benign"]),
        "eos_rate": mean(a["ended"] for _, a in every),
        "gold_reward": mean(gold_score(r["meta"], a["text"], a["ended"]) for r, a in every),
        "mean_length": mean(a["tokens"] for _, a in every),
    }


def win_rate(sets: dict[str, list[dict]], answers: dict[str, list[dict]], baseline: dict[str, list[dict]]) -> float:
    """Fraction of held-out prompts where the gold judge prefers `answers` over `baseline` (ties count half)."""
    wins = []
    for name in sets:
        for r, a, b in zip(sets[name], answers[name], baseline[name]):
            ga, gb = gold_score(r["meta"], a["text"], a["ended"]), gold_score(r["meta"], b["text"], b["ended"])
            wins.append(1.0 if ga > gb else 0.5 if ga == gb else 0.0)
    return mean(wins)


FACT_SETS = ("qa_seen", "qa_unseen_multi", "qa_unseen_single")


@torch.no_grad()
def option_calibration(model_dir: str | Path, sets: dict[str, list[dict]], batch_size: int = 64) -> dict:
    """Multiple-choice calibration on the held-out fact questions, as the GPT-4 technical report measures
    it on MMLU (OpenAI 2023, arXiv 2303.08774, fig. 8: ECE 0.007 before RLHF, 0.074 after; seed 001: RLHF
    models grow over-confident). The model scores the answer sentence with every possible value of the
    attribute ("N plays the violin.", "N plays the drums.", ...); the summed log-probs, renormalised over
    the values, are its belief. Confidence = the top value's probability, correct = the top value is the
    true one. Returns option_accuracy, option_confidence and calibration_ece (10 bins)."""
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    questions = [row for name in FACT_SETS for row in sets[name]]
    examples = []  # every question's options, consecutively
    for row in questions:
        meta = row["meta"]
        for value in ATTRIBUTES[meta["attr"]]:
            text = ANSWERS[meta["attr"]].format(name=meta["name"], **{meta["attr"]: value})
            examples.append(render_prompt_completion(tok, row["prompt"], [{"role": "assistant", "content": text}]))
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate([e.input_ids for e in chunk], [e.loss_mask for e in chunk], tok.pad_token_id)
        logps, mask = next_token_logps(model, **batch)  # (B, T-1)
        scores += (logps * mask).sum(-1).tolist()
    conf, correct, start = [], [], 0
    for row in questions:
        values = ATTRIBUTES[row["meta"]["attr"]]
        probs = torch.tensor(scores[start:start + len(values)], dtype=torch.float64).softmax(-1)
        start += len(values)
        conf.append(probs.max().item())
        correct.append(float(values[int(probs.argmax())] == row["meta"]["answer"]))
    return {"option_accuracy": mean(correct), "option_confidence": mean(conf),
            "calibration_ece": expected_calibration_error(conf, correct)}


def token_shift(base_dir: str | Path, sets: dict[str, list[dict]], answers: dict[str, list[dict]]) -> dict:
    """How the base model ranks the tokens of `answers` (Lin et al. 2023; see alignkit.eval.token_shift)."""
    tok = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir)
    rows = [(row, a) for name in sets for row, a in zip(sets[name], answers[name]) if a["ids"]]
    prompts = [render_prompt(tok, row["prompt"]) for row, _ in rows]
    ids = [a["ids"] for _, a in rows]
    ranks = answer_ranks(model, prompts, ids, tok.pad_token_id)
    return shift_summary(ranks, ids, set(stop_token_ids(tok, model)), tok.decode)


def evaluate(model_dir: str | Path, world_dir: str | Path, baseline_dir: str | Path | None = None) -> dict:
    sets = load_eval_sets(world_dir)
    answers = answer_all(model_dir, sets)
    metrics = {**score(sets, answers), **option_calibration(model_dir, sets)}
    if baseline_dir is not None:
        metrics["win_rate_vs_baseline"] = win_rate(sets, answers, answer_all(baseline_dir, sets))
        metrics["token_shift_vs_baseline"] = token_shift(baseline_dir, sets, answers)
    return metrics
