"""Distillation divergences: forward KL (KD), reverse KL (MiniLLM), generalised JSD (GKD)."""

import math

import pytest
import torch

from alignkit.losses import aggregate, forward_kl, generalized_jsd, reverse_kl


def dist(*probs):
    """(1, T, V) log-probabilities from T rows of probabilities (float64; a 0 becomes -inf)."""
    return torch.tensor([probs], dtype=torch.float64).log()


# p_T = (1/2, 1/2), p_S = (1/4, 3/4) on a 2-token vocabulary.
TEACHER, STUDENT = dist([0.5, 0.5]), dist([0.25, 0.75])


def test_forward_kl_hand_value():
    """KL(T || S) = 1/2 ln(0.5 / 0.25) + 1/2 ln(0.5 / 0.75) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841."""
    expected = 0.5 * math.log(4 / 3)
    torch.testing.assert_close(forward_kl(STUDENT, TEACHER), torch.tensor([[expected]], dtype=torch.float64))


def test_reverse_kl_hand_value():
    """KL(S || T) = 1/4 ln(0.25 / 0.5) + 3/4 ln(0.75 / 0.5) = -1/4 ln 2 + 3/4 ln(3/2) = 0.130812."""
    expected = -0.25 * math.log(2) + 0.75 * math.log(1.5)
    torch.testing.assert_close(reverse_kl(STUDENT, TEACHER), torch.tensor([[expected]], dtype=torch.float64))


def test_jsd_hand_value_at_one_half():
    """beta = 1/2: M = (3/8, 5/8).
    KL(T || M) = 1/2 ln(0.5 / 0.375) + 1/2 ln(0.5 / 0.625) = 1/2 ln(4/3) + 1/2 ln(4/5) = 1/2 ln(16/15) = 0.032270.
    KL(S || M) = 1/4 ln(0.25 / 0.375) + 3/4 ln(0.75 / 0.625) = 1/4 ln(2/3) + 3/4 ln(6/5) = 0.035375.
    JSD = 1/2 (0.032270 + 0.035375) = 0.033822."""
    kl_t = 0.5 * math.log(16 / 15)
    kl_s = 0.25 * math.log(2 / 3) + 0.75 * math.log(6 / 5)
    got = generalized_jsd(STUDENT, TEACHER, 0.5)
    torch.testing.assert_close(got, torch.tensor([[0.5 * (kl_t + kl_s)]], dtype=torch.float64))


def test_jsd_beta_weighs_the_teacher_hand_value():
    """beta = 1/4 on a 3-token vocabulary, p_T = (1, 0, 0), p_S = (1/2, 1/4, 1/4):
    M = 1/4 p_T + 3/4 p_S = (5/8, 3/16, 3/16).
    KL(T || M) = 1 ln(1 / (5/8)) = ln(8/5).
    KL(S || M) = 1/2 ln((1/2) / (5/8)) + 2 * 1/4 ln((1/4) / (3/16)) = 1/2 ln(4/5) + 1/2 ln(4/3).
    JSD = 1/4 ln(8/5) + 3/4 (1/2 ln(4/5) + 1/2 ln(4/3)) = 0.141703.
    The teacher's zeros add nothing (0 log 0 = 0): finite, where reverse KL is infinite."""
    teacher, student = dist([1.0, 0.0, 0.0]), dist([0.5, 0.25, 0.25])
    expected = 0.25 * math.log(8 / 5) + 0.75 * (0.5 * math.log(4 / 5) + 0.5 * math.log(4 / 3))
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.25), torch.tensor([[expected]], dtype=torch.float64))
    # forward KL = 1 ln(1 / (1/2)) = ln 2; reverse KL puts student mass on tokens the teacher never emits.
    torch.testing.assert_close(forward_kl(student, teacher), torch.tensor([[math.log(2)]], dtype=torch.float64))
    assert reverse_kl(student, teacher).isinf().all()


def random_pair(seed=0, shape=(2, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64).log_softmax(-1),
            torch.randn(*shape, generator=g, dtype=torch.float64).log_softmax(-1))


