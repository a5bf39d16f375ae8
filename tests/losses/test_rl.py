"""KL estimators, GAE, whitening, PPO policy/value losses, GRPO / Dr. GRPO / RLOO advantages."""

import math
import statistics

import pytest
import torch

from alignkit.losses import (
    gae,
    group_advantages,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- KL estimators --------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    """d = logp - ref = 1 then -1.
    k1 = d = (1, -1).  k2 = d^2 / 2 = (0.5, 0.5).
    k3 = exp(-d) + d - 1 = (e^-1 + 0, e^1 - 2) = (0.367879, 0.718282)."""
    logps, ref = t([-1.0, -3.0]), t([-2.0, -2.0])
    torch.testing.assert_close(kl_penalty(logps, ref, "k1"), t([1.0, -1.0]))
    torch.testing.assert_close(kl_penalty(logps, ref, "k2"), t([0.5, 0.5]))
    torch.testing.assert_close(kl_penalty(logps, ref, "k3"), t([math.exp(-1), math.e - 2]))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_are_zero_when_policy_equals_reference(estimator):
    logps = -torch.rand(3, 7, dtype=torch.float64) * 5
    assert (kl_penalty(logps, logps.clone(), estimator) == 0).all()


def test_k1_and_k3_estimate_the_true_kl():
    """Samples from p = (0.5, 0.3, 0.2) against q = (0.2, 0.3, 0.5):
    KL(p || q) = 0.5 ln 2.5 + 0.3 ln 1 + 0.2 ln 0.4 = 0.3 ln 2.5 = 0.274887.
    k1 and k3 are unbiased, so their sample means match it; k3 is never negative."""
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logps, ref = p.log()[y][None], q.log()[y][None]
    true_kl = 0.3 * math.log(2.5)
    assert abs(kl_penalty(logps, ref, "k1").mean().item() - true_kl) < 0.01
    k3 = kl_penalty(logps, ref, "k3")
    assert abs(k3.mean().item() - true_kl) < 0.01 and (k3 >= 0).all()


def test_kl_penalty_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="ref_logps"):
        kl_penalty(x, x[:, :2], "k1")


# --- GAE ------------------------------------------------------------------------------------


def test_gae_hand_values():
    """Row 0: mask (1, 1, 0), gamma 1, lam 0.5; the masked reward 9 and value 7 are ignored.
      t=1 (last): delta = 1 + 1*0 - 0.2 = 0.8 (value after the end is 0); A = 0.8
      t=0: delta = 0 + 1*0.2 - 0.5 = -0.3; A = -0.3 + 1*0.5*0.8 = 0.1
      returns = A + V = (0.6, 1.0, 0).
    """
    adv, ret = gae(t([0, 1, 9]), t([0.5, 0.2, 7]), torch.tensor([[1, 1, 0]]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, t([0.1, 0.8, 0]))
    torch.testing.assert_close(ret, t([0.6, 1.0, 0]))


def test_gae_hand_values_with_discount():
    """mask (1, 1, 1), rewards (1, 0, 2), values (0, 1, 0.5), gamma 0.5, lam 1:
      t=2: delta = 2 - 0.5 = 1.5;               A = 1.5
      t=1: delta = 0 + 0.5*0.5 - 1 = -0.75;     A = -0.75 + 0.5*1.5 = 0
      t=0: delta = 1 + 0.5*1 - 0 = 1.5;         A = 1.5 + 0.5*0 = 1.5
      returns = (1.5, 1, 2) = discounted reward-to-go (1 + 0.5*1, 0 + 0.5*2, 2)."""
    adv, ret = gae(t([1, 0, 2]), t([0, 1, 0.5]), torch.ones(1, 3), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, t([1.5, 0, 1.5]))
    torch.testing.assert_close(ret, t([1.5, 1, 2]))


def right_padded(lengths, T):
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


def test_gae_with_lam_1_gamma_1_is_reward_to_go_minus_values():
    torch.manual_seed(0)
    mask = right_padded([6, 3, 1, 5], 6)
    rewards, values = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    kept = rewards * mask
    reward_to_go = kept.flip(-1).cumsum(-1).flip(-1)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, (reward_to_go - values) * mask)
    torch.testing.assert_close(ret, reward_to_go * mask)


