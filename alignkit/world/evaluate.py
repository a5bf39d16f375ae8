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
from alignkit.losses import masked_sum
from alignkit.models import load_causal_lm, load_tokenizer, stop_token_ids
from alignkit.train.batching import collate
from alignkit.world.facts import ANSWERS, ATTRIBUTES, START, STEP
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
# Every final answer a word problem can have (start - used + got).
ARITH_ANSWERS = list(range(START[0] - STEP[1] + STEP[0], START[1] - STEP[0] + STEP[1] + 1))


def _options(meta: dict) -> tuple[list[str], int]:
    """The answer sentences a question can have, and the index of the true one."""
    if meta["kind"] == "arith":
        return [f"The answer is {n}." for n in ARITH_ANSWERS], ARITH_ANSWERS.index(int(meta["answer"]))
    values = ATTRIBUTES[meta["attr"]]
    return ([ANSWERS[meta["attr"]].format(name=meta["name"], **{meta["attr"]: v}) for v in values],
            values.index(meta["answer"]))


@torch.no_grad()
def option_calibration(model_dir: str | Path, sets: dict[str, list[dict]], batch_size: int = 64) -> dict:
    """Multiple-choice calibration, as the GPT-4 technical report measures it on MMLU (OpenAI 2023, arXiv
    2303.08774, fig. 8: ECE 0.007 before RLHF, 0.074 after; the notes: SFT models are fairly calibrated,
    RLHF models over-confident). The model scores every answer sentence a question can have ("N plays the
    violin.", "N plays the drums.", ...; "The answer is 6." ... "The answer is 24."); the summed log-probs,
    renormalised over the options, are its belief. Confidence = the top option's probability, correct = it
    is the true one. Two families: the held-out fact questions (fact_*: recall of what pretraining
    memorised) and the held-out word problems (arith_*: number triples no training text has, answered
    without working). Returns {family}_option_accuracy, {family}_option_confidence, {family}_calibration_ece."""
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    families = {"fact": [row for name in FACT_SETS for row in sets[name]], "arith": sets["arith"]}
    examples, truth = [], []  # every question's options, consecutively
    for rows in families.values():
        for row in rows:
            texts, true_index = _options(row["meta"])
            examples += [render_prompt_completion(tok, row["prompt"], [{"role": "assistant", "content": t}]) for t in texts]
            truth.append((len(texts), true_index))
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate([e.input_ids for e in chunk], [e.loss_mask for e in chunk], tok.pad_token_id)
        logps, mask = next_token_logps(model, **batch)  # (B, T-1)
        scores += masked_sum(logps, mask, -1).tolist()
    conf, correct, start = [], [], 0
    for n, true_index in truth:
        probs = torch.tensor(scores[start:start + n], dtype=torch.float64).softmax(-1)
        start += n
        conf.append(probs.max().item())
        correct.append(float(int(probs.argmax()) == true_index))
    out, i = {}, 0
    for family, rows in families.items():
        c, k = conf[i:i + len(rows)], correct[i:i + len(rows)]
        i += len(rows)
        out |= {f"{family}_option_accuracy": mean(k), f"{family}_option_confidence": mean(c),
                f"{family}_calibration_ece": expected_calibration_error(c, k)}
    return out


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
