"""Truncated importance sampling weights (Yao et al. 2025), by hand."""

import math

import pytest
import torch

import alignkit.losses as L


def test_weights_by_hand():
    # ratios exp(old - engine): e^0.5 = 1.6487, e^-1 = 0.3679, e^1 = 2.7183 (capped to 2), masked, e^2 (capped)
    old = torch.tensor([[0.0, -2.0, -1.0, 5.0], [-1.0, 0.0, 0.0, 0.0]])
    engine = torch.tensor([[-0.5, -1.0, -2.0, 0.0], [-3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    w, m = L.truncated_importance_weights(old, engine, mask, cap=2.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(w, expected)
    assert m["weight_mean"].item() == pytest.approx((math.exp(0.5) + math.exp(-1.0) + 2.0 + 2.0) / 4)
    assert m["capped_frac"].item() == pytest.approx(2 / 4)


def test_weights_carry_no_gradient_and_equal_logps_give_one():
    old = torch.randn(3, 5, requires_grad=True)
    w, m = L.truncated_importance_weights(old, old.detach().clone(), torch.ones(3, 5), cap=2.0)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.ones(3, 5))
    assert m["capped_frac"].item() == 0.0


def test_contract_and_errors():
    assert "truncated_importance_weights" in L.__all__
    with pytest.raises(ValueError, match="cap must be > 0"):
        L.truncated_importance_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), cap=0.0)
    with pytest.raises(ValueError, match="one shape"):
        L.truncated_importance_weights(torch.zeros(1, 2), torch.zeros(2), torch.ones(1, 2), cap=2.0)
