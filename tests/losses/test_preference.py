"""Bradley-Terry, the DPO family (sigmoid/cDPO, robust, hinge, IPO, LN-DPO, SimPO) and KTO."""

import math

import pytest
import torch

from alignkit.losses import (
    DPO_VARIANTS,
    bradley_terry_loss,
    chosen_nll,
    dpo_loss,
    kto_loss,
    length_normalized_dpo_loss,
    simpo_loss,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def softplus(x):
    """-log sigmoid(-x) = log(1 + e^x), written out for the hand values."""
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --- Bradley-Terry --------------------------------------------------------------------------


def test_bradley_terry_hand_values():
    """r_c = (2, 0), r_r = (0, 0): -log sigmoid(2) = log(1 + e^-2) = 0.126928;
    -log sigmoid(0) = log 2 = 0.693147.
    margin 1: -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(-1) = log(1 + e) = 1.313262."""
    chosen, rejected = t(2, 0), t(0, 0)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), t(softplus(-2), math.log(2)))
    expected = t(softplus(-1), softplus(1))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=1.0), expected)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=t(1, 1)), expected)


def test_bradley_terry_is_stable_for_large_gaps():
    out = bradley_terry_loss(t(-1000.0, 1000.0), t(0.0, 0.0))
    torch.testing.assert_close(out, t(1000.0, 0.0))


def test_bradley_terry_rejects_a_column_vector():
    """(B, 1) - (B,) would broadcast to (B, B) and silently average the wrong pairs."""
    with pytest.raises(ValueError, match="chosen_rewards"):
        bradley_terry_loss(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(4), torch.zeros(4), margin=torch.zeros(4, 1))


def test_bradley_terry_gradcheck():
    torch.manual_seed(0)
    c, r, m = (torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(bradley_terry_loss, (c, r))
    assert torch.autograd.gradcheck(bradley_terry_loss, (c, r, m))


# --- DPO ------------------------------------------------------------------------------------

# Row 0: h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2, z = beta h = 0.5 * 2 = 1.
# Row 1: h = (-5 - -5) - (-4 - -4) = 0, z = 0.
PC, PR, RC, RR = t(-1, -5), t(-3, -4), t(-2, -5), t(-2, -4)
BETA = 0.5


def test_dpo_sigmoid_hand_values_and_rewards():
    """-log sigmoid(1) = log(1 + e^-1) = 0.313262;  -log sigmoid(0) = log 2.
    chosen rewards beta (pi_c - ref_c) = 0.5 * (1, 0) = (0.5, 0);
    rejected rewards 0.5 * (-1, 0) = (-0.5, 0)."""
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=BETA)
    torch.testing.assert_close(losses, t(softplus(-1), math.log(2)))
    torch.testing.assert_close(chosen, t(0.5, 0))
    torch.testing.assert_close(rejected, t(-0.5, 0))


def test_conservative_dpo_hand_values():
    """eps = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.313262 + 0.1 * 1.313262
    = 0.281936 + 0.131326 = 0.413262;  row 1: (0.9 + 0.1) log 2 = log 2."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, BETA, "sigmoid", 0.1)
    torch.testing.assert_close(losses, t(0.9 * softplus(-1) + 0.1 * softplus(1), math.log(2)))
    torch.testing.assert_close(losses[0], torch.tensor(0.4132617, dtype=torch.float64))


def test_robust_dpo_hand_values():
    """eps = 0.1: (0.9 * 0.313262 - 0.1 * 1.313262) / (1 - 0.2) = (0.281936 - 0.131326) / 0.8
    = 0.150609 / 0.8 = 0.188262;  row 1: (0.9 - 0.1) log 2 / 0.8 = log 2."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, BETA, "robust", 0.1)
    torch.testing.assert_close(losses, t((0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8, math.log(2)))
    torch.testing.assert_close(losses[0], torch.tensor(0.1882617, dtype=torch.float64))


def test_hinge_and_ipo_hand_values():
    """hinge: relu(1 - z) = (relu(0), relu(1)) = (0, 1).
    ipo: (h - 1/(2 beta))^2 = (h - 1)^2 = ((2 - 1)^2, (0 - 1)^2) = (1, 1)."""
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, BETA, "hinge")[0], t(0, 1))
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, BETA, "ipo")[0], t(1, 1))
    # beta = 0.25: target 1/(2 * 0.25) = 2, so row 0 (h = 2) has zero loss, row 1 (h = 0) has 4.
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, 0.25, "ipo")[0], t(0, 4))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_policy_equal_to_reference(beta):
    """h = 0 for every pair: sigmoid / cDPO / robust give log 2, hinge 1, IPO 1/(4 beta^2)."""
    torch.manual_seed(1)
    pc, pr = -torch.rand(6, dtype=torch.float64) * 50, -torch.rand(6, dtype=torch.float64) * 50
    log2 = torch.full((6,), math.log(2), dtype=torch.float64)
    torch.testing.assert_close(dpo_loss(pc, pr, pc, pr, beta)[0], log2)
    torch.testing.assert_close(dpo_loss(pc, pr, pc, pr, beta, "sigmoid", 0.2)[0], log2)
    torch.testing.assert_close(dpo_loss(pc, pr, pc, pr, beta, "robust", 0.2)[0], log2)
    torch.testing.assert_close(dpo_loss(pc, pr, pc, pr, beta, "hinge")[0], torch.ones_like(pc))
    torch.testing.assert_close(dpo_loss(pc, pr, pc, pr, beta, "ipo")[0], torch.full_like(pc, 1 / (4 * beta**2)))


