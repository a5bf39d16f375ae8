"""Metrics of a set of answers judged against a baseline's answers to the same prompts: win rate with a bootstrap
interval, the length-controlled win rate, diversity (distinct-n, self-BLEU) and degenerate answers (garbled,
repeated n-grams). Pure numpy; hand-worked tests in tests/eval/test_metrics.py.

Words are whitespace-separated, lower-cased (`words`): the unit of every length and n-gram figure here.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

__all__ = ["N_BOOTSTRAP", "bootstrap_ci", "wins", "win_rate", "length_controlled_win_rate", "fit_length_glm",
           "words", "distinct_n", "bleu", "self_bleu", "garbled", "has_repeated_ngram", "repetition_rate"]

N_BOOTSTRAP = 2000


# ----------------------------------------------------------------------------------------------
# Intervals and win rates
# ----------------------------------------------------------------------------------------------


def bootstrap_ci(values_per_seed: list[list[float]], n: int = N_BOOTSTRAP, rng_seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean over seeds of each seed's mean value, resampling seeds, then the
    values within each resampled seed (a hierarchical percentile bootstrap, Efron & Tibshirani 1993, ch. 13).
    With one seed it is the plain percentile bootstrap of the mean over its values. NaN when a seed has no
    values."""
    seeds = [np.asarray(v, dtype=np.float64) for v in values_per_seed]
    if not seeds or any(len(v) == 0 for v in seeds):
        return (math.nan, math.nan)
    rng = np.random.default_rng(rng_seed)
    picks = rng.integers(len(seeds), size=(n, len(seeds)))  # which seed fills each place of each resample
    place_means = np.empty(picks.shape)
    for k, v in enumerate(seeds):  # every place a seed fills gets its own prompt resample
        where = np.nonzero(picks == k)
        place_means[where] = v[rng.integers(len(v), size=(len(where[0]), len(v)))].mean(1)
    stat = place_means.mean(1)
    lo, hi = np.percentile(stat, [2.5, 97.5])
    return (float(lo), float(hi))


def wins(prob) -> list[float]:
    """Per prompt, from P(the model's answer is better than the baseline's): 1 if > 0.5, 0.5 if == 0.5 (a tie
    counts half), 0 if < 0.5."""
    p = np.asarray(prob, dtype=np.float64)  # (N,)
    return np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5)).tolist()


def win_rate(wins: list[float], n: int = N_BOOTSTRAP, rng_seed: int = 0) -> dict:
    """{"win_rate": mean of the per-prompt wins, "ci95": [lo, hi] their percentile bootstrap over prompts
    (`bootstrap_ci` with one seed; `n` resamples), "n": the number of prompts}."""
    w = np.asarray(wins, dtype=np.float64)
    rate = float(w.mean()) if len(w) else math.nan
    return {"win_rate": rate, "ci95": list(bootstrap_ci([w.tolist()], n, rng_seed)), "n": int(len(w))}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow


