"""Pairwise accuracy and calibration of preference predictions.

A reward model (or DPO's implicit reward) predicts P(a beats b) = sigmoid(r_a - r_b), the
Bradley-Terry probability (Ouyang et al. 2022, eq. 1; the notes, §13.4.1). Accuracy asks
whether the chosen answer gets the higher score; calibration asks whether the predicted
probabilities mean what they say: of the pairs predicted at 0.8, about 80% should be won.

Expected calibration error (Naeini et al. 2015; Guo et al. 2017, "On calibration of modern neural
networks", eq. 3): split [0, 1] into equal-width bins and average |accuracy - confidence| over
the bins, weighted by the fraction of predictions in each bin.
"""

from __future__ import annotations

import torch

__all__ = ["expected_calibration_error", "pairwise_accuracy", "preference_calibration_error", "reliability_bins"]


def _as_1d(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values (first at index {int((~torch.isfinite(t)).nonzero()[0])})")
    return t


def reliability_bins(probs, labels, n_bins: int = 10) -> list[dict]:
    """Per-bin rows of a reliability diagram: bin edges, count, mean predicted probability
    (`confidence`) and observed frequency of label 1 (`accuracy`). Empty bins are included with
    count 0 (and None for the means). Bin k holds lo <= p < hi; p == 1 falls in the last bin."""
    p, y = _as_1d(probs, "probs"), _as_1d(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"probs {tuple(p.shape)} and labels {tuple(y.shape)} must have the same length")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probs must lie in [0, 1]")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0/1 (or booleans)")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    which = (p * n_bins).long().clamp(max=n_bins - 1)  # (N,) bin index
    rows = []
    for k in range(n_bins):
        m = which == k
        n = int(m.sum())
        rows.append({"lo": k / n_bins, "hi": (k + 1) / n_bins, "count": n,
                     "confidence": float(p[m].mean()) if n else None,
                     "accuracy": float(y[m].mean()) if n else None})
    return rows


def expected_calibration_error(probs, labels, n_bins: int = 10) -> float:
    """ECE of binary predictions: ``sum_k (n_k / N) |mean(labels in k) - mean(probs in k)|``.

    Args:
        probs: (N,) predicted probabilities that the label is 1, in [0, 1].
        labels: (N,) 0/1 outcomes.
        n_bins: equal-width bins over [0, 1].

    Returns:
        ECE in [0, 1] as a float; 0 = perfectly calibrated at the resolution of the bins.
    """
    rows = reliability_bins(probs, labels, n_bins)
    total = sum(r["count"] for r in rows)
    return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])


def pairwise_accuracy(chosen_scores, rejected_scores) -> float:
    """Fraction of pairs whose chosen score is above the rejected one; a tie counts as half (the
    expected accuracy of breaking it at random), so identical scores give 0.5, not 0."""
    c, r = _as_1d(chosen_scores, "chosen_scores"), _as_1d(rejected_scores, "rejected_scores")
    if c.shape != r.shape:
        raise ValueError(f"chosen_scores {tuple(c.shape)} and rejected_scores {tuple(r.shape)} differ in length")
    return float(((c > r).double() + 0.5 * (c == r).double()).mean())


def preference_calibration_error(chosen_scores, rejected_scores, n_bins: int = 10) -> float:
    """ECE of P(chosen wins) = sigmoid(s_c - s_r) on preference pairs.

    In preference data the label is always "chosen wins", so the plain ECE of (p, 1) would be
    1 - mean(p), minimised by pushing every p to 1 whatever the truth. The order in which a pair
    is presented is arbitrary, so each pair is scored both ways: (p, 1) and (1 - p, 0). Of the
    ordered pairs predicted at 0.8, 80% should then be wins; a model that is right 70% of the
    time but always says 0.99 gets an ECE near 0.29.
    """
    c, r = _as_1d(chosen_scores, "chosen_scores"), _as_1d(rejected_scores, "rejected_scores")
    if c.shape != r.shape:
        raise ValueError(f"chosen_scores {tuple(c.shape)} and rejected_scores {tuple(r.shape)} differ in length")
    p = torch.sigmoid(c - r)  # (N,)
    probs = torch.cat([p, 1 - p])  # (2N,)
    labels = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2N,)
    return expected_calibration_error(probs, labels, n_bins)
