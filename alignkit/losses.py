"""The math of alignment: every objective, estimator and reduction as a pure function.

Tensor in, tensor out, no trainer state. Each docstring gives the formula and its source.

Conventions
-----------
* Shapes: B batch, T tokens, G group size, V vocabulary.
* Logits and labels arrive already aligned: ``labels[:, t]`` is the token scored by
  ``logits[:, t]``. Callers do the next-token shift.
* Masks: nonzero = the position counts (treated as boolean).
* Every function returns unreduced per-item values, (B,) or (B, T), unless its name says
  otherwise; :func:`aggregate` owns reductions, including the global token count needed
  under gradient accumulation and DDP.
* ``logps`` are log-probabilities under the policy being trained, ``ref_logps`` under the
  frozen reference, ``old_logps`` under the policy that sampled the rollout.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "token_logps",
    "sequence_logps",
    "token_entropy",
    "linear_token_logps",
    "masked_sum",
    "masked_mean",
    "aggregate",
    "sft_loss",
    "bradley_terry_loss",
    "dpo_loss",
    "length_normalized_dpo_loss",
    "simpo_loss",
    "kto_loss",
    "kl_penalty",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "gae",
    "whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "truncated_importance_weights",
]

DPO_VARIANTS = ("sigmoid", "robust", "hinge", "ipo")
AGGREGATE_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")

# Elements of logits processed per chunk by the log-prob/entropy kernels. Measured on a
# 2-core CPU (B*T*V from 2M to 200M elements): chunks of 2**18..2**22 elements keep the
# softmax temporaries cache-resident and run 2-3x faster than one whole-tensor logsumexp;
# a chunk of 2**20 floats is 4 MB.
_CHUNK_ELEMENTS = 2**20


# ---------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------


def _check_shapes(fn: str, ndim: int | None, **tensors: Tensor) -> None:
    """Raise ValueError unless all tensors share one shape (and have ``ndim`` dims).

    Elementwise math silently broadcasts (B,) against (B, 1) into (B, B); checking the
    shapes up front turns that into an error naming the culprit.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    wrong_ndim = ndim is not None and any(len(s) != ndim for s in shapes.values())
    if wrong_ndim or len(set(shapes.values())) != 1:
        want = {1: "(B,)", 2: "(B, T)"}.get(ndim, "one common shape")
        got = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn}: expected tensors of one shape {want}, got {got}")