def test_dpo_rewards_are_detached():
    pc = t(-1.0, -2.0).requires_grad_()
    losses, chosen, rejected = dpo_loss(pc, t(-3, -3), t(-2, -2), t(-2, -2))
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_dpo_argument_errors():
    x = t(0, 0)
    with pytest.raises(ValueError, match="sigmoid, robust, hinge, ipo"):
        dpo_loss(x, x, x, x, variant="kto")
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(x, x, x, x[:, None])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, variant="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, variant="ipo", label_smoothing=0.1)


@pytest.mark.parametrize("variant,eps", [(v, 0.0) for v in DPO_VARIANTS] + [("sigmoid", 0.1), ("robust", 0.1)])
def test_dpo_gradcheck(variant, eps):
    torch.manual_seed(2)
    inputs = tuple(-torch.rand(6, dtype=torch.float64, requires_grad=True) * 10 for _ in range(4))
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, 0.3, variant, eps)[0], inputs)


# --- Length-normalised DPO ------------------------------------------------------------------


def test_length_normalized_dpo_hand_values():
    """Row 0: chosen (-4 - -6)/2 = 1, rejected (-9 - -6)/3 = -1; beta = 1:
    -log sigmoid(1 - (-1)) = log(1 + e^-2) = 0.126928; rewards (1, -1).
    Row 1: both log-ratios 0 -> log 2, rewards (0, 0)."""
    losses, chosen, rejected = length_normalized_dpo_loss(
        t(-4, -3), t(-9, -2), t(-6, -3), t(-6, -2), t(2, 5), t(3, 5), 1.0
    )
    torch.testing.assert_close(losses, t(softplus(-2), math.log(2)))
    torch.testing.assert_close(chosen, t(1, 0))
    torch.testing.assert_close(rejected, t(-1, 0))
    assert not chosen.requires_grad


def test_length_normalized_dpo_is_length_scale_invariant_and_dpo_is_not():
    """Repeating every response k times multiplies logps and lengths by k: LN-DPO unchanged
    (k/k cancels), plain DPO's log-ratio gap grows k-fold."""
    torch.manual_seed(3)
    pc, pr, rc, rr = (-torch.rand(5, dtype=torch.float64) * 20 for _ in range(4))
    lc, lr = torch.randint(1, 50, (5,)), torch.randint(1, 50, (5,))
    k = 3
    base = length_normalized_dpo_loss(pc, pr, rc, rr, lc, lr, 2.0)[0]
    scaled = length_normalized_dpo_loss(k * pc, k * pr, k * rc, k * rr, k * lc, k * lr, 2.0)[0]
    torch.testing.assert_close(scaled, base)
    assert not torch.allclose(dpo_loss(k * pc, k * pr, k * rc, k * rr)[0], dpo_loss(pc, pr, rc, rr)[0])


def test_length_normalized_dpo_with_equal_lengths_is_dpo_with_beta_over_length():
    torch.manual_seed(4)
    pc, pr, rc, rr = (-torch.rand(4, dtype=torch.float64) * 20 for _ in range(4))
    n = torch.full((4,), 8)
    ln = length_normalized_dpo_loss(pc, pr, rc, rr, n, n, 4.0)[0]
    torch.testing.assert_close(ln, dpo_loss(pc, pr, rc, rr, beta=4.0 / 8)[0])


