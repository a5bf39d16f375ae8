"""Model forward -> per-token log-probs of the sequence's own next tokens: the one place where
logits and labels are shifted (logits at position t score token t+1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses import sequence_logps, token_logps
from alignkit.models import install_token_logps


def _causal_attention(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a right-padded batch: under causal attention a real token only sees earlier positions, which
    are all real, so padding cannot reach any real token's logits (padding positions are masked out of the
    loss). Without a mask SDPA takes its causal kernel, which skips the upper triangle and is faster than the
    masked one on CPU (docs/performance.md); the logits of real tokens are the same
    (tests/invariants/test_speed_paths.py)."""
    if attention_mask is not None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None  # right padding (alignkit.train.batching.collate)
    return attention_mask


def shifted_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logits (B, T-1, V), labels (B, T-1), mask (B, T-1)): the logits at t, the token t+1
    they score, and whether that token counts. This materialises the (B, T, V) logits: for callers that need
    whole distributions (distillation); log-probs of given tokens go through `next_token_logps`."""
    logits = model(input_ids=input_ids, attention_mask=_causal_attention(attention_mask),
                   use_cache=False).logits  # (B, T, V)
    return logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:]


def next_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     loss_mask: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logps (B, T-1), mask (B, T-1)): log pi(x_{t+1} | x_{<=t}) where that token counts (0 where
    it does not: those positions are not scored), and whether it counts. `temperature`: log-probs of
    softmax(logits / temperature), the distribution a sampler at that temperature draws from.

    The model is called through whatever wrapper it is in with `token_labels=` (`models.install_token_logps`):
    the output layer is applied to the hidden states in blocks (`losses.linear_token_logps`), so the
    (B, T, V) logits are never materialised, and only counted positions reach the output layer."""
    if not install_token_logps(model):  # not a transformers causal LM: from its logits
        logits, labels, mask = shifted_logits(model, input_ids, attention_mask, loss_mask)
        logps = token_logps(logits / temperature if temperature != 1.0 else logits, labels)  # (B, T-1)
        return logps, mask.to(logps.dtype)
    mask = loss_mask[:, 1:]  # (B, T-1)
    labels = F.pad(input_ids[:, 1:].masked_fill(mask == 0, -100), (0, 1), value=-100)  # (B, T): t scores t+1
    out = model(input_ids=input_ids, attention_mask=_causal_attention(attention_mask), use_cache=False,
                token_labels=labels, token_temperature=temperature)
    logps = out.logps[:, :-1]  # (B, T-1)
    return logps, mask.to(logps.dtype)  # (B, T-1)


def pack_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt + completion rows, loss_mask 1 on completion tokens only."""
    from alignkit.train.batching import collate

    seqs = [p + c for p, c in zip(prompts, completions)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    return collate(seqs, masks, pad_id, device)


def completion_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a `pack_completions` batch: (summed completion log-probs (N,), completion lengths (N,),
    per-token log-probs (N, T-1) with their mask (N, T-1) folded in as zeros).

    Summed logps are log pi(y|x) (`losses.sequence_logps`), the quantity the DPO family and KTO compare;
    computed as `next_token_logps` does, without materialised logits."""
    if not install_token_logps(model):  # not a transformers causal LM: from its logits
        logits, labels, mask = shifted_logits(model, **batch)  # (N, T-1, V), (N, T-1), (N, T-1)
        logps, token = sequence_logps(logits, labels, mask, per_token=True)  # (N,), (N, T-1)
        return logps, mask.sum(-1).to(logps.dtype), token
    token, mask = next_token_logps(model, **batch)  # (N, T-1) each
    token = torch.where(mask.bool(), token, 0.0)  # (N, T-1)
    return token.sum(-1), mask.sum(-1), token


def _shared_prefix(options: list[list[int]], masks: list[list[int]]) -> int:
    """How many leading (token, mask) pairs every option has in common, leaving each at least one token."""
    k, shortest = 0, min(len(o) for o in options) - 1
    while k < shortest and all(o[k] == options[0][k] and m[k] == masks[0][k] for o, m in zip(options, masks)):
        k += 1
    return k


@torch.no_grad()
def option_logps(model, prompts: list[list[int]], options: list[list[list[int]]], pad_id: int,
                 option_masks: list[list[list[int]]] | None = None, batch_size: int = 32) -> list[list[float]]:
    """Summed log pi(option | prompt) of every option of every prompt: a multiple-choice question's
    belief over its answers. Each prompt, with the tokens all its options begin with, runs once and its KV
    cache is shared by the options' remaining tokens, so a question with 20 answers costs one prompt and 20
    short continuations instead of 20 whole sequences.

    Args:
        prompts: Q prompts' token ids.
        options: per prompt, its options' token ids (each non-empty).
        option_masks: per option token, 1 = counts in the sum (default: every token).

    Returns:
        per prompt, one summed log-prob per option."""
    from alignkit.generation import left_pad

    if len(options) != len(prompts) or any(not opts or not all(opts) for opts in options):
        raise ValueError("option_logps: every prompt needs a list of non-empty options")
    if option_masks is None:
        option_masks = [[[1] * len(o) for o in opts] for opts in options]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        opts, masks = options[start:start + batch_size], option_masks[start:start + batch_size]
        shared = [_shared_prefix(o, m) for o, m in zip(opts, masks)]
        heads = [p + o[0][:k] for p, o, k in zip(prompts[start:start + batch_size], opts, shared)]
        ids, attn = (t.to(device) for t in left_pad(heads, pad_id))  # (Q, T): prompt + shared option tokens
        head_counts = torch.zeros(ids.shape, device=device)  # (Q, T): shared option tokens that count
        for q, (m, k) in enumerate(zip(masks, shared)):
            if k:
                head_counts[q, ids.shape[1] - k:] = torch.as_tensor(m[0][:k], dtype=head_counts.dtype)
        first = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                      use_cache=True)
        head_sums = (token_logps(first.logits[:, :-1], ids[:, 1:]) * head_counts[:, 1:]).sum(-1)  # (Q,)
        owner = torch.tensor([q for q, os in enumerate(opts) for _ in os], device=device)  # (N,): option -> prompt
        cache = first.cache
        cache.reorder_cache(owner)
        tails = [(o[k:], m[k:]) for os, ms, k in zip(opts, masks, shared) for o, m in zip(os, ms)]
        S = max(len(o) for o, _ in tails)
        tail_ids = torch.full((len(tails), S), pad_id, dtype=torch.long, device=device)  # (N, S), right-padded
        tail_attn = torch.zeros((len(tails), S), dtype=torch.long, device=device)
        tail_counts = torch.zeros((len(tails), S), device=device)
        for i, (o, m) in enumerate(tails):
            tail_ids[i, :len(o)] = torch.as_tensor(o)
            tail_attn[i, :len(o)] = 1
            tail_counts[i, :len(o)] = torch.as_tensor(m, dtype=tail_counts.dtype)
        logits = model(input_ids=tail_ids, attention_mask=torch.cat([attn[owner], tail_attn], -1),
                       position_ids=attn.sum(-1)[owner, None] + torch.arange(S, device=device),
                       cache=cache, use_cache=True).logits  # (N, S, V)
        # the head's last logits score the tail's first token, the tail's own logits the rest
        logits = torch.cat([first.logits[owner, -1:], logits[:, :-1]], 1)  # (N, S, V)
        sums = (head_sums[owner] + (token_logps(logits, tail_ids) * tail_counts).sum(-1)).tolist()  # (N,)
        for os in opts:
            out.append(sums[:len(os)])
            sums = sums[len(os):]
    model.train(was_training)
    return out