def test_jsd_swapping_teacher_and_student_swaps_beta():
    """JSD(beta) with the roles swapped is JSD(1 - beta): beta is the teacher's weight."""
    s, t = random_pair()
    for beta in (0.1, 0.3, 0.5):
        torch.testing.assert_close(generalized_jsd(s, t, beta), generalized_jsd(t, s, 1 - beta))
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5))  # symmetric at 1/2
    assert (generalized_jsd(s, t, 0.5) <= math.log(2)).all()  # the JS divergence is at most ln 2


def test_jsd_limits_are_the_two_kls():
    """JSD(beta) / beta -> KL(T || S) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(S || T) as beta -> 1;
    at beta = 0 and 1 exactly it returns those KLs (TRL's endpoints)."""
    s, t = random_pair()
    eps = 1e-6
    torch.testing.assert_close(generalized_jsd(s, t, eps) / eps, forward_kl(s, t), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - eps) / eps, reverse_kl(s, t), rtol=1e-4, atol=1e-8)
    assert torch.equal(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    assert not torch.allclose(forward_kl(s, t), reverse_kl(s, t))  # the two limits differ: the test can fail


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, lambda s, t: generalized_jsd(s, t, 0.3)])
def test_zero_when_equal_and_positive_otherwise(fn):
    s, t = random_pair(seed=1)
    torch.testing.assert_close(fn(s, s.clone()), torch.zeros(2, 3, dtype=torch.float64))
    assert (fn(s, t) > 0).all()


def test_forward_kl_gradient_is_student_minus_teacher_probabilities():
    """d KL(T || S) / d z = p_S - p_T for student logits z: (1/4 - 1/2, 3/4 - 1/2) = (-1/4, 1/4)."""
    z = torch.tensor([[[0.0, math.log(3)]]], dtype=torch.float64, requires_grad=True)  # softmax = (1/4, 3/4)
    forward_kl(z.log_softmax(-1), TEACHER).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([[[-0.25, 0.25]]], dtype=torch.float64))


def test_reverse_kl_and_jsd_gradients():
    """Reverse KL: d KL(S || T) / d z_j = p_S,j (log p_S,j - log p_T,j - KL(S || T)). JSD: autograd agrees
    with finite differences, and the gradient at p_S = p_T is 0 (a minimum)."""
    s, t = random_pair(seed=2)
    z = s.clone().requires_grad_(True)
    kl = reverse_kl(z.log_softmax(-1), t)
    kl.sum().backward()
    torch.testing.assert_close(z.grad, s.exp() * (s - t - kl.detach()[..., None]))
    z = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: generalized_jsd(x.log_softmax(-1), t, 0.3), (z,))
    generalized_jsd(z.log_softmax(-1), s, 0.3).sum().backward()
    torch.testing.assert_close(z.grad, torch.zeros_like(z))


def test_masked_positions_are_left_out_by_aggregate():
    """Position 0 is the hand case (forward KL 1/2 ln(4/3)); position 1 (p_T = (1, 0), p_S = (0, 1): infinite
    forward KL) is masked out. Token mean = 1/2 ln(4/3); with a global denominator of 2 tokens, half of it."""
    teacher, student = dist([0.5, 0.5], [1.0, 0.0]), dist([0.25, 0.75], [0.0, 1.0])
    per_token = forward_kl(student, teacher)  # (1, 2)
    assert per_token[0, 1].isinf()
    mask = torch.tensor([[1, 0]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(0.5 * math.log(4 / 3))
    assert aggregate(per_token, mask, "token_mean", denominator=2).item() == pytest.approx(0.25 * math.log(4 / 3))


def test_bad_inputs_are_errors():
    s, t = random_pair()
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(s, t, 1.5)
    with pytest.raises(ValueError, match="one shape"):
        forward_kl(s, t[..., :4])
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        reverse_kl(s[0], t[0])


def test_bfloat16_inputs_are_computed_in_float32():
    s, t = random_pair()
    got = forward_kl(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, forward_kl(s.bfloat16().double(), t.bfloat16().double()).float())