def test_length_normalized_dpo_gradcheck():
    torch.manual_seed(5)
    inputs = tuple(-torch.rand(6, dtype=torch.float64, requires_grad=True) * 10 for _ in range(4))
    lc, lr = torch.randint(1, 20, (6,)), torch.randint(1, 20, (6,))
    assert torch.autograd.gradcheck(lambda *x: length_normalized_dpo_loss(*x, lc, lr, 3.0)[0], inputs)


# --- SimPO ----------------------------------------------------------------------------------


def test_simpo_hand_values():
    """beta = 2, gamma = 0.5.
    Row 0: 2 * (-2/2) - 2 * (-6/3) - 0.5 = -2 + 4 - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.201413.
    Row 1: 2 * (-3/3) - 2 * (-3/3) - 0.5 = -0.5 -> log(1 + e^0.5) = 0.974077."""
    out = simpo_loss(t(-2, -3), t(-6, -3), t(2, 3), t(3, 3))
    torch.testing.assert_close(out, t(softplus(-1.5), softplus(0.5)))


def test_simpo_is_length_scale_invariant():
    torch.manual_seed(6)
    pc, pr = -torch.rand(5, dtype=torch.float64) * 30, -torch.rand(5, dtype=torch.float64) * 30
    lc, lr = torch.randint(1, 40, (5,)), torch.randint(1, 40, (5,))
    torch.testing.assert_close(simpo_loss(4 * pc, 4 * pr, 4 * lc, 4 * lr), simpo_loss(pc, pr, lc, lr))


def test_simpo_shape_error_and_gradcheck():
    with pytest.raises(ValueError, match="chosen_lengths"):
        simpo_loss(t(0, 0), t(0, 0), t(1, 1, 1), t(1, 1))
    torch.manual_seed(7)
    pc, pr = (-torch.rand(6, dtype=torch.float64, requires_grad=True) * 10 for _ in range(2))
    lc, lr = torch.randint(1, 20, (6,)), torch.randint(1, 20, (6,))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, lc, lr, 2.5, 0.3), (pc, pr))


def test_chosen_nll_hand_values():
    """-logp / |y|: -(-6)/3 = 2; an empty response (logp 0, length 0) gives 0, not 0/0."""
    torch.testing.assert_close(chosen_nll(t(-6, 0), t(3, 0)), t(2, 0))
    with pytest.raises(ValueError, match="chosen_lengths"):
        chosen_nll(t(-1, -2), t(1, 1, 1))


# --- KTO ------------------------------------------------------------------------------------


def test_kto_hand_values():
    """beta = 0.5, z0 = 0.5, r = policy - ref = (1, 1, -1), labels (desirable, undesirable, undesirable).
    Row 0: 1 - sigmoid(0.5 (1 - 0.5))  = 1 - sigmoid(0.25) = 0.437824.
    Row 1: 1 - sigmoid(0.5 (0.5 - 1))  = 1 - sigmoid(-0.25) = 0.562177.
    Row 2: 1 - sigmoid(0.5 (0.5 + 1))  = 1 - sigmoid(0.75) = 0.320821.
    Weights (desirable 2, undesirable 0.5): (0.875647, 0.281088, 0.160411)."""
    policy, ref, labels = t(-1, -1, -3), t(-2, -2, -2), torch.tensor([True, False, False])
    out = kto_loss(policy, ref, labels, 0.5, beta=0.5)
    expected = t(1 - sigmoid(0.25), 1 - sigmoid(-0.25), 1 - sigmoid(0.75))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, t(0.4378235, 0.5621765, 0.3208213))
    weighted = kto_loss(policy, ref, labels, 0.5, 0.5, 2.0, 0.5)
    torch.testing.assert_close(weighted, expected * t(2, 0.5, 0.5))


def test_kto_reference_point_is_clamped_and_detached():
    """z0 = -1 is clamped to 0: row 0 gives 1 - sigmoid(0.5 * 1) = 0.377541. No gradient
    reaches kl_reference."""
    z0 = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    policy = t(-1.0).requires_grad_()
    out = kto_loss(policy, t(-2), torch.tensor([1]), z0, beta=0.5)
    torch.testing.assert_close(out, t(1 - sigmoid(0.5)))
    out.sum().backward()
    assert z0.grad is None and policy.grad is not None


def test_kto_gradcheck():
    torch.manual_seed(8)
    p, r = (-torch.rand(6, dtype=torch.float64, requires_grad=True) * 10 for _ in range(2))
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    assert torch.autograd.gradcheck(lambda a, b: kto_loss(a, b, labels, 0.3, 0.2, 1.0, 1.5), (p, r))