def _check_choice(fn: str, what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{fn}: unknown {what} {value!r}; valid: {', '.join(valid)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16 logits (a bf16 logsumexp over 50k entries loses ~3 digits);
    float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_len(logits: Tensor, chunk_size: int | None) -> int:
    B, T, V = logits.shape
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(1, B * V))


# ---------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------------------


class _TokenLogps(torch.autograd.Function):
    """log p(label) = logit[label] - logsumexp(logits), chunked over T.

    Forward keeps only (B, T) results plus one (B, t, V) temporary per chunk; backward
    writes d/dlogits = g * (onehot(label) - softmax) chunk by chunk into the one (B, T, V)
    gradient buffer autograd needs anyway (plain autograd through gather + logsumexp
    allocates about four (B, T, V) tensors there).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, tc: int) -> Tensor:
        B, T, _ = logits.shape
        cdt = _compute_dtype(logits.dtype)
        out = torch.empty(B, T, dtype=cdt, device=logits.device)
        lse = torch.empty(B, T, dtype=cdt, device=logits.device)
        for s in range(0, T, tc):
            x = logits[:, s : s + tc].to(cdt)  # (B, t, V); no copy when dtype == cdt
            lse[:, s : s + tc] = torch.logsumexp(x, dim=-1)  # (B, t)
            picked = x.gather(-1, labels[:, s : s + tc, None]).squeeze(-1)  # (B, t)
            out[:, s : s + tc] = picked - lse[:, s : s + tc]  # (B, t)
        ctx.save_for_backward(logits, labels, lse)
        ctx.tc = tc
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, lse = ctx.saved_tensors
        tc, T = ctx.tc, logits.shape[1]
        grad = torch.empty_like(logits)  # (B, T, V)
        same_dtype = logits.dtype == lse.dtype
        for s in range(0, T, tc):
            g = grad_out[:, s : s + tc, None].to(lse.dtype)  # (B, t, 1)
            x = logits[:, s : s + tc]  # (B, t, V)
            # Write straight into the gradient buffer when dtypes agree: no chunk copy.
            buf = grad[:, s : s + tc] if same_dtype else None
            p = torch.sub(x.to(lse.dtype), lse[:, s : s + tc, None], out=buf)  # (B, t, V)
            p.exp_().mul_(-g)  # (B, t, V)  -g * softmax
            p.scatter_add_(-1, labels[:, s : s + tc, None], g)  # (B, t, V)  + g at label
            if not same_dtype:
                grad[:, s : s + tc] = p
        return grad, None, None


class _TokenEntropy(torch.autograd.Function):
    """H = logsumexp(x) - sum_v p_v x_v, chunked over T; dH/dx_v = -p_v (log p_v + H)."""

    @staticmethod
    def forward(ctx, logits: Tensor, tc: int) -> Tensor:
        B, T, _ = logits.shape
        cdt = _compute_dtype(logits.dtype)
        ent = torch.empty(B, T, dtype=cdt, device=logits.device)
        lse = torch.empty(B, T, dtype=cdt, device=logits.device)
        for s in range(0, T, tc):
            x = logits[:, s : s + tc].to(cdt)  # (B, t, V)
            l = torch.logsumexp(x, dim=-1)  # (B, t)
            p = (x - l[..., None]).exp_()  # (B, t, V)
            ent[:, s : s + tc] = l - p.mul_(x).sum(-1)  # (B, t)
            lse[:, s : s + tc] = l
        ctx.save_for_backward(logits, lse, ent)
        ctx.tc = tc
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, ent = ctx.saved_tensors
        tc, T = ctx.tc, logits.shape[1]
        grad = torch.empty_like(logits)  # (B, T, V)
        for s in range(0, T, tc):
            g = grad_out[:, s : s + tc, None].to(lse.dtype)  # (B, t, 1)
            logp = logits[:, s : s + tc].to(lse.dtype) - lse[:, s : s + tc, None]  # (B, t, V)
            p = logp.exp()  # (B, t, V)
            grad[:, s : s + tc] = logp.add_(ent[:, s : s + tc, None]).mul_(p).mul_(-g)  # (B, t, V)
        return grad, None


def token_logps(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Log-probability of each label token: ``log softmax(logits)[b, t, labels[b, t]]``.

    Formula: ``logp[b, t] = logits[b, t, y] - logsumexp_v logits[b, t, v]`` with
    ``y = labels[b, t]`` (gather minus logsumexp; no (B, T, V) log-softmax copy is made).

    Args:
        logits: (B, T, V), already aligned with ``labels``.
        labels: (B, T) token ids. Values outside [0, V) (e.g. -100 padding) are clamped into
            range, so the result there is finite but meaningless: mask it.
        chunk_size: tokens per chunk along T. Default: about 2**20 logits per chunk, which
            only splits large inputs (and is faster than one pass for them, see
            ``_CHUNK_ELEMENTS``). Peak extra memory is one (B, chunk, V) temporary.

    Returns:
        (B, T) log-probabilities in float32 (float64 for float64 logits). Differentiable
        once (no double backward).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logps: expected logits (B, T, V) and labels (B, T), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    safe_labels = labels.long().clamp(0, logits.shape[-1] - 1)  # (B, T)
    return _TokenLogps.apply(logits, safe_labels, _chunk_len(logits, chunk_size))


def sequence_logps(
    logits: Tensor, labels: Tensor, loss_mask: Tensor, *, chunk_size: int | None = None,
    per_token: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sum of label log-probs over masked tokens: ``sum_t mask[b, t] * log p(y_t | y_<t, x)``.

    This is ``log pi(y | x)`` of a response, the quantity the DPO family and KTO compare
    (Rafailov et al. 2023, eq. 7); the recipes take it through ``alignkit.logprobs.completion_logps``.
    Positions with ``loss_mask == 0`` are excluded with ``where`` (not multiplied), so arbitrary
    labels there (e.g. -100) cannot leak in.

    Args:
        logits: (B, T, V); labels: (B, T); loss_mask: (B, T), nonzero = counts.
        chunk_size: see :func:`token_logps`.
        per_token: also return the masked per-token log-probs (B, T), 0 where the mask is 0.

    Returns:
        (B,) summed log-probabilities (and the (B, T) per-token ones with ``per_token``).
    """
    if loss_mask.shape != labels.shape:
        raise ValueError(
            f"sequence_logps: loss_mask {tuple(loss_mask.shape)} must match labels "
            f"{tuple(labels.shape)}"
        )
    logps = token_logps(logits, labels, chunk_size=chunk_size)  # (B, T)
    token = torch.where(loss_mask.bool(), logps, 0.0)  # (B, T)
    return (token.sum(-1), token) if per_token else token.sum(-1)  # (B,)


def token_entropy(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy of the next-token distribution at each position.

    Formula: ``H[b, t] = -sum_v p_v log p_v = logsumexp(x) - sum_v p_v x_v`` with
    ``p = softmax(x)``, ``x = logits[b, t]``. Used for the PPO entropy bonus (Schulman et
    al. 2017, eq. 9) and as a collapse diagnostic. Chunked over T like :func:`token_logps`.
    Logits must be finite (a -inf logit makes ``p_v x_v`` NaN).

    Returns:
        (B, T) entropies in nats (float32, or float64 for float64 logits).
    """
    if logits.dim() != 3:
        raise ValueError(f"token_entropy: expected logits (B, T, V), got {tuple(logits.shape)}")
    return _TokenEntropy.apply(logits, _chunk_len(logits, chunk_size))


# ---------------------------------------------------------------------------------------
# Log-probabilities from hidden states (the output layer fused in, no (N, V) logits)
# ---------------------------------------------------------------------------------------


def _mm_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The output layer's matmul dtype: autocast's when it is on (as an nn.Linear under autocast would run),
    else the inputs' common dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _block_logits(h: Tensor, weight: Tensor, bias: Tensor | None, o: int, v: int, mm_dtype: torch.dtype,
                  cdt: torch.dtype, temperature: float) -> Tensor:
    """(n, v) logits of vocabulary rows [o, o + v) for the token block ``h`` (n, H), in ``cdt``."""
    w = weight[o : o + v].to(mm_dtype)  # (v, H); no copy when dtype == mm_dtype
    b = bias[o : o + v].to(mm_dtype) if bias is not None else None
    x = F.linear(h, w, b).to(cdt)  # (n, v)
    return x / temperature if temperature != 1.0 else x


class _LinearTokenLogps(torch.autograd.Function):
    """logps = x[label] - logsumexp(x) (and H = logsumexp(x) - sum p x) with x = (hidden @ W^T + b) / T,
    in blocks of tokens x vocabulary rows; backward recomputes each block's logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, tc: int, vc: int,
                temperature: float, want_entropy: bool, mm_dtype: torch.dtype):
        N, V = hidden.shape[0], weight.shape[0]
        cdt = _compute_dtype(mm_dtype)
        lse = torch.empty(N, dtype=cdt, device=hidden.device)  # (N,)
        picked = torch.zeros(N, dtype=cdt, device=hidden.device)  # (N,)
        ent = torch.empty(N, dtype=cdt, device=hidden.device) if want_entropy else None  # (N,)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, not by autocast
            for s in range(0, N, tc):
                h, y = hidden[s : s + tc].to(mm_dtype), labels[s : s + tc]  # (n, H), (n,)
                # online logsumexp over vocabulary blocks: running max m, sum z of exp(x - m), sum w of exp(x - m) x
                m = torch.full((h.shape[0],), -math.inf, dtype=cdt, device=h.device)  # (n,)
                z, w = torch.zeros_like(m), torch.zeros_like(m)  # (n,)
                for o in range(0, V, vc):
                    x = _block_logits(h, weight, bias, o, vc, mm_dtype, cdt, temperature)  # (n, v)
                    new_m = torch.maximum(m, x.amax(-1))  # (n,)
                    rescale = torch.exp(m - new_m)  # (n,); 0 on the first block
                    e = torch.exp(x - new_m[:, None])  # (n, v)
                    z = z * rescale + e.sum(-1)
                    if want_entropy:
                        w = w * rescale + e.mul_(x).sum(-1)
                    m = new_m
                    inside = (y >= o) & (y < o + x.shape[1])  # (n,) labels in this block
                    at = x.gather(-1, (y - o).clamp(0, x.shape[1] - 1)[:, None]).squeeze(-1)  # (n,)
                    picked[s : s + tc] += torch.where(inside, at, 0.0)
                lse[s : s + tc] = m + torch.log(z)
                if want_entropy:
                    ent[s : s + tc] = lse[s : s + tc] - w / z
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.cfg = (tc, vc, temperature, want_entropy, mm_dtype)
        logps = picked - lse  # (N,)
        if want_entropy:
            return logps, ent
        ctx.mark_non_differentiable(lse)  # a placeholder second output keeps one return arity
        return logps, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: Tensor | None, grad_ent: Tensor | None):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        tc, vc, temperature, want_entropy, mm_dtype = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = hidden.shape[0], weight.shape[0]
        cdt = lse.dtype
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        if not want_entropy:
            grad_ent = None
        grad_h = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device) if need_h else None  # (N, H)
        grad_w = torch.zeros_like(weight) if need_w else None  # (V, H)
        grad_b = torch.zeros_like(bias) if need_b else None  # (V,)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, N, tc):
                h, y = hidden[s : s + tc].to(mm_dtype), labels[s : s + tc]  # (n, H), (n,)
                g = grad_logps[s : s + tc].to(cdt)  # (n,)
                for o in range(0, V, vc):
                    x = _block_logits(h, weight, bias, o, vc, mm_dtype, cdt, temperature)  # (n, v)
                    v = x.shape[1]
                    logp = x.sub_(lse[s : s + tc, None])  # (n, v) log p
                    p = torch.exp(logp)  # (n, v)
                    gx = p * -g[:, None]  # (n, v) d logps/dx = onehot - p
                    if grad_ent is not None:  # dH/dx = -p (log p + H)
                        ge = grad_ent[s : s + tc, None].to(cdt)  # (n, 1)
                        gx -= logp.add_(ent[s : s + tc, None]).mul_(p).mul_(ge)
                    inside = (y >= o) & (y < o + v)  # (n,)
                    gx.scatter_add_(-1, (y - o).clamp(0, v - 1)[:, None], torch.where(inside, g, 0.0)[:, None])
                    if temperature != 1.0:
                        gx /= temperature  # x = z / T
                    gz = gx.to(mm_dtype)  # (n, v): the gradient the matmul sees, as autocast's backward would
                    if need_h:
                        grad_h[s : s + tc] += gz @ weight[o : o + v].to(mm_dtype)  # (n, H)
                    if need_w:
                        grad_w[o : o + v] += gz.T @ h  # (v, H)
                    if need_b:
                        grad_b[o : o + v] += gz.sum(0).to(grad_b.dtype)  # (v,)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w, grad_b,
                None, None, None, None, None, None)