def fit_length_glm(y: np.ndarray, x: np.ndarray, weights: np.ndarray | None = None, l2: float = 0.1,
                   iterations: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Penalised maximum likelihood of the logistic model P(win) = sigmoid(theta + phi * x) on soft labels y,
    by Newton's method, for B weightings of the same N prompts at once (bootstrap resamples as prompt counts).

    Maximises  sum_i w_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - l2/2 * phi^2  (p_i = sigmoid(theta + phi x_i)),
    with gradient  sum_i w_i (y_i - p_i) [1, x_i] - [0, l2 phi]  and Hessian
    -sum_i w_i p_i (1 - p_i) [[1, x_i], [x_i, x_i^2]] - diag(eps, l2 + eps), eps = 1e-9 keeping the 2x2 solve finite.
    The penalty on phi keeps a judge whose verdicts the length difference separates perfectly at a finite fit;
    theta is unpenalised, so it goes where the data put it (sigmoid(theta) -> 1 when every label is 1).

    Args:
        y: (N,) labels in [0, 1] (a win 1, a tie 0.5, a loss 0, or a probability).
        x: (N,) the covariate.
        weights: (B, N) non-negative weight of each prompt in each fit; None: one fit, every weight 1.

    Returns:
        theta (B,), phi (B,).
    """
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    w = np.ones((1, len(y))) if weights is None else np.asarray(weights, dtype=np.float64)  # (B, N)
    theta, phi = np.zeros(len(w)), np.zeros(len(w))
    wx, wxx = w * x, w * x * x  # (B, N)
    for _ in range(iterations):
        p = _sigmoid(theta[:, None] + phi[:, None] * x)  # (B, N)
        r, v = y - p, p * (1 - p)
        g0, g1 = (w * r).sum(1), (wx * r).sum(1) - l2 * phi  # (B,)
        h00, h01, h11 = (w * v).sum(1) + 1e-9, (wx * v).sum(1), (wxx * v).sum(1) + l2 + 1e-9  # (B,)
        det = h00 * h11 - h01 * h01
        d0, d1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det  # Newton step: H^-1 g
        # a step of at most 5 in either coordinate: the first steps from 0 on a near-separated set overshoot
        scale = np.minimum(1.0, 5.0 / np.maximum(np.maximum(abs(d0), abs(d1)), 1e-300))
        theta, phi = theta + scale * d0, phi + scale * d1
        if max(abs(scale * d0).max(), abs(scale * d1).max()) < 1e-10:
            break
    return theta, phi


def length_controlled_win_rate(wins: list[float], len_model: list[float], len_baseline: list[float],
                               n: int = N_BOOTSTRAP, rng_seed: int = 0, l2: float = 0.1) -> dict:
    """The win rate at equal length: AlpacaEval 2's length-controlled win rate (Dubois et al. 2024,
    "Length-Controlled AlpacaEval", arXiv 2404.04475, section 3), for one model against one baseline.

    Fits the logistic GLM
        P(model wins on prompt i) = sigmoid(theta + phi * tanh((len_m_i - len_b_i) / std(len_m - len_b)))
    to the (soft) per-prompt wins by penalised maximum likelihood (`fit_length_glm`: Newton, an L2 penalty
    l2/2 * phi^2 on the length coefficient only) and reports sigmoid(theta): the predicted win rate when the
    two answers have the same length. std is the population standard deviation over the prompts; when every
    length difference is the same it is 0 and the length term is dropped (x = 0), so the LC win rate is the
    raw one. AlpacaEval's per-instruction difficulty term (psi_m - psi_b) * gamma_x needs many models judged
    on each instruction to estimate and is left out.

    The interval is the percentile bootstrap over prompts: `n` resamples of the prompts (the covariate kept
    standardised by the full set's std), each refitted, all fits at once.

    Returns {"lc_win_rate", "ci95": [lo, hi], "n", "theta", "phi", "length_diff_std"}.
    """
    y = np.asarray(wins, dtype=np.float64)
    diff = np.asarray(len_model, dtype=np.float64) - np.asarray(len_baseline, dtype=np.float64)  # (N,)
    if not len(y) == len(diff) == len(len_baseline):
        raise ValueError("length_controlled_win_rate: wins and lengths must have the same length")
    if not len(y):
        return {"lc_win_rate": math.nan, "ci95": [math.nan, math.nan], "n": 0, "theta": math.nan, "phi": math.nan,
                "length_diff_std": math.nan}
    std = float(diff.std())
    x = np.tanh(diff / std) if std > 0 else np.zeros_like(diff)  # (N,)
    theta, phi = fit_length_glm(y, x, l2=l2)
    rng = np.random.default_rng(rng_seed)
    picks = rng.integers(len(y), size=(n, len(y)))  # (n, N) prompt indices of each resample
    counts = np.zeros((n, len(y)))
    np.add.at(counts, (np.repeat(np.arange(n), len(y)), picks.ravel()), 1.0)  # (n, N) times each prompt is drawn
    boot_theta, _ = fit_length_glm(y, x, counts, l2=l2)
    lo, hi = np.percentile(_sigmoid(boot_theta), [2.5, 97.5])
    return {"lc_win_rate": float(_sigmoid(theta[0])), "ci95": [float(lo), float(hi)], "n": int(len(y)),
            "theta": float(theta[0]), "phi": float(phi[0]), "length_diff_std": std}


# ----------------------------------------------------------------------------------------------
# Diversity
# ----------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Whitespace-separated, lower-cased words."""
    return text.lower().split()


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models",
    arXiv 1510.03055, section 4.3): the number of distinct word n-grams over the whole set of texts divided by
    the number of all its word n-grams. NaN when no text has n words."""
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else math.nan


BLEU_EPSILON = 0.1


def _bleu(c: int, r: int, matches: list[tuple[int, int]]) -> float:
    """BLEU from the hypothesis length c, the reference length r and per order k (clipped count, total count)."""
    if c == 0 or matches[0][0] == 0:
        return 0.0
    log_p = sum(math.log(m / t if m else BLEU_EPSILON / max(1, t)) for m, t in matches)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p / len(matches))


def _closest(lengths, c: int) -> int:
    """The reference length closest to c, the shorter on a tie."""
    return min(lengths, key=lambda length: (abs(length - c), length))


def bleu(hypothesis: list[str], references: list[list[str]], n: int = 4) -> float:
    """Sentence BLEU-n of a word list against reference word lists (Papineni et al. 2002, "BLEU: a Method for
    Automatic Evaluation of Machine Translation", ACL): BP * exp(mean_{k=1..n} log p_k), with p_k the clipped
    k-gram precision (each hypothesis k-gram counted at most as often as it occurs in any one reference) and
    the brevity penalty BP = 1 if c > r else exp(1 - r / c), c the hypothesis length and r the closest reference
    length (the shorter on a tie).

    Zero counts: NLTK's smoothing method 1 (Chen & Cherry 2014, "A Systematic Comparison of Smoothing Techniques
    for Sentence-Level BLEU", method 1), as Texygen's self-BLEU uses: a p_k whose clipped count is 0 becomes
    0.1 / max(1, number of hypothesis k-grams); but no matching unigram at all (or an empty hypothesis) is BLEU 0.
    """
    if not references:
        return 0.0
    matches = []
    for k in range(1, n + 1):
        hyp = Counter(_ngrams(hypothesis, k))
        most = Counter()
        for ref in references:
            most |= Counter(_ngrams(ref, k))  # | keeps the larger count of each k-gram
        matches.append((sum(min(m, most[g]) for g, m in hyp.items()), sum(hyp.values())))
    return _bleu(len(hypothesis), _closest([len(ref) for ref in references], len(hypothesis)), matches)


def self_bleu(texts: list[str], n: int = 4, max_texts: int = 1000, rng_seed: int = 0) -> float:
    """Self-BLEU (Zhu et al. 2018, "Texygen: A Benchmarking Platform for Text Generation Models", arXiv
    1802.01886, section 3.2): the mean over texts of the BLEU-n (`bleu`) of each text against all the others as
    references; 1 = every text repeats the others, lower = more diverse. Over more than `max_texts` texts, a
    random sample of `max_texts` of them (RNG seeded by rng_seed) stands for the set, both as hypotheses and
    references. NaN with fewer than two texts."""
    if len(texts) > max_texts:
        keep = np.random.default_rng(rng_seed).choice(len(texts), size=max_texts, replace=False)
        texts = [texts[i] for i in sorted(keep)]
    if len(texts) < 2:
        return math.nan
    toks = [words(t) for t in texts]
    lengths = np.array([len(t) for t in toks])
    matches: list[list[tuple[int, int]]] = [[] for _ in toks]
    for k in range(1, n + 1):
        counts = [Counter(_ngrams(t, k)) for t in toks]
        # per k-gram its two largest counts over the texts and the owner of the largest: the largest count
        # among the *other* texts is then the first, or the second for its owner
        top: dict[tuple, list] = {}
        for i, cnt in enumerate(counts):
            for g, m in cnt.items():
                t = top.setdefault(g, [0, -1, 0])
                if m > t[0]:
                    t[:] = [m, i, t[0]]
                elif m > t[2]:
                    t[2] = m
        for i, cnt in enumerate(counts):
            clipped = sum(min(m, top[g][2] if top[g][1] == i else top[g][0]) for g, m in cnt.items())
            matches[i].append((clipped, sum(cnt.values())))
    scores = []
    for i, c in enumerate(lengths):
        others = np.delete(lengths, i)
        gap = np.abs(others - c)
        scores.append(_bleu(int(c), int(others[gap == gap.min()].min()), matches[i]))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Degenerate answers
# ----------------------------------------------------------------------------------------------


def garbled(text: str, ended: bool) -> bool:
    """An answer that did not stop, or whose words are mostly repeats (at least 6 words, under half distinct)."""
    w = words(text)
    return not ended or (len(w) >= 6 and len(set(w)) < 0.5 * len(w))


def has_repeated_ngram(text: str, n: int = 4) -> bool:
    """Whether some word n-gram occurs at least twice in the text (a loop, or a phrase said twice)."""
    grams = _ngrams(words(text), n)
    return len(set(grams)) < len(grams)


def repetition_rate(texts: list[str], n: int = 4) -> float:
    """The share of texts with a repeated word n-gram (`has_repeated_ngram`); NaN for no texts."""
    return sum(map(lambda t: has_repeated_ngram(t, n), texts)) / len(texts) if texts else math.nan
