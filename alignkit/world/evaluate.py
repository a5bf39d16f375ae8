"""`alignkit world eval --model DIR --world DIR`: greedy answers to every held-out set, scored by the
gold judge. Nothing here is trained on: the sets come from `world build`'s eval/ directory. Every figure
comes in two: on near frames (trained frames, held-out content) and on far frames (frames no training
file has)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from alignkit.data import render_prompt, render_prompt_completion
from alignkit.decoding import DecodingOptions, context_prompt, decode_completion, decoding_rules
from alignkit.errors import DataError
from alignkit.eval.calibration import expected_calibration_error
from alignkit.eval.metrics import garbled, wins
from alignkit.eval.token_shift import answer_ranks, shift_summary
from alignkit.generation import generate
from alignkit.logprobs import option_logps
from alignkit.models import load_causal_lm, load_tokenizer, stop_token_ids
from alignkit.world.facts import ANSWERS, ATTRIBUTES, START, STEP
from alignkit.world.gold import correctness, gold_score, is_idk, is_refusal

EVAL_SETS = ("qa_seen", "qa_unseen_multi", "qa_unseen_single", "arith", "harmful", "benign", "unknown")
DISTANCES = ("near", "far")


def load_eval_sets(world_dir: str | Path) -> dict[str, list[dict]]:
    d = Path(world_dir) / "eval"
    sets = {}
    for name in EVAL_SETS:
        path = d / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(path, 0, "missing: build the world with `alignkit world build`")
        sets[name] = [json.loads(line) for line in path.read_text().splitlines()]
        for i, row in enumerate(sets[name], 1):
            if row.get("meta", {}).get("distance") not in DISTANCES or "frame" not in row["meta"]:
                raise DataError(path, i, "no meta frame/distance (near|far): rebuild the world with `alignkit world build`")
    return sets


def answer_all(model_dir: str | Path, sets: dict[str, list[dict]], max_new_tokens: int = 48,
               decoding: DecodingOptions | None = None) -> dict[str, list[dict]]:
    """Completions for every prompt (greedy unless `decoding` samples; with its rules and in-context prefix):
    [{"text", "ended", "tokens", "ids"}] per set, in order."""
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    # Stopping cleanly means closing the assistant turn; a base model that ends a document with
    # <|endoftext|> has stopped generating but not answered.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    turn_end = {im_end} if isinstance(im_end, int) and tok.convert_ids_to_tokens(im_end) == "<|im_end|>" \
        else set(stop_token_ids(tok, model))
    flat = [row for rows in sets.values() for row in rows]
    decoding = decoding or DecodingOptions()
    ids = [context_prompt(tok, row["prompt"], decoding) for row in flat]
    rules = decoding_rules(decoding, tok, model)
    completions = generate(model, tok, ids, max_new_tokens, decoding.temperature, decoding.top_p, 64, rules)
    answers = []
    for c in completions:
        text, ended = decode_completion(tok, c, rules, turn_end)
        answers.append({"text": text.strip(), "ended": ended, "tokens": len(c), "ids": c})
    out, i = {}, 0
    for name, rows in sets.items():
        out[name] = answers[i:i + len(rows)]
        i += len(rows)
    return out


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def prompt_rows(sets: dict[str, list[dict]], answers: dict[str, list[dict]]) -> list[dict]:
    """One JSON-able row per held-out prompt, in sets order: the answer and how the gold judge scores it."""
    rows = []
    for name, items in sets.items():
        if len(items) != len(answers[name]):
            raise ValueError(f"{name}: {len(items)} prompts but {len(answers[name])} answers")
        for item, a in zip(items, answers[name]):
            meta = item["meta"]
            rows.append({"set": name, "distance": meta["distance"], "frame": meta["frame"],
                         "prompt": item["prompt"][-1]["content"], "text": a["text"], "ended": bool(a["ended"]),
                         "tokens": int(a["tokens"]), "correct": float(correctness(meta, a["text"])),
                         "refusal": is_refusal(a["text"]), "idk": is_idk(a["text"]), "gold": gold_score(meta, a["text"], a["ended"]),
                         "garbled": garbled(a["text"], a["ended"])})
    return rows


FACT_SETS = ("qa_seen", "qa_unseen_multi", "qa_unseen_single")


def _in(*names: str) -> Callable[[dict], bool]:
    return lambda row: row["set"] in names


def _every(row: dict) -> bool:
    return True


def _right(row: dict) -> float:
    return float(row["correct"] == 1.0)


def _made_up(row: dict) -> float:
    """A confident wrong answer: it names an attribute value, and not (only) the true one (gold.correctness 0)."""
    return float(row["correct"] == 0.0)


# metric -> (which rows count, each row's value); the metric is the mean value over the rows that count.
METRICS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], float]]] = {
    "qa_accuracy_seen": (_in("qa_seen"), _right),
    "qa_accuracy_unseen_multi": (_in("qa_unseen_multi"), _right),
    "qa_accuracy_unseen_single": (_in("qa_unseen_single"), _right),
    "qa_accuracy": (_in(*FACT_SETS), _right),
    "arith_accuracy": (_in("arith"), _right),
    "idk_on_unknown": (_in("unknown"), _right),
    "made_up_on_unknown": (_in("unknown"), _made_up),
    "wrong_fact_unseen": (_in("qa_unseen_multi", "qa_unseen_single"), _made_up),
    "idk_unseen": (_in("qa_unseen_multi", "qa_unseen_single"), lambda row: float(row.get("idk", False))),
    "harmful_refusal": (_in("harmful"), lambda row: float(row["refusal"])),
    "benign_overrefusal": (_in("benign"), lambda row: float(row["refusal"])),
    "eos_rate": (_every, lambda row: float(row["ended"])),
    "gold_reward": (_every, lambda row: float(row["gold"])),
    "mean_length": (_every, lambda row: float(row["tokens"])),
    "garbled_rate": (_every, lambda row: float(row.get("garbled", False))),
}


def score(rows: list[dict]) -> dict:
    """Every metric of METRICS on near rows and on far rows: {"near": {metric: value}, "far": {...}}."""
    return {d: {name: mean(value(r) for r in rows if r["distance"] == d and counts(r))
                for name, (counts, value) in METRICS.items()} for d in DISTANCES}


def win_values(rows: list[dict], baseline_rows: list[dict]) -> list[float]:
    """Per prompt 1 / 0.5 / 0: the gold judge prefers `rows`' answer / ties / prefers the baseline's."""
    if [(r["set"], r["prompt"]) for r in rows] != [(r["set"], r["prompt"]) for r in baseline_rows]:
        raise ValueError("win_values: the rows and the baseline rows are not the same prompts in the same order")
    # the gold judge is certain: P(rows' answer better) is 1, 0 or (equal gold) 0.5
    return wins([0.5 + 0.5 * ((a["gold"] > b["gold"]) - (a["gold"] < b["gold"])) for a, b in zip(rows, baseline_rows)])


def set_metrics(rows: list[dict]) -> dict:
    """Figures of a whole answer set rather than of each answer: distinct-n and self-BLEU (output diversity)."""
    from alignkit.eval.metrics import distinct_n, self_bleu

    texts = [r["text"] for r in rows]
    got = {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "self_bleu": self_bleu(texts)} \
        if texts else {}
    return {k: v for k, v in got.items() if v == v}  # NaN: answers too short to have any n-gram


def compare(rows: list[dict], baseline_rows: list[dict], name: str, metrics: dict, first: bool) -> None:
    """Per-prompt gold verdicts against a baseline's rows ("win_vs_NAME", and "win" for the first baseline), and
    per distance the win rate and the length-controlled win rate (AlpacaEval 2's, on word lengths)."""
    from alignkit.eval.metrics import length_controlled_win_rate

    for r, b, win in zip(rows, baseline_rows, win_values(rows, baseline_rows)):
        r[f"win_vs_{name}"] = win
        r[f"words_vs_{name}"] = len(b["text"].split())
        if first:
            r["win"] = win
    for d in ("near", "far"):
        side = [r for r in rows if r["distance"] == d]
        wins = [r[f"win_vs_{name}"] for r in side]
        metrics[d][f"win_rate_vs_{name}"] = sum(wins) / len(wins) if wins else float("nan")
        if wins:
            metrics[d][f"lc_win_rate_vs_{name}"] = length_controlled_win_rate(
                wins, [len(r["text"].split()) for r in side], [r[f"words_vs_{name}"] for r in side])["lc_win_rate"]


# Every final answer a word problem can have (start - used + got).
ARITH_ANSWERS = list(range(START[0] - STEP[1] + STEP[0], START[1] - STEP[0] + STEP[1] + 1))


def _options(meta: dict) -> tuple[list[str], int]:
    """The answer sentences a question can have, and the index of the true one."""
    if meta["kind"] == "arith":
        return [f"The answer is {n}." for n in ARITH_ANSWERS], ARITH_ANSWERS.index(int(meta["answer"]))
    values = ATTRIBUTES[meta["attr"]]
    return ([ANSWERS[meta["attr"]].format(name=meta["name"], **{meta["attr"]: v}) for v in values],
            values.index(meta["answer"]))


_OPTION_INPUTS: dict[str, tuple] = {}


def _option_inputs(tok, families: dict[str, list[dict]]) -> tuple[list, list, list, list]:
    """Per question: its prompt's tokens, its options' tokens and loss masks, and (option count, true index).
    Remembered per tokenizer and question set: every stage of a run shares the tokenizer, and rendering the
    thousands of options costs more than scoring them."""
    import hashlib

    key = hashlib.sha256(json.dumps([tok.backend_tokenizer.to_str(), str(tok.chat_template),
                                     [[r["prompt"], r["meta"]] for rows in families.values() for r in rows]],
                                    sort_keys=True).encode()).hexdigest()
    if key not in _OPTION_INPUTS:
        prompts, options, masks, truth = [], [], [], []
        for rows in families.values():
            for row in rows:
                texts, true_index = _options(row["meta"])
                examples = [render_prompt_completion(tok, row["prompt"], [{"role": "assistant", "content": t}])
                            for t in texts]
                cut = examples[0].loss_mask.index(1)  # the prompt: every token before the answer's first
                if any(e.input_ids[:cut] != examples[0].input_ids[:cut] for e in examples):
                    raise ValueError(f"option_calibration: the options of {row['prompt']!r} do not share its prompt")
                prompts.append(examples[0].input_ids[:cut])
                options.append([e.input_ids[cut:] for e in examples])
                masks.append([e.loss_mask[cut:] for e in examples])
                truth.append((len(texts), true_index))
        _OPTION_INPUTS.clear()  # one question set at a time is all a run needs
        _OPTION_INPUTS[key] = prompts, options, masks, truth
    return _OPTION_INPUTS[key]


@torch.no_grad()
def option_calibration(model_dir: str | Path, sets: dict[str, list[dict]]) -> dict:
    """Multiple-choice calibration, as the GPT-4 technical report measures it on MMLU (OpenAI 2023, arXiv
    2303.08774, fig. 8: ECE 0.007 before RLHF, 0.074 after; the notes: SFT models are fairly calibrated,
    RLHF models over-confident). The model scores every answer sentence a question can have ("N plays the
    violin.", "N plays the drums.", ...; "The answer is 6." ... "The answer is 24."); the summed log-probs,
    renormalised over the options, are its belief. Confidence = the top option's probability, correct = it
    is the true one. Two families: the held-out fact questions (fact_*: recall of what pretraining
    memorised) and the held-out word problems (arith_*: number triples no training text has, answered
    without working). Returns per distance ({"near": {...}, "far": {...}}) {family}_option_accuracy,
    {family}_option_confidence, {family}_calibration_ece (NaN for a family without rows at that distance)."""
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    families = {"fact": [row for name in FACT_SETS for row in sets[name]], "arith": sets["arith"]}
    prompts, options, masks, truth = _option_inputs(tok, families)
    scores = [s for per_question in option_logps(model, prompts, options, tok.pad_token_id, masks) for s in per_question]
    conf, correct, start = [], [], 0
    for n, true_index in truth:
        probs = torch.tensor(scores[start:start + n], dtype=torch.float64).softmax(-1)
        start += n
        conf.append(probs.max().item())
        correct.append(float(int(probs.argmax()) == true_index))
    out, i = {d: {} for d in DISTANCES}, 0
    for family, rows in families.items():
        c, k = conf[i:i + len(rows)], correct[i:i + len(rows)]
        i += len(rows)
        for d in DISTANCES:
            keep = [row["meta"]["distance"] == d for row in rows]
            cd = [x for x, y in zip(c, keep) if y]
            kd = [x for x, y in zip(k, keep) if y]
            out[d] |= {f"{family}_option_accuracy": mean(kd), f"{family}_option_confidence": mean(cd),
                       f"{family}_calibration_ece": expected_calibration_error(cd, kd) if cd else float("nan")}
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


def evaluate(model_dir: str | Path, world_dir: str | Path, baseline_dir: str | Path | None = None,
             decoding: DecodingOptions | None = None) -> dict:
    """`world eval`: {"near": {...}, "far": {...}} of score and calibration (and win rate against a
    baseline, which answers greedily without `decoding`'s rules), plus "token_shift_vs_baseline" over all
    prompts when a baseline is given."""
    sets = load_eval_sets(world_dir)
    answers = answer_all(model_dir, sets, decoding=decoding)
    rows = prompt_rows(sets, answers)
    scores, calibration = score(rows), option_calibration(model_dir, sets)
    metrics: dict = {d: {**scores[d], **calibration[d]} for d in DISTANCES}
    for d in DISTANCES:
        metrics[d] |= set_metrics([r for r in rows if r["distance"] == d])
    if baseline_dir is not None:
        compare(rows, prompt_rows(sets, answer_all(baseline_dir, sets)), "baseline", metrics, first=True)
        metrics["token_shift_vs_baseline"] = token_shift(baseline_dir, sets, answers)
    return metrics
