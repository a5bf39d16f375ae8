"""Length bias as a controlled experiment: the same DPO, LN-DPO, SimPO, PPO and best-of-n, from the same SFT model
and with the ladder's hyperparameters, on the preferences of annotators without length bias and of annotators
with a strong one (every other data file is the same). The notes predict that a length-biased preference signal
makes policies longer, and length-normalised objectives (LN-DPO, SimPO) less so; this measures, per method, the
change in answer length and in gold reward that the bias causes (paired per held-out prompt), and how strongly
each reward model's score follows answer length.
"""

from __future__ import annotations

import json
from pathlib import Path

NAME = "length-bias"
SUMMARY = ("DPO, LN-DPO, SimPO, PPO and best-of-n trained on unbiased vs strongly length-biased annotators: the "
           "change in answer length and gold reward the bias causes, and the reward model's score-vs-length slope")
MINUTES = {"smoke": 3.0, "tiny": 12.0, "small": 45.0}
ESTIMATED = {"tiny", "small"}
# A mean length bias of 2.0 makes the annotators prefer the longer answer of a pair about three times in four
# (against about one in two unbiased) while they still agree with the gold judge on about three untied pairs in
# four (nine in ten unbiased, one in two by chance), so the signal is biased, not destroyed.
STRONG = 2.0
BIASES = (0.0, STRONG)
METHODS = ("dpo", "ln_dpo", "simpo", "ppo", "bon")
CHANGES = ("mean_length", "gold_reward")


def label(method: str, bias: float) -> str:
    return f"{method}_bias{bias:g}"


def rm_length_slope(rm_dir: Path, data: Path) -> dict:
    """Least-squares slope of the reward model's score on answer words over the held-out pairs' candidate
    answers, alone and with the gold reward as a second regressor (the length preference beyond quality)."""
    import numpy as np

    from alignkit.data import load_preference
    from alignkit.models import load_tokenizer
    from alignkit.rewards import RewardModelScorer
    from alignkit.world.gold import gold_score

    path = data / "pref_eval.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tok = load_tokenizer(rm_dir)
    pairs, _ = load_preference([str(path)], tok, 512)
    if len(pairs) != len(rows):
        raise SystemExit(f"error: {path}: {len(rows) - len(pairs)} held-out pairs were dropped; cannot match answers")
    rm = RewardModelScorer(str(rm_dir), tok)
    scores = rm.score_ids([p.prompt_ids + ids for p in pairs for ids in (p.chosen_ids, p.rejected_ids)])
    texts = [r[side][-1]["content"] for r in rows for side in ("chosen", "rejected")]
    metas = [r["meta"] for r in rows for _ in range(2)]
    words = np.array([len(t.split()) for t in texts], dtype=np.float64)
    gold = np.array([gold_score(m, t) for m, t in zip(metas, texts)])
    y = np.array(scores, dtype=np.float64)
    slope = np.polyfit(words, y, 1)[0]
    both, *_ = np.linalg.lstsq(np.stack([words, gold, np.ones_like(words)], 1), y, rcond=None)
    return {"score_per_word": float(slope), "score_per_word_given_gold": float(both[0]),
            "score_per_gold": float(both[1]), "answers": len(texts)}


