"""token_logps, sequence_logps, token_entropy, sft_loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from alignkit.losses import sequence_logps, sft_loss, token_entropy, token_logps

LN = math.log


def reference_token_logps(logits, labels):
    """The obvious implementation: a full log-softmax copy, then gather."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def reference_entropy(logits):
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def hand_logits():
    """B=1, T=2, V=2. Row 0 logits (0, ln 3): softmax (1/4, 3/4). Row 1 (ln 2, 0): (2/3, 1/3)."""
    return torch.tensor([[[0.0, LN(3)], [LN(2), 0.0]]], dtype=torch.float64)


def test_token_logps_hand_values():
    """labels (1, 0): log p = (ln 3/4, ln 2/3) = (-0.287682, -0.405465)."""
    out = token_logps(hand_logits(), torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[LN(3 / 4), LN(2 / 3)]], dtype=torch.float64))


def test_sequence_logps_hand_values():
    """labels (1, 0), mask (1, 0): ln 3/4 = -0.287682; mask (1, 1): ln 3/4 + ln 2/3 = ln 1/2."""
    logits, labels = hand_logits(), torch.tensor([[1, 0]])
    out = sequence_logps(logits, labels, torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.tensor([LN(3 / 4)], dtype=torch.float64))
    out = sequence_logps(logits, labels, torch.tensor([[True, True]]))
    torch.testing.assert_close(out, torch.tensor([LN(1 / 2)], dtype=torch.float64))


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 100])
def test_token_logps_matches_log_softmax_gather(chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    out = token_logps(logits, labels, chunk_size=chunk_size)
    ref = reference_token_logps(logits, labels)
    torch.testing.assert_close(out, ref)
    w = torch.randn(3, 7, dtype=torch.float64)  # a non-uniform upstream gradient
    (g,) = torch.autograd.grad((out * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(g, g_ref)


def test_token_logps_on_a_non_contiguous_shifted_view():
    """Callers shift with logits[:, :-1]; that view is not contiguous for B > 1."""
    torch.manual_seed(1)
    full = torch.randn(4, 9, 13, requires_grad=True)
    labels = torch.randint(0, 13, (4, 8))
    view = full[:, :-1]
    out = token_logps(view, labels, chunk_size=3)
    ref = reference_token_logps(view, labels)
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out.sum(), full)
    (g_ref,) = torch.autograd.grad(ref.sum(), full)
    torch.testing.assert_close(g, g_ref)


def test_bf16_logits_are_computed_in_float32():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 300).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (2, 5))
    out = token_logps(logits, labels, chunk_size=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_token_logps(logits.float(), labels))
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_out_of_range_labels_give_finite_values_and_grads():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[0, -100, 4, 7], [-1, 2, 5, -100]])
    out = token_logps(logits, labels, chunk_size=2)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sequence_logps_ignores_masked_positions_even_with_minus_100_labels():
    """Only masked-in positions count: equal to the reference sum over those positions, and
    neither the labels (-100) nor the logits at masked-out positions change the result."""
    torch.manual_seed(4)
    logits = torch.randn(2, 6, 9, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    labels = torch.randint(0, 9, (2, 6))
    labels[mask == 0] = -100
    out = sequence_logps(logits, labels, mask, chunk_size=4)

    expected = torch.stack(
        [
            sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]] for t in range(6) if mask[b, t])
            for b in range(2)
        ]
    )
    torch.testing.assert_close(out, expected)

    out.sum().backward()
    assert (logits.grad[mask == 0] == 0).all()
    other = logits.detach().clone()
    other[mask == 0] = 1e4
    torch.testing.assert_close(sequence_logps(other, labels, mask), out.detach())


