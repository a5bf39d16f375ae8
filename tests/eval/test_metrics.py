"""Evaluation metrics (alignkit.eval.metrics): win rates and their intervals (coverage on a synthetic judge),
the length-controlled win rate against planted length and quality preferences, and distinct-n / self-BLEU /
degenerate-answer figures against values worked out by hand."""

import math

import numpy as np
import pytest

from alignkit.eval.metrics import (bleu, distinct_n, fit_length_glm, garbled, has_repeated_ngram,
                                   length_controlled_win_rate, repetition_rate, self_bleu, win_rate, wins)
from alignkit.eval.token_shift import shift_by_position


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# ---------------------------------------------------------------------------------------------- win rate


def test_wins_count_ties_half():
    assert wins([0.7, 0.5, 0.2, 0.5000001, 1.0, 0.0]) == [1.0, 0.5, 0.0, 1.0, 1.0, 0.0]


def test_win_rate_by_hand():
    r = win_rate([1.0, 1.0, 0.0, 0.5])  # (1 + 1 + 0 + 0.5) / 4
    assert r["win_rate"] == pytest.approx(0.625) and r["n"] == 4
    lo, hi = r["ci95"]
    assert 0.0 <= lo < 0.625 < hi <= 1.0
    assert win_rate([1.0] * 10)["ci95"] == [1.0, 1.0]
    assert win_rate([1.0, 1.0, 0.0, 0.5]) == r  # a fixed RNG seed: the same interval every time


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_win_rate_interval_covers_the_true_rate(p):
    """A judge whose every verdict is a win with probability p: over 300 sets of 200 prompts the 95% interval
    contains p in about 95% of the sets."""
    rng = np.random.default_rng(1)
    draws = 300
    inside = 0
    for k in range(draws):
        lo, hi = win_rate(wins(rng.random(200) < p), n=1000, rng_seed=k)["ci95"]
        inside += lo <= p <= hi
    assert 0.90 <= inside / draws <= 0.99


# ---------------------------------------------------------------------------------------------- length control


def test_lc_win_rate_interval_covers_the_true_rate():
    """A judge with no length preference that prefers the model with probability 0.7: over 100 sets of 200
    prompts the LC interval contains 0.7 in about 95% of the sets (tolerance for 100 draws)."""
    rng = np.random.default_rng(2)
    draws = 100
    inside = 0
    for k in range(draws):
        len_b = rng.integers(10, 40, 200)
        len_m = len_b + rng.integers(-4, 20, 200)
        lo, hi = length_controlled_win_rate(wins(rng.random(200) < 0.7), len_m, len_b, n=300, rng_seed=k)["ci95"]
        inside += lo <= 0.7 <= hi
    assert 0.88 <= inside / draws <= 0.99


def test_length_glm_fits_two_groups_exactly():
    """With two covariate values the unpenalised logistic model fits each group's mean: wins 1, 0 at x = 1 (mean
    1/2) and 1, 1/2 at x = -1 (mean 3/4), so theta + phi = logit(1/2) = 0 and theta - phi = logit(3/4) = ln 3:
    theta = ln(3)/2, phi = -ln(3)/2."""
    theta, phi = fit_length_glm(np.array([1.0, 0.0, 1.0, 0.5]), np.array([1.0, 1.0, -1.0, -1.0]), l2=0.0)
    assert theta[0] == pytest.approx(math.log(3) / 2, abs=1e-8)
    assert phi[0] == pytest.approx(-math.log(3) / 2, abs=1e-8)
    # the penalty pulls phi toward 0
    _, shrunk = fit_length_glm(np.array([1.0, 0.0, 1.0, 0.5]), np.array([1.0, 1.0, -1.0, -1.0]), l2=1.0)
    assert -math.log(3) / 2 < shrunk[0] < 0
    # weights: the second prompt counted twice is the set [1, 0, 0, 1, 0.5]: x = 1 mean 1/3, x = -1 mean 3/4
    theta, phi = fit_length_glm(np.array([1.0, 0.0, 1.0, 0.5]), np.array([1.0, 1.0, -1.0, -1.0]),
                                np.array([[1.0, 2.0, 1.0, 1.0]]), l2=0.0)
    assert theta[0] + phi[0] == pytest.approx(math.log(1 / 2), abs=1e-8)
    assert theta[0] - phi[0] == pytest.approx(math.log(3), abs=1e-8)