def test_gae_matches_the_explicit_sum_of_discounted_deltas():
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V past the end = 0."""
    torch.manual_seed(1)
    gamma, lam, lengths, T = 0.9, 0.8, [5, 2, 4], 5
    rewards, values = torch.randn(3, T, dtype=torch.float64), torch.randn(3, T, dtype=torch.float64)
    adv, _ = gae(rewards, values, right_padded(lengths, T), gamma=gamma, lam=lam)
    expected = torch.zeros(3, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]
        delta = [rewards[b, s].item() + gamma * v[s + 1] - v[s] for s in range(n)]
        for s in range(n):
            expected[b, s] = sum((gamma * lam) ** k * delta[s + k] for k in range(n - s))
    torch.testing.assert_close(adv, expected)


def test_gae_with_a_masked_prompt_prefix_equals_the_response_alone():
    torch.manual_seed(2)
    rewards, values = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    adv, ret = gae(rewards, values, torch.ones(1, 4), lam=0.9)
    pad = torch.zeros(1, 3, dtype=torch.float64)
    adv2, ret2 = gae(
        torch.cat([pad + 5, rewards, pad], 1),
        torch.cat([pad + 5, values, pad], 1),
        torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0, 0]]),
        lam=0.9,
    )
    torch.testing.assert_close(adv2[:, 3:7], adv)
    torch.testing.assert_close(ret2[:, 3:7], ret)
    assert (adv2[:, :3] == 0).all() and (adv2[:, 7:] == 0).all()


def test_gae_rejects_holes_in_the_mask_and_needs_no_grad():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="contiguous"):
        gae(x, x, torch.tensor([[1, 0, 1, 0]]))
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


# --- whiten ---------------------------------------------------------------------------------


def test_whiten_hand_values():
    """Masked entries (1, 2, 3): mean 2, unbiased var ((-1)^2 + 0 + 1^2) / (3 - 1) = 1.
    whiten: (-1, 0, 1) and 0 at the masked-out position; shift_mean=False adds the mean back:
    (1, 2, 3, 0)."""
    x, mask = t([1, 2, 3, 10]), torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(whiten(x, mask), t([-1, 0, 1, 0]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), t([1, 2, 3, 0]))


def test_whiten_matches_std_of_the_selected_entries():
    torch.manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64) * 3 + 1
    mask = torch.rand(4, 6) > 0.4
    sel = x[mask]
    expected = torch.where(mask, (x - sel.mean()) / sel.std(), 0.0)  # torch.std is unbiased
    torch.testing.assert_close(whiten(x, mask), expected)


def test_whiten_degenerate_masks_give_zeros_not_nan():
    x = torch.randn(2, 3)
    assert (whiten(x, torch.zeros(2, 3)) == 0).all()
    one = torch.zeros(2, 3)
    one[0, 1] = 1
    assert (whiten(x, one) == 0).all()


# --- PPO policy loss ------------------------------------------------------------------------


def test_ppo_policy_loss_hand_values():
    """eps = 0.2, old_logps = 0, ratios r = (1.5, 0.5, 1.5, 0.5), A = (1, 1, -1, -1).
      t0: -min(1.5*1, 1.2*1)       = -1.2  (clipped branch active)
      t1: -min(0.5*1, 0.8*1)       = -0.5
      t2: -min(1.5*-1, 1.2*-1)     =  1.5
      t3: -min(0.5*-1, 0.8*-1)     =  0.8  (clipped branch active)
    clip_frac = 2/4. approx_kl = mean of (r - 1) - ln r:
      r=1.5: 0.5 - 0.405465 = 0.094535; r=0.5: -0.5 + 0.693147 = 0.193147; mean 0.143841."""
    logps = t([math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)])
    loss, metrics = ppo_policy_loss(logps, torch.zeros_like(logps), t([1, 1, -1, -1]), torch.ones(1, 4))
    torch.testing.assert_close(loss, t([-1.2, -0.5, 1.5, 0.8]))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(0.5, dtype=torch.float64))
    expected_kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl, dtype=torch.float64))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(1.0, dtype=torch.float64))


def test_ppo_clip_higher():
    """clip_eps_high = 0.6 (DAPO): t0's ratio 1.5 is inside [0.8, 1.6], so the loss is -1.5
    and only t3 stays clipped: clip_frac 1/4."""
    logps = t([math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)])
    loss, metrics = ppo_policy_loss(
        logps, torch.zeros_like(logps), t([1, 1, -1, -1]), torch.ones(1, 4), 0.2, 0.6
    )
    torch.testing.assert_close(loss, t([-1.5, -0.5, 1.5, 0.8]))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(0.25, dtype=torch.float64))


def test_ppo_ratio_one_gives_minus_advantage():
    """logps == old_logps: r = 1, loss = -A on masked tokens (0 elsewhere), nothing clipped,
    approx_kl 0. Sequence-level (B,) advantages broadcast over T."""
    torch.manual_seed(4)
    logps = -torch.rand(3, 5, dtype=torch.float64)
    mask = right_padded([5, 2, 4], 5)
    seq_adv = torch.randn(3, dtype=torch.float64)
    loss, metrics = ppo_policy_loss(logps, logps.clone(), seq_adv, mask)
    torch.testing.assert_close(loss, -seq_adv[:, None].expand(3, 5) * mask)
    assert metrics["clip_frac"].item() == 0 and metrics["approx_kl"].item() == 0
    token_adv = seq_adv[:, None].expand(3, 5).contiguous()
    torch.testing.assert_close(ppo_policy_loss(logps, logps.clone(), token_adv, mask)[0], loss)


def test_ppo_masked_positions_are_zero_and_excluded_from_metrics():
    """Position 1 is masked: its ratio 3 would be clipped but does not count."""
    logps = t([0.0, math.log(3)])
    loss, metrics = ppo_policy_loss(logps, torch.zeros(1, 2), t([1.0, 1.0]), torch.tensor([[1, 0]]))
    torch.testing.assert_close(loss, t([-1.0, 0.0]))
    assert metrics["clip_frac"].item() == 0
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_ppo_policy_loss_gradcheck():
    """Log-ratios drawn in +-0.5 and kept 0.02 away from the clip edges ln 0.8, ln 1.2, where
    the loss has kinks."""
    torch.manual_seed(5)
    old = -torch.rand(3, 6, dtype=torch.float64)
    d = torch.rand(3, 6, dtype=torch.float64) - 0.5
    for edge in (math.log(0.8), math.log(1.2)):
        d = torch.where((d - edge).abs() < 0.02, d + 0.05, d)
    logps = (old + d).requires_grad_()
    adv = torch.randn(3, 6, dtype=torch.float64)
    mask = right_padded([6, 4, 5], 6)
    assert torch.autograd.gradcheck(lambda x: ppo_policy_loss(x, old, adv, mask)[0], (logps,))
    assert torch.autograd.gradcheck(lambda x: ppo_policy_loss(x, old, adv[:, 0], mask, 0.2, 0.28)[0], (logps,))


def test_ppo_policy_loss_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, torch.zeros(2, 1), x)
    with pytest.raises(ValueError, match="old_logps"):
        ppo_policy_loss(x, x[:, :2], torch.zeros(2), x)


# --- PPO value loss -------------------------------------------------------------------------


def test_ppo_value_loss_hand_values():
    """eps = 0.2.
    pos 0: v = 1, v_old = 0.5, R = 2: (1 - 2)^2 = 1; clipped v = 0.5 + 0.2 = 0.7, (0.7 - 2)^2 = 1.69;
           0.5 * max(1, 1.69) = 0.845.
    pos 1: v = 0, v_old = 0.5, R = 0: 0; clipped v = 0.5 - 0.2 = 0.3, 0.09; 0.5 * 0.09 = 0.045.
    pos 2: v = 3, v_old = 3, R = 1: both (3 - 1)^2 = 4 -> 2.
    pos 3 masked -> 0."""
    out = ppo_value_loss(t([1, 0, 3, 8]), t([0.5, 0.5, 3, 0]), t([2, 0, 1, 0]), torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(out, t([0.845, 0.045, 2.0, 0.0]))


def test_ppo_value_loss_shape_error():
    with pytest.raises(ValueError, match="returns"):
        ppo_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3))


# --- Group advantages -----------------------------------------------------------------------


def test_group_advantages_hand_values():
    """G = 4. Group 1 rewards (1, 0, 0, 1): mean 0.5, unbiased var 4 * 0.25 / 3 = 1/3,
    std 0.577350; A = +-0.5 / 0.577350 = +-0.866025. Group 2 is constant (2, 2, 2, 2): A = 0.
    Without std (Dr. GRPO): (0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0)."""
    rewards = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2])
    a = math.sqrt(3) / 2
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(
        group_advantages(rewards, 4, normalize_std=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    )


def test_group_advantages_match_statistics_module():
    torch.manual_seed(6)
    rewards = torch.randn(12, dtype=torch.float64)
    expected = []
    for g in range(3):
        group = rewards[4 * g : 4 * g + 4].tolist()
        mu, sd = statistics.mean(group), statistics.stdev(group)
        expected += [(r - mu) / (sd + 1e-6) for r in group]
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("normalize_std", [True, False])
def test_constant_group_has_zero_advantage(normalize_std):
    out = group_advantages(torch.tensor([3.0] * 5 + [-1.0] * 5), 5, normalize_std)
    assert (out == 0).all()


def test_group_size_errors():
    for fn in (group_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="divisible"):
            fn(torch.zeros(7), 4)
        with pytest.raises(ValueError, match="group_size"):
            fn(torch.zeros(4), 1)
        with pytest.raises(ValueError, match=r"\(B,\)"):
            fn(torch.zeros(4, 1), 2)


def test_rloo_hand_values():
    """G = 4, rewards (1, 0, 0, 1): A_0 = 1 - (0 + 0 + 1)/3 = 2/3, A_1 = 0 - (1 + 0 + 1)/3 = -2/3,
    so (2/3, -2/3, -2/3, 2/3). Group (5, 5, 5, 5): 0."""
    out = rloo_advantages(torch.tensor([1.0, 0, 0, 1, 5, 5, 5, 5]), 4)
    torch.testing.assert_close(out, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))


def test_rloo_is_mean_centred_advantage_times_g_over_g_minus_1():
    torch.manual_seed(7)
    rewards = torch.randn(15, dtype=torch.float64)
    torch.testing.assert_close(
        rloo_advantages(rewards, 5), group_advantages(rewards, 5, normalize_std=False) * 5 / 4
    )


def test_reinforce_pp_hand_values():
    from alignkit.losses import reinforce_pp_advantages

    r = torch.tensor([1.0, 3.0, 0.0, 0.0])  # groups of 2: centred c = [-1, 1, 0, 0]
    # batch mean 0, unbiased std sqrt(2/3): A = c / sqrt(2/3)
    got = reinforce_pp_advantages(r, 2, eps=0.0)
    assert torch.allclose(got, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / math.sqrt(2 / 3))
    # without the group baseline: c = r, mean 1, std sqrt(2) (sum of squares 0+4+1+1 = 6, / 3)
    got = reinforce_pp_advantages(r, 2, subtract_group_mean=False, eps=0.0)
    assert torch.allclose(got, (r - 1.0) / math.sqrt(2.0))
    # a shard normalised with the global batch's statistics
    got = reinforce_pp_advantages(r[:2], 2, batch_mean=0.0, batch_std=2.0, eps=0.0)
    assert torch.allclose(got, torch.tensor([-0.5, 0.5]))


def test_sequence_level_ratio_is_gspo():
    # one sequence, two real tokens with log-ratios 0.2 and -0.6, a padded third: s = exp(-0.2) for both tokens
    logps = torch.tensor([[0.2, -0.6, 5.0]])
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    loss, m = ppo_policy_loss(logps, old, torch.tensor([1.0]), mask, clip_eps=0.1, ratio_level="sequence")
    s = math.exp(-0.2)  # 0.8187 < 1 - 0.1: clipped for A > 0 only when the clip is the smaller term
    # -min(s A, clip(s) A) = -min(0.8187, 0.9) = -0.8187 for both real tokens, 0 at the pad
    assert torch.allclose(loss, torch.tensor([[-s, -s, 0.0]]), atol=1e-6)
    assert m["clip_frac"].item() == 0.0 and abs(m["ratio_mean"].item() - s) < 1e-6
    # A < 0: -min(-s, -0.9) = 0.9, the clipped branch, for both tokens at once
    loss, m = ppo_policy_loss(logps, old, torch.tensor([-1.0]), mask, clip_eps=0.1, ratio_level="sequence")
    assert torch.allclose(loss, torch.tensor([[0.9, 0.9, 0.0]]), atol=1e-6) and m["clip_frac"].item() == 1.0
    with pytest.raises(ValueError, match="ratio_level"):
        ppo_policy_loss(logps, old, torch.tensor([1.0]), mask, ratio_level="word")