def test_token_entropy_hand_values():
    """Uniform logits over V=4: H = ln 4 = 1.386294.
    Logits (0, ln 3): p = (1/4, 3/4), H = 1/4 ln 4 + 3/4 ln 4/3 = 0.346574 + 0.215762 = 0.562335."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, LN(3), -1e4, -1e4]]], dtype=torch.float64)
    out = token_entropy(logits)
    expected = torch.tensor([[LN(4), 0.25 * LN(4) + 0.75 * LN(4 / 3)]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_token_entropy_matches_reference_and_gradient(chunk_size):
    torch.manual_seed(5)
    logits = torch.randn(3, 5, 17, dtype=torch.float64, requires_grad=True)
    out = token_entropy(logits, chunk_size=chunk_size)
    ref = reference_entropy(logits)
    torch.testing.assert_close(out, ref)
    w = torch.randn(3, 5, dtype=torch.float64)
    (g,) = torch.autograd.grad((out * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(g, g_ref)


def test_gradcheck_logps_and_entropy_kernels():
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 3, -100, 1, 2], [3, 3, 0, 1, 9]])
    assert torch.autograd.gradcheck(lambda x: token_logps(x, labels, chunk_size=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_size=2), (logits,))


def test_sft_loss_hand_value():
    """Both tokens counted: -(ln 3/4 + ln 2/3) / 2 = -ln(1/2) / 2 = 0.346574."""
    out = sft_loss(hand_logits(), torch.tensor([[1, 0]]), torch.tensor([[1, 1]]))
    torch.testing.assert_close(out, torch.tensor(LN(2) / 2, dtype=torch.float64))


def test_sft_loss_matches_cross_entropy_with_ignore_index():
    torch.manual_seed(7)
    logits = torch.randn(3, 8, 10)
    labels = torch.randint(0, 10, (3, 8))
    mask = torch.rand(3, 8) > 0.3
    labels[~mask] = -100
    expected = F.cross_entropy(logits.reshape(-1, 10), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(logits, labels, mask), expected)


def test_shape_errors():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="labels"):
        token_logps(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits"):
        token_entropy(torch.randn(3, 4))


def _largest_allocation(fn) -> int:
    """Bytes of the largest net allocation made by any single op while running ``fn``.

    The CPU profiler attributes each allocation to the op that made it; an op whose output
    is a (B, T, V) float tensor (log_softmax, or the exp/sub inside a whole-tensor
    logsumexp) shows up with B*T*V*4 bytes. tracemalloc cannot see torch's allocator.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_sequence_logps_allocates_no_second_BTV_tensor():
    """V = 50,000, T = 1,024, B = 1: logits are 204.8 MB. The probe first proves it sees a
    second (B, T, V) tensor when one is made (log_softmax + gather, and gather - logsumexp
    over the whole tensor), then checks sequence_logps stays far below that."""
    B, T, V = 1, 1024, 50_000
    torch.manual_seed(8)
    logits = torch.rand(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    full = B * T * V * logits.element_size()

    naive = _largest_allocation(lambda: (reference_token_logps(logits, labels) * mask).sum(-1))
    unchunked = _largest_allocation(
        lambda: (logits.gather(-1, labels[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)).sum(-1)
    )
    assert naive >= full and unchunked >= full

    ours = _largest_allocation(lambda: sequence_logps(logits, labels, mask))
    assert ours < full // 8, f"largest allocation {ours} bytes vs logits {full} bytes"
    entropy = _largest_allocation(lambda: token_entropy(logits))
    assert entropy < full // 8


def test_sequence_logps_per_token_is_the_masked_token_logps():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    total, token = sequence_logps(logits, labels, mask, per_token=True)
    assert torch.equal(total, sequence_logps(logits, labels, mask))
    assert torch.equal(token, torch.where(mask.bool(), token_logps(logits, labels), 0.0))


def test_recipes_take_log_pi_y_given_x_from_sequence_logps(monkeypatch):
    """One path for log pi(y|x): DPO's and KTO's completion log-probs are `losses.sequence_logps` of the
    shifted logits (logits at t score token t+1), bit for bit."""
    from types import SimpleNamespace

    import alignkit.logprobs as logprobs
    from alignkit.recipes.dpo import pair_logps
    from alignkit.recipes.kto import rows_logps

    class Model(torch.nn.Module):  # logits that depend on the tokens, so a wrong shift shows
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 11)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return SimpleNamespace(logits=self.emb(input_ids).cumsum(1))

    torch.manual_seed(0)
    model = Model()
    calls = []
    real = logprobs.sequence_logps
    monkeypatch.setattr(logprobs, "sequence_logps", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    pairs = [SimpleNamespace(prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6]),
             SimpleNamespace(prompt_ids=[7], chosen_ids=[8, 9, 10], rejected_ids=[2, 3])]
    chosen, rejected, chosen_lengths, _ = pair_logps(model, pairs, 0, "cpu")
    assert calls and chosen_lengths.tolist() == [2, 3]
    ids = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 10, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]])
    with torch.no_grad():
        expected = real(model(ids).logits[:, :-1], ids[:, 1:], mask[:, 1:])
    torch.testing.assert_close(chosen.detach(), expected, rtol=0, atol=0)
    examples = [SimpleNamespace(prompt_ids=ex.prompt_ids, completion_ids=ex.chosen_ids) for ex in pairs]
    calls.clear()
    torch.testing.assert_close(rows_logps(model, examples, [(0, 0), (1, 1)], 0, "cpu").detach(), expected,
                               rtol=0, atol=0)
    assert calls