def linear_token_logps(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
    chunk_size: int | None = None, vocab_chunk_size: int | None = None, temperature: float = 1.0,
    entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Label log-probs (and entropies) of an output layer applied to hidden states, without ever holding
    the (N, V) logits: the output layer fused into the log-softmax.

    Formula: with ``x = (hidden @ weight.T + bias) / temperature`` (N, V),
    ``logps[n] = x[n, labels[n]] - logsumexp_v x[n, v]`` and
    ``entropy[n] = logsumexp_v x[n, v] - sum_v softmax(x[n])_v x[n, v]``, i.e. :func:`token_logps` and
    :func:`token_entropy` of ``F.linear(hidden, weight, bias) / temperature``.

    The logits are made one block (``chunk_size`` tokens x ``vocab_chunk_size`` vocabulary rows) at a time;
    the logsumexp runs online across vocabulary blocks (running max and rescaled sums), and backward
    recomputes each block's logits and writes its rows of the weight gradient once per token block. This is
    the fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024, arXiv 2410.10989) and the blockwise,
    recompute-in-backward loss of Cut Cross-Entropy (Wijmans et al. 2024, "Cut your losses in large-vocabulary
    language models", arXiv 2411.09009), in plain PyTorch.

    Dtypes: the matmuls run in autocast's dtype when autocast is on (what the model's nn.Linear output layer
    would do under autocast, so bf16 logits as the plain path has), else in the inputs' dtype; the log-softmax
    math is float32 (float64 for float64 inputs). Gradients return in the dtypes of ``hidden``/``weight``.

    Args:
        hidden: (N, H) final hidden states (after the model's last norm).
        weight: (V, H) output-layer weight (``lm_head.weight``, tied or not); bias: (V,) or None.
        labels: (N,) token ids; a label < 0 (e.g. -100) is ignored: no logits are computed for that row and
            its logps and entropy are 0. Labels >= V are an error.
        chunk_size: tokens per block (default min(N, 1024)).
        vocab_chunk_size: vocabulary rows per block (default: about 2**20 logits per block, ``_CHUNK_ELEMENTS``).
            Peak extra memory is a few (chunk_size, vocab_chunk_size) temporaries plus the (V, H) weight gradient.
        temperature: the logits are divided by it (sampling temperature, PPO's scoring).
        entropy: also return the entropies.

    Returns:
        (N,) log-probabilities, and (N,) entropies in nats with ``entropy``; float32 (float64 for float64
        inputs). Differentiable once (no double backward) in ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1] \
            or weight.shape[1] != hidden.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(
            f"linear_token_logps: expected hidden (N, H), weight (V, H), labels (N,), bias (V,), got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}, "
            f"{None if bias is None else tuple(bias.shape)}")
    if temperature <= 0:
        raise ValueError(f"linear_token_logps: temperature must be > 0, got {temperature}")
    for name, size in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if size is not None and size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    labels = labels.long()
    keep = labels >= 0  # (N,)
    all_kept = bool(keep.all())
    h, y = (hidden, labels) if all_kept else (hidden[keep], labels[keep])  # (K, H), (K,)
    K, V = h.shape[0], weight.shape[0]
    if K and int(y.max()) >= V:
        raise ValueError(f"linear_token_logps: label {int(y.max())} out of range for a vocabulary of {V}")
    mm_dtype = _mm_dtype(hidden, weight)
    if K:
        tc = chunk_size or min(K, 1024)
        vc = vocab_chunk_size or max(1, _CHUNK_ELEMENTS // min(tc, K))
        logps, ent = _LinearTokenLogps.apply(h, weight, bias, y, tc, vc, float(temperature), entropy, mm_dtype)
    else:  # nothing to score: zeros that still carry a gradient path to hidden and weight
        logps = ent = (h.sum(-1) + weight.sum() * 0).to(_compute_dtype(mm_dtype))
    if not all_kept:
        logps = torch.zeros(labels.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)
        if entropy:
            ent = torch.zeros(labels.shape, dtype=ent.dtype, device=ent.device).masked_scatter(keep, ent)
    return (logps, ent) if entropy else logps


# ---------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------


def _check_mask(fn: str, x: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != x.shape:
        raise ValueError(f"{fn}: mask {tuple(mask.shape)} must match x {tuple(x.shape)}")
    return mask.bool()


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_i mask_i x_i`` over ``dim`` (all elements if None).

    Masked-out entries are dropped with ``where``, so NaN/inf there does not propagate.
    An all-zero mask gives 0 (with a zero gradient).
    """
    m = _check_mask("masked_sum", x, mask)
    kept = torch.where(m, x, 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_i mask_i x_i / sum_i mask_i`` over ``dim`` (all elements if None).

    An empty mask gives 0, not NaN: the count is clamped to at least 1, and the numerator
    is then 0, so the gradient is a well-defined 0.
    """
    m = _check_mask("masked_mean", x, mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str,
    max_len: int | None = None,
    *,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to the scalar to backpropagate.

    Modes (``n_b = sum_t mask[b, t]``):

    * ``"token_mean"``: ``sum_{b,t} mask*l / sum_{b,t} mask``. Every token weighs the same;
      DAPO's token-level loss (Yu et al. 2025, §3.3), and plain SFT.
    * ``"seq_mean_token_mean"``: ``(1/B) sum_b (sum_t mask*l / n_b)``. GRPO as published
      (Shao et al. 2024, eq. 3): tokens of long responses weigh less.
    * ``"seq_mean_token_sum_norm"``: ``sum_{b,t} mask*l / (B * max_len)``. Dr. GRPO (Liu et
      al. 2025): a constant normaliser, so no length bias. ``max_len`` defaults to T; pass
      the generation budget (max new tokens) so it does not depend on batch padding.

    The token_mean global-denominator trap (gradient accumulation and DDP):
        A token mean is not additive over micro-batches. Averaging K micro-batch token means
        weighs a token of a micro-batch with few tokens more than one with many, so the
        accumulated gradient differs from the full batch's. ``denominator`` replaces the
        local count of the reduction's units with the global one:

        * token_mean: the number of masked tokens in the whole optimizer step;
        * seq_mean_token_mean: the number of sequences in the whole step;
        * seq_mean_token_sum_norm: the number of sequences (it replaces B; the result is
          ``sum / (denominator * max_len)``).

        Recipe: count the units over all K micro-batches of the step (and, under DDP,
        all-reduce that count with SUM across ranks) *before* the backward passes; call
        ``aggregate(..., denominator=count)`` on each micro-batch and **sum**, do not
        average, the micro-batch losses (i.e. call ``.backward()`` on each, without
        dividing by K). The summed loss and gradient then equal the whole-batch ones
        exactly. DDP averages gradients over ``world_size`` ranks, so under DDP multiply
        each rank's loss by ``world_size`` to undo that average.

    Args:
        per_token_loss: (B, T). mask: (B, T), nonzero = counts.
        mode: one of ``AGGREGATE_MODES``.
        max_len: normaliser for ``seq_mean_token_sum_norm`` (default T).
        denominator: float or 0-dim tensor, the global unit count described above. Values
            below 1 are treated as 1, so an empty global batch gives 0, not NaN.

    Returns:
        0-dim tensor. Empty masks give 0 with a (zero) gradient.
    """
    _check_choice("aggregate", "mode", mode, AGGREGATE_MODES)
    if per_token_loss.dim() != 2:
        raise ValueError(f"aggregate: expected per_token_loss (B, T), got {tuple(per_token_loss.shape)}")
    m = _check_mask("aggregate", per_token_loss, mask)
    B, T = per_token_loss.shape

    if mode == "token_mean":
        units = m.sum() if denominator is None else denominator
        total = masked_sum(per_token_loss, m)  # ()
    elif mode == "seq_mean_token_mean":
        units = B if denominator is None else denominator
        total = masked_mean(per_token_loss, m, dim=-1).sum()  # (B,) -> ()
    else:
        units = (B if denominator is None else denominator) * (T if max_len is None else max_len)
        total = masked_sum(per_token_loss, m)  # ()
    return total / torch.as_tensor(units, dtype=total.dtype, device=total.device).clamp(min=1)


# ---------------------------------------------------------------------------------------
# Supervised fine-tuning
# ---------------------------------------------------------------------------------------


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    denominator: float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Token-mean next-token cross entropy over masked tokens (a scalar).

    Formula: ``L = -(1/N) sum_{b,t} mask[b,t] log p(y_{b,t} | y_{b,<t}, x_b)``, N = number of
    masked tokens. The SFT/pretraining objective (Radford et al. 2018; InstructGPT step 1,
    Ouyang et al. 2022 §3.5). ``denominator`` overrides N for gradient accumulation and
    DDP; see :func:`aggregate`.
    """
    nll = -token_logps(logits, labels, chunk_size=chunk_size)  # (B, T)
    return aggregate(nll, loss_mask, "token_mean", denominator=denominator)


# ---------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Pairwise reward-model loss: ``-log sigmoid(r_c - r_r - m)``.

    Bradley & Terry (1952) preference model as used for the InstructGPT reward model
    (Ouyang et al. 2022, eq. 1); the optional margin ``m`` is Llama 2's (Touvron et al. 2023,
    eq. 2), larger for pairs rated more clearly apart.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards (squeeze a (B, 1) head first).
        margin: (B,) tensor or float, or None for 0.

    Returns:
        (B,) losses.
    """
    _check_shapes("bradley_terry_loss", 1, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        if isinstance(margin, Tensor) and margin.dim() > 0:
            _check_shapes("bradley_terry_loss", 1, chosen_rewards=chosen_rewards, margin=margin)
        diff = diff - margin  # (B,)
    return -F.logsigmoid(diff)  # (B,)


# ---------------------------------------------------------------------------------------
# DPO family
# ---------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation and its pairwise variants.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (sequence log-prob differences) and
    ``z = beta * h``, eps = ``label_smoothing``:

    * ``"sigmoid"``: ``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)``. eps = 0 is DPO
      (Rafailov et al. 2023, eq. 7); eps > 0 is conservative DPO, which assumes each label is
      flipped with probability eps (Mitchell 2023, "A note on DPO with noisy preferences").
    * ``"robust"``: ``(-(1-eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps)``, the
      unbiased loss under label-flip rate eps (Chowdhury et al. 2024, robust DPO).
    * ``"hinge"``: ``relu(1 - z)``, the SLiC calibration loss (Zhao et al. 2023) on
      reference-normalised log-ratios as in RSO (Liu et al. 2023).
    * ``"ipo"``: ``(h - 1/(2 beta))^2`` with beta playing IPO's tau (Azar et al. 2023). IPO
      regresses the log-ratio gap to a fixed target, so its scale must not grow with
      length: pass *length-averaged* logps (sum of token logps / token count).

    Args:
        four (B,) tensors of log-probs; beta > 0; variant in ``DPO_VARIANTS``;
        label_smoothing in [0, 0.5), only for "sigmoid" and "robust".

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,). The rewards are the
        implicit DPO rewards ``beta * (pi - ref)``, detached (for logging and accuracy).
    """
    fn = "dpo_loss"
    _check_choice(fn, "variant", variant, DPO_VARIANTS)
    _check_shapes(
        fn,
        1,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and variant in ("hinge", "ipo"):
        raise ValueError(f"{fn}: label_smoothing applies to 'sigmoid' and 'robust' only, not {variant!r}")

    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    losses = _pairwise_loss(h, beta, variant, label_smoothing)  # (B,)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _pairwise_loss(h: Tensor, beta: float, variant: str, eps: float) -> Tensor:
    z = beta * h  # (B,)
    if variant == "sigmoid":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)  # (B,)
    if variant == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)  # (B,)
    if variant == "hinge":
        return torch.relu(1 - z)  # (B,)
    return (h - 1 / (2 * beta)) ** 2  # (B,)  ipo


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    # An empty response has logp 0; clamping its length to 1 keeps 0/0 out of the loss.
    return logps / lengths.to(logps.dtype).clamp(min=1)  # (B,)


def length_normalized_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO on per-token log-ratios, so long responses gain no edge from length alone.

    Formula (seed lecture notes 002, §13.6.3; the DPO variant of Tulu 3, Lambert et al.
    2024): ``-log sigmoid(beta/|y_c| log(pi(y_c)/ref(y_c)) - beta/|y_r| log(pi(y_r)/ref(y_r)))``.

    ``beta`` has no default on purpose: per-token log-ratios are ~|y| times smaller than
    sequence ones, so DPO's beta = 0.1 is far too small here (Tulu 3 used beta = 5).

    Args:
        four (B,) sequence log-prob tensors; chosen_lengths, rejected_lengths: (B,) response
        token counts (lengths below 1 are treated as 1).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); rewards are the
        length-normalised implicit rewards ``beta * (pi - ref) / |y|``, detached.
    """
    _check_shapes(
        "length_normalized_dpo_loss",
        1,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen_ratio = _per_token(policy_chosen_logps - ref_chosen_logps, chosen_lengths)  # (B,)
    rejected_ratio = _per_token(policy_rejected_logps - ref_rejected_logps, rejected_lengths)  # (B,)
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))  # (B,)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Length-normalised negative log-likelihood of the chosen response: ``-log pi(y_c|x) / |y_c|``.

    Added to a preference loss with weight alpha it is RPO (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", eq. 1: L_DPO + alpha * L_NLL; TRL's ``rpo_alpha``): DPO alone can lower the
    likelihood of chosen and rejected responses together and so degrade the policy's own outputs
    (Pal et al. 2024, "Smaug"); the NLL term keeps the chosen responses likely.

    Args:
        policy_chosen_logps: (B,) summed log-probs; chosen_lengths: (B,) token counts (below 1 treated as 1).

    Returns:
        (B,) per-pair NLL per token.
    """
    _check_shapes("chosen_nll", 1, policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths)
    return -_per_token(policy_chosen_logps, chosen_lengths)  # (B,)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> Tensor:
    """SimPO: reference-free, length-normalised preference loss with a target margin.

    Formula (Meng et al. 2024, eq. 6):
    ``-log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)``.
    No reference model: the average token log-prob itself is the implicit reward, which
    saves the reference forward pass (the notes, §13.6.3).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs;
        chosen_lengths, rejected_lengths: (B,) token counts (below 1 treated as 1).

    Returns:
        (B,) losses.
    """
    _check_shapes(
        "simpo_loss",
        1,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen = beta * _per_token(policy_chosen_logps, chosen_lengths)  # (B,)
    rejected = beta * _per_token(policy_rejected_logps, rejected_lengths)  # (B,)
    return -F.logsigmoid(chosen - rejected - gamma)  # (B,)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_reference: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Kahneman-Tversky optimisation on unpaired desirable/undesirable examples.

    Formula (Ethayarajh et al. 2024, the KTO loss ``lambda_y - v(x, y)``), with
    ``r = log pi(y|x) - log ref(y|x)`` and reference point ``z0 = kl_reference``:

    * desirable (label true):    ``desirable_weight * (1 - sigmoid(beta (r - z0)))``
    * undesirable (label false): ``undesirable_weight * (1 - sigmoid(beta (z0 - r)))``

    ``z0`` estimates KL(pi || ref) over the batch (the paper uses mismatched prompt /
    completion pairs). It is detached and clamped at 0 here, as in the paper: it is a
    reference point, not a quantity to optimise, and a KL is never negative.

    Args:
        policy_logps, ref_logps: (B,) summed log-probs; labels: (B,) bool (or 0/1);
        kl_reference: float or 0-dim tensor.

    Returns:
        (B,) losses.
    """
    _check_shapes("kto_loss", 1, policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    z0 = torch.as_tensor(kl_reference, dtype=policy_logps.dtype, device=policy_logps.device)
    z0 = z0.detach().clamp(min=0)  # ()
    r = policy_logps - ref_logps  # (B,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))  # (B,)
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))  # (B,)
    return torch.where(labels.bool(), desirable, undesirable)  # (B,)


# ---------------------------------------------------------------------------------------
# KL penalty
# ---------------------------------------------------------------------------------------


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi.

    Schulman (2020), "Approximating KL divergence", with ``d = logps - ref_logps``:

    * ``"k1"``: ``d``; unbiased, high variance, can be negative. The per-token reward
      penalty of Ziegler et al. (2019) and InstructGPT (Ouyang et al. 2022, eq. 2).
    * ``"k2"``: ``0.5 d^2``; biased, low variance, >= 0.
    * ``"k3"``: ``exp(-d) + d - 1``; unbiased, low variance, >= 0. GRPO's KL loss term
      (Shao et al. 2024, eq. 4).

    No clamping: ``exp(-d)`` overflows only if the policy is e^88 times less likely than the
    reference on a sampled token, which a trainer should see rather than hide.

    Returns:
        Same shape as the inputs, (B, T).
    """
    _check_choice("kl_penalty", "estimator", estimator, KL_ESTIMATORS)
    _check_shapes("kl_penalty", None, logps=logps, ref_logps=ref_logps)
    d = logps - ref_logps  # (B, T)
    if estimator == "k1":
        return d  # (B, T)
    if estimator == "k2":
        return 0.5 * d**2  # (B, T)
    return torch.exp(-d) + d - 1  # (B, T)  = exp(ref - logp) - (ref - logp) - 1


# ---------------------------------------------------------------------------------------
# Distillation (full-vocabulary divergences between teacher and student)
# ---------------------------------------------------------------------------------------


def _check_distributions(fn: str, logps: Tensor, teacher_logps: Tensor) -> None:
    if logps.dim() != 3:
        raise ValueError(f"{fn}: expected log-probabilities (B, T, V), got {tuple(logps.shape)}")
    _check_shapes(fn, 3, logps=logps, teacher_logps=teacher_logps)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_v p_v (log p_v - log q_v)`` over the last dim, with ``0 log 0 = 0`` (a -inf log p_v adds
    nothing instead of NaN)."""
    cdt = _compute_dtype(log_p.dtype)
    log_p, log_q = log_p.to(cdt), log_q.to(cdt)
    p = log_p.exp()  # (B, T, V)
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # (B, T)


def forward_kl(logps: Tensor, teacher_logps: Tensor) -> Tensor:
    """Forward KL from the teacher to the student at each position: ``KL(p_T || p_S)``.

    Formula: ``KL[b, t] = sum_v p_T(v) (log p_T(v) - log p_S(v))``. Token-level knowledge
    distillation (Hinton, Vinyals & Dean 2015, arXiv 1503.02531; word-level KD for sequence models:
    Kim & Rush 2016, §3.1, arXiv 1606.07947): the cross-entropy to the teacher's whole next-token
    distribution less the teacher's entropy (a constant), so its gradient is the soft-target
    cross-entropy's.
    Mode covering: the student is punished wherever the teacher has mass and it has none.

    Args:
        logps: (B, T, V) student log-probabilities over the whole vocabulary (log_softmax of
            logits / temperature; the caller applies the temperature).
        teacher_logps: (B, T, V) teacher log-probabilities, same vocabulary and temperature.

    Returns:
        (B, T) divergences in nats, >= 0, 0 where the distributions are equal (reduce with
        :func:`aggregate`).
    """
    _check_distributions("forward_kl", logps, teacher_logps)
    return _kl(teacher_logps, logps)  # (B, T)


def reverse_kl(logps: Tensor, teacher_logps: Tensor) -> Tensor:
    """Reverse KL from the student to the teacher at each position: ``KL(p_S || p_T)``.

    Formula: ``KL[b, t] = sum_v p_S(v) (log p_S(v) - log p_T(v))``, computed exactly over the
    vocabulary. Mode seeking: the student is punished for mass where the teacher has little, not
    for missing some of the teacher's modes, which suits a student too small to cover them all
    (MiniLLM, Gu et al. 2024, arXiv 2306.08543).

    Args and returns as :func:`forward_kl`.
    """
    _check_distributions("reverse_kl", logps, teacher_logps)
    return _kl(logps, teacher_logps)  # (B, T)


def generalized_jsd(logps: Tensor, teacher_logps: Tensor, beta: float) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD at each position.

    Formula (Agarwal et al. 2024, "On-Policy Distillation of Language Models", eq. 1,
    arXiv 2306.13649, with P = teacher, Q = student)::

        M = beta p_T + (1 - beta) p_S
        JSD(beta) = beta KL(p_T || M) + (1 - beta) KL(p_S || M)

    ``beta`` weighs the teacher, as in TRL's ``GKDTrainer.generalized_jsd_loss``. ``log M`` is a
    logsumexp of ``log beta + log p_T`` and ``log(1 - beta) + log p_S``. At beta = 0.5 this is the
    symmetric Jensen-Shannon divergence, bounded by ln 2. As beta -> 0, JSD(beta) / beta -> KL(p_T
    || p_S), and as beta -> 1, JSD(beta) / (1 - beta) -> KL(p_S || p_T); the divergence itself goes
    to 0 at both ends. So, like TRL, beta = 0 returns :func:`forward_kl` and beta = 1 returns
    :func:`reverse_kl` (the divergences whose gradients JSD(beta) follows near the ends), which puts
    the loss scale at the endpoints 1 / beta times above that of a nearby beta.

    Args:
        logps, teacher_logps: (B, T, V) student and teacher log-probabilities (see :func:`forward_kl`).
        beta: teacher weight in [0, 1].

    Returns:
        (B, T) divergences in nats, >= 0, 0 where the distributions are equal.
    """
    _check_distributions("generalized_jsd", logps, teacher_logps)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(teacher_logps, logps)  # (B, T) forward KL
    if beta == 1.0:
        return _kl(logps, teacher_logps)  # (B, T) reverse KL
    cdt = _compute_dtype(logps.dtype)
    logps, teacher_logps = logps.to(cdt), teacher_logps.to(cdt)
    log_m = torch.logaddexp(teacher_logps + math.log(beta), logps + math.log1p(-beta))  # (B, T, V)
    return beta * _kl(teacher_logps, log_m) + (1 - beta) * _kl(logps, log_m)  # (B, T)


# ---------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over token-level rewards.

    Formula (Schulman et al. 2016, eq. 16): ``A_t = sum_l (gamma lam)^l delta_{t+l}`` with
    ``delta_t = r_t + gamma V_{t+1} - V_t``, computed backwards as
    ``A_t = delta_t + gamma lam A_{t+1}``; ``returns = A + V`` (the value targets).

    Each row's mask must be one contiguous run of ones (a right-padded response, optionally
    after a masked prompt). The response ends at its last unmasked token, so the value after
    it is 0 (terminal). Masked positions contribute nothing and get advantage and return 0.
    Runs under ``no_grad``: advantages are targets, not part of the graph.

    Args:
        rewards, values, mask: (B, T). Typically rewards hold -kl_coef * KL per token plus
            the scalar reward on the last response token.

    Returns:
        ``(advantages, returns)``, each (B, T).
    """
    _check_shapes("gae", 2, rewards=rewards, values=values, mask=mask)
    m = mask.bool()
    starts = (m[:, 1:] & ~m[:, :-1]).sum(-1) + m[:, 0]  # (B,) runs of ones per row
    if bool((starts > 1).any()):
        raise ValueError("gae: each row of mask must be one contiguous run of ones (right-padded)")
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    r = torch.where(m, rewards.to(dtype), 0.0)  # (B, T)
    v = torch.where(m, values.to(dtype), 0.0)  # (B, T)
    B, T = r.shape
    advantages = torch.zeros_like(r)  # (B, T)
    next_adv = r.new_zeros(B)  # (B,)
    next_value = r.new_zeros(B)  # (B,)  0 after the last token: terminal
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        next_adv = torch.where(m[:, t], delta + gamma * lam * next_adv, 0.0)  # (B,)
        advantages[:, t] = next_adv
        next_value = v[:, t]  # (B,)  zero at masked positions
    return advantages, advantages + v


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, *, eps: float = 1e-8) -> Tensor:
    """Masked whitening: ``(x - mean) / sqrt(var + eps)`` over the masked entries.

    The variance is the unbiased masked variance (Bessel's n/(n-1)), as in TRL's
    ``masked_whiten``; whitening advantages per batch goes back to Ziegler et al. (2019).
    With ``shift_mean=False`` the mean is added back (only the scale changes), which keeps
    the sign of e.g. rewards. Masked-out positions are set to 0 in the output. Fewer than
    two masked entries give 0 everywhere (no variance to divide by), not NaN.

    Returns:
        Same shape as ``x``.
    """
    m = _check_mask("whiten", x, mask)
    mean = masked_mean(x, m)  # ()
    n = m.sum()  # ()
    var = masked_sum((x - mean) ** 2, m) / (n - 1).clamp(min=1)  # ()
    out = (x - mean) * torch.rsqrt(var + eps)  # same shape as x
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0)


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, per token.

    Formula (Schulman et al. 2017, eq. 7, negated to a loss):
    ``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)``, ``rho = exp(logps - old_logps)``.
    ``eps_high`` defaults to ``eps``; a larger one is DAPO's clip-higher (Yu et al. 2025,
    §3.1), which leaves room for low-probability tokens to grow.

    ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025, eq. 5-7, arXiv 2507.18071): every token of sequence
    i takes the sequence's length-normalised ratio
    ``s_i = exp(mean_t (logps - old_logps))`` over its masked tokens, clipped as a whole (GSPO clips with a
    far smaller eps, e.g. 3e-4 / 4e-4), so one sequence's tokens share one clipping decision.

    Args:
        logps, old_logps, mask: (B, T).
        advantages: (B, T) per token (PPO + GAE) or (B,) per sequence (GRPO, RLOO), which is
            broadcast over T.

    Returns:
        ``(per_token_loss, metrics)``: per_token_loss (B, T), 0 at masked positions; reduce
        it with :func:`aggregate`. metrics: detached 0-dim tensors, masked means over tokens:
        ``clip_frac`` (fraction of tokens where the clipped branch is the active one, i.e.
        its gradient is 0), ``approx_kl`` (k3 estimate of KL(old || new):
        ``(rho - 1) - log rho``, unbiased under samples from the old policy), ``ratio_mean``.
    """
    fn = "ppo_policy_loss"
    _check_shapes(fn, 2, logps=logps, old_logps=old_logps, mask=mask)
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(
            f"{fn}: advantages must be (B,) or (B, T) = {tuple(logps.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1), broadcasts over T
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.bool()

    log_ratio = logps - old_logps  # (B, T)
    if ratio_level == "sequence":
        per_seq = masked_sum(log_ratio, m, dim=-1) / m.sum(-1).clamp(min=1)  # (B,)
        log_ratio = per_seq[:, None].expand_as(logps)  # (B, T)
    elif ratio_level != "token":
        raise ValueError(f"{fn}: ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + eps_high)  # (B, T)
    per_token_loss = torch.where(m, torch.maximum(unclipped, clipped), 0.0)  # (B, T)

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return per_token_loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> Tensor:
    """Clipped value-function loss, per token.

    Formula: ``0.5 * max((v - R)^2, (v_old + clip(v - v_old, -eps, eps) - R)^2)``. Not in
    the PPO paper; it comes from OpenAI's ppo2 baseline (documented by Engstrom et al. 2020,
    "Implementation Matters", and Huang et al. 2022, "The 37 implementation details of
    PPO"): the value head may not move more than eps from the rollout's estimate per update.

    Returns:
        (B, T), 0 at masked positions; reduce with :func:`aggregate`.
    """
    _check_shapes("ppo_value_loss", 2, values=values, old_values=old_values, returns=returns, mask=mask)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # (B, T)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)  # (B, T)
    return torch.where(mask.bool(), loss, 0.0)  # (B, T)


# ---------------------------------------------------------------------------------------
# Group baselines (GRPO, Dr. GRPO, RLOO)
# ---------------------------------------------------------------------------------------


def _grouped(fn: str, rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: expected rewards of shape (B,), got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"{fn}: group_size must be >= 2 to form a baseline, got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"{fn}: batch size {rewards.shape[0]} is not divisible by group_size {group_size}; "
            "rewards must hold group_size consecutive samples per prompt"
        )
    return rewards.reshape(-1, group_size).to(_compute_dtype(rewards.dtype))  # (B/G, G)


def group_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO outcome-supervision advantages: reward relative to the prompt's group.

    Formula (Shao et al. 2024, DeepSeekMath §4.1.2, used in eq. 3):
    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` with the unbiased sample std
    (``torch.std``). ``normalize_std=False`` drops the division, as Dr. GRPO recommends
    (Liu et al. 2025): dividing by std over-weights prompts that are nearly always right or
    always wrong.

    Args:
        rewards: (B,), B = n_prompts * G, the G samples of each prompt consecutive.

    Returns:
        (B,) advantages; a constant group gets 0.
    """
    r = _grouped("group_advantages", rewards, group_size)  # (n, G)
    adv = r - r.mean(dim=1, keepdim=True)  # (n, G)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # (n, G)
    return adv.reshape(-1)  # (B,)


def reinforce_pp_advantages(rewards: Tensor, group_size: int, subtract_group_mean: bool = True,
                            batch_mean: float | None = None, batch_std: float | None = None,
                            eps: float = 1e-6) -> Tensor:
    """REINFORCE++ advantages: rewards normalised over the whole global batch, not per prompt group.

    Hu et al. 2025, "REINFORCE++", §3, arXiv 2501.03262 (OpenRLHF's ``reinforce_baseline``):
    ``c_i = r_i - mean(r_group(i))`` (the "-baseline" variant for several samples per prompt;
    ``subtract_group_mean=False`` keeps ``c_i = r_i``), then ``A_i = (c_i - mean_batch(c)) / (std_batch(c) + eps)``
    with the mean and (unbiased) std over every sample of the global batch. Normalising over the batch rather
    than the group avoids GRPO's division by a small group std. Under DDP pass the global batch's
    ``batch_mean``/``batch_std`` of c (each process holds a shard); by default they are this tensor's.

    Args:
        rewards: (B,), G consecutive samples per prompt.

    Returns:
        (B,) advantages.
    """
    r = _grouped("reinforce_pp_advantages", rewards, group_size)  # (n, G)
    c = (r - r.mean(dim=1, keepdim=True) if subtract_group_mean else r).reshape(-1)  # (B,)
    mean = c.mean() if batch_mean is None else torch.as_tensor(batch_mean, dtype=c.dtype)
    std = c.std() if batch_std is None else torch.as_tensor(batch_std, dtype=c.dtype)
    return (c - mean) / (std + eps)  # (B,)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages: ``A_i = r_i - mean_{j != i} r_j``.

    Ahmadian et al. (2024), "Back to Basics" (RLOO, after Kool et al. 2019): each sample's
    baseline is the mean reward of the other G - 1 samples of its prompt, so the baseline
    is independent of the sample and the estimator stays unbiased.

    Args:
        rewards: (B,), G consecutive samples per prompt.

    Returns:
        (B,) advantages.
    """
    r = _grouped("rloo_advantages", rewards, group_size)  # (n, G)
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # (n, G)
    return (r - others).reshape(-1)  # (B,)


# ---------------------------------------------------------------------------------------
# Rollout-engine mismatch (truncated importance sampling)
# ---------------------------------------------------------------------------------------


def truncated_importance_weights(
    old_logps: Tensor, engine_logps: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling (TIS) weights for rollouts sampled by an engine whose token
    probabilities differ from the trainer's (e.g. vLLM in bf16 vs the trainer in fp32).

    Formula (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training", fengyao.notion.site/off-policy-rl; TRL's ``vllm_importance_sampling_cap``, verl's
    ``tis_imp_ratio_cap``): ``w = min(exp(old_logps - engine_logps), C)``, detached, where
    ``old_logps`` are the trainer's log-probs of the sampled tokens under the sampling policy and
    ``engine_logps`` the engine's. Multiplying the per-token policy-gradient loss by ``w`` turns the
    gradient into an importance-weighted estimate under the trainer's policy; the cap ``C`` bounds
    its variance (the truncation of Ionides 2008).

    Args:
        old_logps, engine_logps, mask: (B, T).
        cap: C > 0.

    Returns:
        ``(weights, metrics)``: weights (B, T), 0 at masked positions, no gradient. metrics: detached
        0-dim masked means over tokens, ``weight_mean`` (after the cap) and ``capped_frac`` (fraction
        of tokens whose ratio exceeded C).
    """
    fn = "truncated_importance_weights"
    _check_shapes(fn, 2, old_logps=old_logps, engine_logps=engine_logps, mask=mask)
    if not cap > 0:
        raise ValueError(f"{fn}: cap must be > 0, got {cap}")
    m = mask.bool()
    with torch.no_grad():
        ratio = torch.exp(old_logps.detach() - engine_logps.detach())  # (B, T)
        weights = torch.where(m, ratio.clamp(max=cap), 0.0)  # (B, T)
        metrics = {"weight_mean": masked_mean(weights, m), "capped_frac": masked_mean((ratio > cap).to(ratio.dtype), m)}
    return weights, metrics