def test_lc_win_rate_is_the_fit_at_equal_length():
    """Length differences +-1 (std 1): the same two groups as above, the win rate at x = 0 is sigmoid(ln(3)/2)
    = sqrt(3) / (1 + sqrt(3)) = 0.6340, while the raw win rate is 2.5 / 4 = 0.625."""
    r = length_controlled_win_rate([1.0, 0.0, 1.0, 0.5], [11, 11, 9, 9], [10, 10, 10, 10], n=200, l2=0.0)
    assert r["lc_win_rate"] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-8)
    assert r["length_diff_std"] == pytest.approx(1.0) and r["n"] == 4


def test_lc_win_rate_without_length_differences_is_the_raw_rate():
    """Equal lengths (std 0): no length term, so theta = logit(raw win rate); a model against itself ties
    everywhere: 0.5 exactly, interval included."""
    r = length_controlled_win_rate([1.0, 0.0, 0.5, 1.0], [5] * 4, [5] * 4, n=200)
    assert r["lc_win_rate"] == pytest.approx(0.625, abs=1e-9)
    same = length_controlled_win_rate([0.5] * 30, list(range(30)), list(range(30)))
    assert same["lc_win_rate"] == 0.5 and same["ci95"] == [0.5, 0.5]


def test_lc_win_rate_of_a_perfectly_length_separated_judge_is_finite():
    """Every longer answer wins and every shorter one loses: the unpenalised fit would send phi to infinity."""
    d = np.array([-3, -1, 2, 4, 6, 1, -2, 5])
    r = length_controlled_win_rate((d > 0).astype(float), 20 + d, [20] * len(d), n=200)
    assert math.isfinite(r["phi"]) and r["phi"] > 1 and 0 < r["lc_win_rate"] < 1
    assert all(math.isfinite(x) for x in r["ci95"])


def test_lc_win_rate_removes_a_pure_length_preference():
    """A judge that only prefers the longer answer, P(model wins) = sigmoid(0.3 * word-length difference), and a
    model whose answers are mostly longer: the raw win rate is far above 0.5, at equal length it is ~0.5."""
    rng = np.random.default_rng(0)
    n = 1000
    len_b = rng.integers(10, 40, n)
    len_m = len_b + rng.integers(-4, 20, n)  # longer than the baseline's on 5 prompts in 6
    w = wins(rng.random(n) < sigmoid(0.3 * (len_m - len_b)))
    raw, lc = win_rate(w, n=500), length_controlled_win_rate(w, len_m, len_b, n=500)
    assert raw["win_rate"] > 0.75
    assert abs(lc["lc_win_rate"] - 0.5) < 0.06
    assert lc["ci95"][0] < 0.5 < lc["ci95"][1] and lc["ci95"][1] < raw["ci95"][0]
    assert lc["phi"] > 1  # the fit put the preference on length


def test_lc_win_rate_keeps_a_quality_preference():
    """A judge that prefers the model on 70% of prompts whatever the lengths: LC ~= raw."""
    rng = np.random.default_rng(0)
    n = 1000
    len_b = rng.integers(10, 40, n)
    len_m = len_b + rng.integers(-4, 20, n)
    w = wins(rng.random(n) < 0.7)
    raw, lc = win_rate(w, n=500), length_controlled_win_rate(w, len_m, len_b, n=500)
    assert raw["win_rate"] == pytest.approx(0.7, abs=0.04)
    assert lc["lc_win_rate"] == pytest.approx(raw["win_rate"], abs=0.03)
    assert lc["ci95"][0] < raw["win_rate"] < lc["ci95"][1]


# ---------------------------------------------------------------------------------------------- diversity


