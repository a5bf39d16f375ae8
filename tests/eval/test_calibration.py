"""Calibration and pairwise accuracy, with hand-worked values."""

import pytest
import torch

from alignkit.eval import expected_calibration_error, pairwise_accuracy, preference_calibration_error, reliability_bins


def test_ece_hand_worked():
    """Bins of width 0.1. Bin [0.1, 0.2): probs 0.1, 0.1, labels 0, 1 -> |0.5 - 0.1| = 0.4, weight 1/2.
    Bin [0.9, 1.0]: probs 0.9, 0.9, labels 1, 1 -> |1 - 0.9| = 0.1, weight 1/2. ECE = 0.2 + 0.05 = 0.25."""
    assert expected_calibration_error([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx(0.25)
    # one bin: |mean label - mean prob| = |0.75 - 0.5|
    assert expected_calibration_error([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1], n_bins=1) == pytest.approx(0.25)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0  # p == 1 falls in the last bin


def test_ece_of_calibrated_and_overconfident_predictions():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200_000, generator=g, dtype=torch.float64)
    labels = torch.rand(200_000, generator=g, dtype=torch.float64) < p  # label 1 with probability p
    assert expected_calibration_error(p, labels) < 0.01
    sharpened = torch.where(p > 0.5, 0.99, 0.01)  # same ranking, overconfident
    assert expected_calibration_error(sharpened, labels) == pytest.approx(0.24, abs=0.01)


def test_pairwise_accuracy_counts_ties_half():
    """(1 > 0) + half a tie (2 == 2) + (3 < 4) wrong = 1.5 / 3."""
    assert pairwise_accuracy([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(0.5)
    assert pairwise_accuracy(torch.zeros(4), torch.zeros(4)) == 0.5


def test_preference_calibration_scores_each_pair_both_ways():
    """Right on 70 of 100 pairs, always 0.99 sure (margin logit(0.99) = 4.595): the ordered pairs
    predicted at 0.99 are won 70% of the time, those at 0.01 30%: ECE = |0.7 - 0.99| = 0.29.
    The one-sided ECE of (p, 1) would instead reward the overconfidence."""
    m = torch.log(torch.tensor(99.0))
    chosen = torch.cat([torch.full((70,), m), torch.zeros(30)])
    rejected = torch.cat([torch.zeros(70), torch.full((30,), m)])
    assert preference_calibration_error(chosen, rejected) == pytest.approx(0.29, abs=1e-6)
    assert preference_calibration_error(torch.zeros(10), torch.zeros(10)) == pytest.approx(0.0)
    # a sure and always-right model is calibrated
    assert preference_calibration_error(torch.full((10,), 30.0), torch.zeros(10)) < 1e-6


def test_reliability_bins_and_input_checks():
    rows = reliability_bins([0.05, 0.95, 0.97], [0, 1, 0], n_bins=2)
    assert [r["count"] for r in rows] == [1, 2] and rows[1]["accuracy"] == 0.5
    assert rows[1]["confidence"] == pytest.approx(0.96)
    with pytest.raises(ValueError, match="same length"):
        expected_calibration_error([0.5, 0.5], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="0/1"):
        expected_calibration_error([0.5], [2])
    with pytest.raises(ValueError, match="non-finite"):
        pairwise_accuracy([float("nan")], [0.0])
    with pytest.raises(ValueError, match="empty"):
        expected_calibration_error([], [])
