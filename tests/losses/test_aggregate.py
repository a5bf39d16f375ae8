"""masked_sum, masked_mean, aggregate, and the token_mean global-denominator trap."""

import pytest
import torch

from alignkit.losses import AGGREGATE_MODES, aggregate, masked_mean, masked_sum

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_hand_values():
    """Kept entries: row 0 (1, 2), row 1 (4).
    all: sum 7, mean 7/3.  dim=-1: sums (3, 4), means (3/2, 4/1).
    dim=0: sums (5, 2, 0), means (5/2, 2/1, 0 for the empty column, not NaN)."""
    assert masked_sum(X, M).item() == 7.0
    torch.testing.assert_close(masked_mean(X, M), torch.tensor(7 / 3))
    torch.testing.assert_close(masked_sum(X, M, dim=-1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=-1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_sum(X, M, dim=0), torch.tensor([5.0, 2.0, 0.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_masked_entries_may_hold_nan():
    x = X.clone()
    x[M == 0] = float("nan")
    assert masked_sum(x, M).item() == 7.0
    torch.testing.assert_close(masked_mean(x, M, dim=-1), torch.tensor([1.5, 4.0]))


def test_aggregate_hand_values():
    """token_mean: (1 + 2 + 4) / 3 = 7/3.
    seq_mean_token_mean: ((1 + 2)/2 + 4/1) / 2 = (1.5 + 4) / 2 = 2.75.
    seq_mean_token_sum_norm: 7 / (B * T) = 7 / (2 * 3) = 7/6; with max_len 10: 7 / 20."""
    torch.testing.assert_close(aggregate(X, M, "token_mean"), torch.tensor(7 / 3))
    torch.testing.assert_close(aggregate(X, M, "seq_mean_token_mean"), torch.tensor(2.75))
    torch.testing.assert_close(aggregate(X, M, "seq_mean_token_sum_norm"), torch.tensor(7 / 6))
    torch.testing.assert_close(aggregate(X, M, "seq_mean_token_sum_norm", 10), torch.tensor(7 / 20))


def test_aggregate_denominator_overrides_the_local_count():
    """token_mean, denominator 14 tokens: 7 / 14 = 0.5.
    seq_mean_token_mean, denominator 4 sequences: (1.5 + 4) / 4 = 1.375.
    seq_mean_token_sum_norm, denominator 4 sequences, T = 3: 7 / (4 * 3) = 7/12.
    A 0-dim tensor works the same as a float."""
    torch.testing.assert_close(aggregate(X, M, "token_mean", denominator=14), torch.tensor(0.5))
    torch.testing.assert_close(aggregate(X, M, "token_mean", denominator=torch.tensor(14)), torch.tensor(0.5))
    torch.testing.assert_close(aggregate(X, M, "seq_mean_token_mean", denominator=4.0), torch.tensor(1.375))
    torch.testing.assert_close(
        aggregate(X, M, "seq_mean_token_sum_norm", denominator=4), torch.tensor(7 / 12)
    )


@pytest.mark.parametrize("mode", AGGREGATE_MODES)
@pytest.mark.parametrize("denominator", [None, 0])
def test_empty_mask_gives_zero_with_a_gradient(mode, denominator):
    x = torch.randn(2, 3, requires_grad=True)
    out = aggregate(x * 2, torch.zeros(2, 3), mode, denominator=denominator)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert (x.grad == 0).all()


def test_unknown_mode_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"):
        aggregate(X, M, "mean")
    with pytest.raises(ValueError, match="mask"):
        aggregate(X, M[:, :2], "token_mean")
    with pytest.raises(ValueError, match="mask"):
        masked_mean(X, M[0])


# --- gradient accumulation and DDP -------------------------------------------------------

T = 5
LENGTHS = [5, 4, 1, 2, 3, 5, 2, 1]  # unequal token counts per micro-batch: the trap's trigger


def make_batch():
    """Per-token losses that depend on a shared parameter, so gradients can be compared."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(len(LENGTHS), T, 3, generator=g)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS])
    theta = torch.randn(3, generator=g)
    return features, mask, theta


def per_token_loss(features, theta):
    return torch.tanh(features @ theta) ** 2 + features[..., 0] * theta[1]  # (B, T)


def units(mode, mask):
    return mask.sum() if mode == "token_mean" else mask.shape[0]


def whole_batch(mode, features, mask, theta):
    theta = theta.clone().requires_grad_()
    loss = aggregate(per_token_loss(features, theta), mask, mode)
    loss.backward()
    return loss.detach(), theta.grad


def accumulated(mode, features, mask, theta, splits, denominator, trim=False, scale=1.0):
    """Gradient accumulation as a trainer does it: backward per micro-batch, grads summed."""
    theta = theta.clone().requires_grad_()
    total = torch.tensor(0.0)
    for idx in splits:
        f, m = features[idx], mask[idx]
        if trim:  # dynamic padding: each micro-batch cut to its own longest row
            width = int(m.sum(-1).max())
            f, m = f[:, :width], m[:, :width]
        loss = scale * aggregate(per_token_loss(f, theta), m, mode, max_len=T, denominator=denominator)
        loss.backward()
        total += loss.detach()
    return total, theta.grad


SPLITS = [torch.arange(0, 2), torch.arange(2, 5), torch.arange(5, 8)]


@pytest.mark.parametrize("mode", AGGREGATE_MODES)
def test_micro_batches_with_global_denominator_equal_the_whole_batch(mode):
    """Sum over micro-batches of aggregate(..., denominator=global count) reproduces the
    whole-batch loss and its gradient exactly, for every mode."""
    features, mask, theta = make_batch()
    loss, grad = whole_batch(mode, features, mask, theta)
    acc_loss, acc_grad = accumulated(mode, features, mask, theta, SPLITS, units(mode, mask))
    torch.testing.assert_close(acc_loss, loss)
    torch.testing.assert_close(acc_grad, grad)


def test_naive_token_mean_per_micro_batch_is_wrong():
    """The trap: averaging per-micro-batch token means (denominator = local count, then / K)
    gives a different loss and gradient, because the micro-batches hold 9, 6 and 8 tokens."""
    features, mask, theta = make_batch()
    loss, grad = whole_batch("token_mean", features, mask, theta)
    naive_loss, naive_grad = accumulated(
        "token_mean", features, mask, theta, SPLITS, denominator=None, scale=1 / len(SPLITS)
    )
    assert not torch.allclose(naive_loss, loss, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(naive_grad, grad, rtol=1e-3, atol=1e-3)


def test_token_mean_micro_batches_may_be_trimmed_to_their_own_length():
    features, mask, theta = make_batch()
    loss, grad = whole_batch("token_mean", features, mask, theta)
    acc_loss, acc_grad = accumulated("token_mean", features, mask, theta, SPLITS, mask.sum(), trim=True)
    torch.testing.assert_close(acc_loss, loss)
    torch.testing.assert_close(acc_grad, grad)


@pytest.mark.parametrize("mode", AGGREGATE_MODES)
def test_simulated_ddp_with_world_size_scaling_equals_the_whole_batch(mode):
    """Two ranks, each with gradient accumulation over its own micro-batches. Each rank uses
    the global (all-reduced) count and multiplies its loss by world_size; DDP then averages
    the ranks' gradients. The result is the whole-batch gradient."""
    features, mask, theta = make_batch()
    _, grad = whole_batch(mode, features, mask, theta)
    world_size = 2
    ranks = [[torch.arange(0, 2), torch.arange(2, 3)], [torch.arange(3, 6), torch.arange(6, 8)]]
    rank_grads = [
        accumulated(mode, features, mask, theta, splits, units(mode, mask), scale=world_size)[1]
        for splits in ranks
    ]
    ddp_grad = torch.stack(rank_grads).mean(0)  # what DDP's all-reduce average produces
    torch.testing.assert_close(ddp_grad, grad)