def bon_subset(sets: dict, n_prompts: int) -> dict:
    """Every k-th held-out prompt of the near frames and of the far frames, n_prompts in all, in sets order."""
    picked = set()
    for distance in ("near", "far"):
        rows = [(name, i) for name in sets for i, r in enumerate(sets[name]) if r["meta"]["distance"] == distance]
        k = max(1, n_prompts // 2)
        picked |= set(rows[:: max(1, len(rows) // k)][:k])
    return {name: [r for i, r in enumerate(sets[name]) if (name, i) in picked] for name in sets}


def best_of_n_answers(policy: Path, rms: dict[float, Path], sets: dict, n: int, seed: int) -> dict[float, dict]:
    """n samples per prompt from the policy, the same samples for every reward model; per reward model, the
    sample it scores highest, as answer_all's {set: [answer]}."""
    import torch

    from alignkit.data import render_prompt
    from alignkit.generation import sample_groups
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.rewards import RewardModelScorer

    tok = load_tokenizer(policy)
    model = load_causal_lm(policy)
    flat = [(name, r) for name in sets for r in sets[name]]
    prompt_ids = [render_prompt(tok, r["prompt"]) for _, r in flat]
    torch.manual_seed(seed)
    completions, ended = sample_groups(model, tok, prompt_ids, n, max_new_tokens=48, temperature=1.0)
    del model
    picks = {}
    for bias, rm_dir in rms.items():
        proxy = RewardModelScorer(str(rm_dir), tok).score_ids([prompt_ids[i // n] + c for i, c in enumerate(completions)])
        answers = {name: [] for name in sets}
        for g, (name, _) in enumerate(flat):
            best = max(range(g * n, (g + 1) * n), key=lambda i: proxy[i])
            c = completions[best]
            answers[name].append({"text": tok.decode(c, skip_special_tokens=True).strip(), "ended": ended[best],
                                  "tokens": len(c), "ids": c})
        picks[bias] = answers
    return picks


def write_rows(ctx, rows: list[dict], label_: str, sft_rows: list[dict], experiment: str = NAME) -> dict:
    """Best-of-n's rows beside the models' (with "win" against SFT on the same prompts) and its metrics."""
    from alignkit.world.evaluate import score, win_values

    mine = {(r["set"], r["prompt"]) for r in rows}
    baseline = [r for r in sft_rows if (r["set"], r["prompt"]) in mine]
    rows = [r | {"win": w} for r, w in zip(rows, win_values(rows, baseline))]
    path = ctx.rows_path(experiment, label_)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = score(rows)
    for d in ("near", "far"):
        wins = [r["win"] for r in rows if r["distance"] == d]
        metrics[d]["win_rate_vs_sft"] = sum(wins) / len(wins) if wins else float("nan")
    return metrics


def run(ctx) -> dict:
    from alignkit.world.evaluate import prompt_rows
    from alignkit.world.experiments.ladder import post_sft_commands, reward_model_eval
    from alignkit.world.stats import paired_differences

    # The held-out sets are the same files for every annotator bias: one data dir answers them all.
    evalset = ctx.data()
    sft = ctx.sft()
    section: dict = {"strong_bias": STRONG, "reward_model": {}, "sft": ctx.evaluate(NAME, "sft", sft, evalset)}
    rms, specs = {}, {}
    for bias in BIASES:
        data = ctx.data(length_bias=bias)
        rms[bias] = rm = ctx.reward_model(data)
        section["reward_model"][f"bias{bias:g}"] = {**ctx.time("eval reward", reward_model_eval, rm, data),
                                                   "length_slope": ctx.time("eval reward", rm_length_slope, rm,
                                                                            ctx.data(length_bias=0.0))}
        specs |= {label(method, bias): spec for method, spec in post_sft_commands(ctx, data, sft, rm).items()
                  if method in METHODS}
    for name, model in ctx.stages_at_once(specs, ctx.at_once).items():
        section[name] = ctx.evaluate(NAME, name, model, evalset, baseline="sft")
    subset = bon_subset(ctx.sets(evalset), ctx.budget["bon_prompts"])
    picks = ctx.time("best-of-n", best_of_n_answers, sft, rms, subset, ctx.budget["bon_n"], ctx.seed)
    sft_rows = ctx.rows(NAME, "sft")
    for bias, answers in picks.items():
        section[label("bon", bias)] = write_rows(ctx, prompt_rows(subset, answers), label("bon", bias), sft_rows)
    section["bon_n"] = ctx.budget["bon_n"]
    # What the bias causes: strong minus none, per held-out prompt (the same prompts in both).
    section["effect"] = {}
    for method in METHODS:
        strong, none = label(method, STRONG), label(method, 0.0)
        rows, baseline = ctx.rows(NAME, strong), ctx.rows(NAME, none)
        effect = {"pair": [strong, none]}
        for d in ("near", "far"):
            effect[d] = {f"{m}_change": _mean(paired_differences(rows, baseline, m, d)) for m in CHANGES}
        section["effect"][method] = effect
    return section


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ---- report -----------------------------------------------------------------------------------------------

NAMES = {"dpo": "DPO", "ln_dpo": "LN-DPO", "simpo": "SimPO", "ppo": "PPO", "bon": "best-of-n"}


def report(section: dict) -> str:
    from alignkit.world.report import fmt

    bias = section["strong_bias"]
    strong = bias if isinstance(bias, (int, float)) else bias.get("mean", STRONG)
    n = section.get("bon_n")
    n = n if isinstance(n, (int, float)) or n is None else n.get("mean")
    md = [f"Annotators' mean length bias 0 vs {strong:g}; every method from the same SFT model. Length in tokens, "
          "gold reward by the gold judge; change = strong bias minus none, per held-out prompt"
          + (f"; best-of-n picks the best of {n:g} SFT samples by each reward model on a subset of prompts." if n
             else "."), ""]
    sft = section.get("sft", {})
    for distance, what in (("far", "frames that appear in no training file"), ("near", "trained frames")):
        md += [f"### Changes caused by the length bias, {distance} frames ({what})", "",
               "| method | length, no bias | length, strong bias | length change | gold, no bias | gold, strong bias "
               "| gold change | win rate vs SFT, no bias | strong bias |", "|---" * 9 + "|",
               f"| SFT | {fmt(sft.get(distance, {}).get('mean_length'), 1)} | | | "
               f"{fmt(sft.get(distance, {}).get('gold_reward'))} | | | | |"]
        for method in METHODS:
            effect = section.get("effect", {}).get(method)
            none, biased = section.get(label(method, 0.0)), section.get(label(method, strong))
            if effect is None or none is None or biased is None:
                continue
            a, b, e = none[distance], biased[distance], effect[distance]
            md.append(f"| {NAMES[method]} | {fmt(a.get('mean_length'), 1)} | {fmt(b.get('mean_length'), 1)} | "
                      f"{fmt(e.get('mean_length_change'), 1)} | {fmt(a.get('gold_reward'))} | "
                      f"{fmt(b.get('gold_reward'))} | {fmt(e.get('gold_reward_change'))} | "
                      f"{fmt(a.get('win_rate_vs_sft'))} | {fmt(b.get('win_rate_vs_sft'))} |")
        md.append("")
    rms = section.get("reward_model", {})
    if rms:
        md += ["### The reward models", "",
               "Score-vs-length slope: least-squares slope of the RM's score on answer words over the held-out pairs' "
               "candidate answers (the same answers for both RMs); `given gold`: with the gold reward as a second "
               "regressor, the length preference beyond answer quality.", "",
               "| annotators' bias | annotators agree with gold | RM held-out accuracy | RM agrees with gold "
               "| score per word | score per word, given gold |", "|---" * 6 + "|"]
        for key, rm in rms.items():
            slope = rm.get("length_slope", {})
            md.append(f"| {key.removeprefix('bias')} | {fmt(rm.get('annotator_gold_agreement'))} | "
                      f"{fmt(rm.get('heldout_accuracy'))} | {fmt(rm.get('gold_label_accuracy'))} | "
                      f"{fmt(slope.get('score_per_word'), 4)} | {fmt(slope.get('score_per_word_given_gold'), 4)} |")
        md.append("")
    return "\n".join(md)
