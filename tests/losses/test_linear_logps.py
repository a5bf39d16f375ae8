"""linear_token_logps: the output layer fused into the log-softmax, equal to the plain
log_softmax(hidden @ W.T + b) gather in values and gradients, and never holding (N, V) logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from alignkit.losses import linear_token_logps

LN = math.log


def plain(hidden, weight, labels, bias=None, temperature=1.0):
    """The obvious implementation: full logits, a log-softmax copy, gather; 0 where the label is < 0."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)
    keep = labels >= 0
    logps = torch.where(keep, logp.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    entropy = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    return logps, entropy


def inputs(N=37, H=16, V=101, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[3 % N, 10 % N, N - 1]] = -100  # masked / padding positions
    return hidden, weight, b, labels


def test_hand_values():
    """H = 1, W = (0, 1)^T, hidden (ln 3, ln 2): logits (0, ln 3) and (0, ln 2), softmax (1/4, 3/4) and
    (1/3, 2/3); labels (1, 0): logps (ln 3/4, ln 1/3); entropies -sum p ln p."""
    hidden = torch.tensor([[LN(3)], [LN(2)]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    logps, ent = linear_token_logps(hidden, weight, torch.tensor([1, 0]), entropy=True)
    torch.testing.assert_close(logps, torch.tensor([LN(3 / 4), LN(1 / 3)], dtype=torch.float64))
    h = lambda *p: -sum(q * LN(q) for q in p)  # noqa: E731
    torch.testing.assert_close(ent, torch.tensor([h(1 / 4, 3 / 4), h(1 / 3, 2 / 3)], dtype=torch.float64))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunks", [(None, None), (5, 13), (1, 101), (37, 7), (64, 1000)])
def test_values_and_gradients_equal_the_plain_path(bias, temperature, chunks):
    """Float32, to 1e-5: logps and entropies, and the gradients of hidden, weight and bias under a
    non-uniform upstream gradient of both outputs; block sizes that do not divide N (37) or V (101)."""
    hidden, weight, b, labels = inputs(bias=bias)
    params = [t for t in (hidden, weight, b) if t is not None]
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    logps, ent = linear_token_logps(hidden, weight, labels, b, chunk_size=chunks[0], vocab_chunk_size=chunks[1],
                                    temperature=temperature, entropy=True)
    ref_logps, ref_ent = plain(hidden, weight, labels, b, temperature)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert logps.dtype == ent.dtype == torch.float32 and bool((logps[[3, 10, 36]] == 0).all())
    grads = torch.autograd.grad((logps * w_lp).sum() + (ent * w_ent).sum(), params)
    ref_grads = torch.autograd.grad((ref_logps * w_lp).sum() + (ref_ent * w_ent).sum(), params, retain_graph=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # logps alone (no entropy output) take the same values and gradients
    only = linear_token_logps(hidden, weight, labels, b, chunk_size=chunks[0], vocab_chunk_size=chunks[1],
                              temperature=temperature)
    torch.testing.assert_close(only, ref_logps, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((only * w_lp).sum(), params)
    for got, want in zip(grads, torch.autograd.grad((ref_logps * w_lp).sum(), params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_float64_is_exact_and_passes_gradcheck():
    hidden, weight, b, labels = inputs(N=6, H=3, V=7, bias=True)
    hidden, weight, b = (t.detach().double().requires_grad_() for t in (hidden, weight, b))
    fn = lambda h, w, bb: linear_token_logps(h, w, labels, bb, chunk_size=4, vocab_chunk_size=3,  # noqa: E731
                                            temperature=0.9, entropy=True)
    assert torch.autograd.gradcheck(fn, (hidden, weight, b))
    torch.testing.assert_close(fn(hidden, weight, b), plain(hidden, weight, labels, b, 0.9), rtol=1e-12, atol=1e-12)


def test_a_frozen_weight_gets_no_gradient_and_the_hidden_gradient_is_right():
    """LoRA trains adapters only: the (V, H) weight gradient is then neither needed nor computed."""
    hidden, weight, _, labels = inputs()
    weight = weight.detach()
    (g,) = torch.autograd.grad(linear_token_logps(hidden, weight, labels, chunk_size=8).sum(), hidden)
    (g_ref,) = torch.autograd.grad(plain(hidden, weight, labels)[0].sum(), hidden)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_every_label_masked_gives_zeros_and_zero_gradients():
    hidden, weight, _, labels = inputs()
    out = linear_token_logps(hidden, weight, torch.full_like(labels, -100), entropy=True)
    assert all(bool((t == 0).all()) for t in out)
    g_h, g_w = torch.autograd.grad(out[0].sum() + out[1].sum(), (hidden, weight))
    assert not g_h.any() and not g_w.any()


def test_bad_inputs_are_errors():
    hidden, weight, _, labels = inputs()
    with pytest.raises(ValueError, match="out of range"):
        linear_token_logps(hidden, weight, torch.full_like(labels, 101))
    with pytest.raises(ValueError, match="expected hidden"):
        linear_token_logps(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logps(hidden, weight, labels, chunk_size=0)


def test_under_autocast_bf16_it_follows_the_autocast_linear_and_returns_float32():
    """The plain path under autocast: nn.Linear in bfloat16, then float32 log-softmax. The fused path runs its
    matmuls in bfloat16 too: same values to bf16 rounding of the matmul (block sums round differently)."""
    hidden, weight, b, labels = inputs(bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, ent = linear_token_logps(hidden, weight, labels, b, vocab_chunk_size=13, entropy=True)
        ref_logps, ref_ent = plain(hidden, weight, labels, b)
    assert logps.dtype == ent.dtype == torch.float32
    exact_logps, _ = plain(hidden, weight, labels, b)
    assert (logps - exact_logps).abs().max() > 1e-6  # bf16 matmuls ran
    torch.testing.assert_close(logps, ref_logps, atol=3e-2, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=3e-2, rtol=0)
    g = torch.autograd.grad(logps.sum(), (hidden, weight, b))
    g_ref = torch.autograd.grad(ref_logps.sum(), (hidden, weight, b))
    for got, want in zip(g, g_ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_v_tensor_is_ever_created():
    """N = 2,048 tokens, V = 50,000: the plain path's logits are an (N, V) tensor (the tracker sees it); the
    fused path's largest tensor, forward and backward, is a block or the (V, H) weight gradient, far below."""
    N, H, V = 2048, 8, 50_000
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.1).requires_grad_()
    labels = torch.randint(0, V, (N,))
    plain_mode = LargestTensor()
    with plain_mode:
        F.linear(hidden, weight)  # the plain path's first step
    assert plain_mode.largest >= N * V
    fused_mode = LargestTensor()
    with fused_mode:
        logps, ent = linear_token_logps(hidden, weight, labels, entropy=True)
        (logps.sum() + ent.sum()).backward()
    assert fused_mode.largest <= max(V * H, 2**20) < N * V // 50