def test_distinct_n_by_hand():
    texts = ["The cat sat", "the CAT ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6; bigrams: the-cat cat-sat the-cat cat-ran -> 3 of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)  # the-cat-sat, the-cat-ran
    assert math.isnan(distinct_n(texts, 4))


def test_bleu_clipping_and_brevity_penalty_by_hand():
    the4 = "the the the the".split()
    # "the" 4 times, at most twice in the reference: p1 = 2/4; c = 4 > r = 3, no penalty
    assert bleu(the4, ["the cat the".split()], n=1) == pytest.approx(0.5)
    # clipped by the largest count in any one reference (1), not their sum (2): p1 = 1/2; c = r = 2
    assert bleu("the the".split(), ["the cat".split(), "the dog".split()], n=1) == pytest.approx(0.5)
    # c = 2, reference lengths 4 and 3: the closest is 3, BP = exp(1 - 3/2); p1 = 1
    assert bleu("the cat".split(), ["the cat sat down".split(), "a b c".split()], n=1) == pytest.approx(math.exp(-0.5))
    # lengths 1 and 3 are both 1 away from c = 2: the shorter is r, c > r, no penalty
    assert bleu("the cat".split(), ["cat".split(), "the x y".split()], n=1) == pytest.approx(1.0)
    # no unigram in common: 0, not smoothed
    assert bleu("a b".split(), ["c d".split()], n=2) == 0.0


def test_self_bleu_by_hand():
    texts = ["the cat sat", "the cat ran", "a dog ran"]
    # BLEU-2 of each against the other two (every length 3, BP = 1):
    #   "the cat sat": p1 = 2/3 (the, cat), p2 = 1/2 (the-cat)   -> sqrt(2/3 * 1/2) = 0.577350
    #   "the cat ran": p1 = 3/3, p2 = 1/2 (the-cat)              -> sqrt(1 * 1/2)   = 0.707107
    #   "a dog ran":   p1 = 1/3 (ran), p2 = 0 -> 0.1 / 2 = 0.05  -> sqrt(1/3 * 0.05) = 0.129099
    expected = (math.sqrt(1 / 3) + math.sqrt(1 / 2) + math.sqrt(0.05 / 3)) / 3  # 0.471185
    assert self_bleu(texts, n=2) == pytest.approx(expected)
    assert self_bleu(texts, n=2) == pytest.approx(0.471185, abs=1e-6)
    assert self_bleu(["a b c d e", "A B C D E"]) == pytest.approx(1.0)
    assert math.isnan(self_bleu(["only one"]))


def test_self_bleu_is_the_mean_bleu_against_the_others():
    """The fast path (the two largest counts of each n-gram) agrees with `bleu` against the other texts."""
    rng = np.random.default_rng(0)
    vocab = "a b c d e f".split()
    texts = [" ".join(rng.choice(vocab, size=rng.integers(1, 9))) for _ in range(12)]
    toks = [t.split() for t in texts]
    slow = np.mean([bleu(h, toks[:i] + toks[i + 1:], n=4) for i, h in enumerate(toks)])
    assert self_bleu(texts) == pytest.approx(slow)
    # over the cap: a seeded sample of the texts stands for the set
    sample = self_bleu(texts, max_texts=5, rng_seed=3)
    assert sample == self_bleu(texts, max_texts=5, rng_seed=3) and sample != pytest.approx(slow)


# ---------------------------------------------------------------------------------------------- degenerate answers


def test_garbled_and_repetition():
    assert garbled("the the the the the the", True) and garbled("fine", False)
    assert not garbled("Sorry, I can't help with that.", True)
    assert not garbled("a a a b b", True)  # under 6 words
    assert has_repeated_ngram("a b c d a b c d")  # a-b-c-d twice
    assert not has_repeated_ngram("a b c d e a b c")  # abcd bcde cdea deab eabc
    assert repetition_rate(["a b c d a b c d", "a b c d e a b c"]) == 0.5
    assert math.isnan(repetition_rate([]))


def test_shift_by_position_by_hand():
    # bins of 4; token i of L at i / (L - 1):
    #   [1, 5, 1, 9]  -> bins 0, 1, 2, 3 ; shifted (> 3): no, yes, no, yes
    #   [4]           -> bin 3 (a one-token answer is its end) ; yes
    #   [2, 7, 1]     -> bins 0, 2, 3 ; no, yes, no
    s = shift_by_position([[1, 5, 1, 9], [4], [2, 7, 1]], bins=4)
    assert s["tokens"] == [2, 1, 2, 3]
    assert s["shifted"] == pytest.approx([0.0, 1.0, 0.5, 2 / 3])
    assert s["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert math.isnan(shift_by_position([[1, 9]], bins=3)["shifted"][1])  # nothing in the middle bin
