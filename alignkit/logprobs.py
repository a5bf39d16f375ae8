"""Model forward -> per-token log-probs of the sequence's own next tokens: the one place where
logits and labels are shifted (logits at position t score token t+1)."""

from __future__ import annotations

import torch

from alignkit.losses import sequence_logps, token_logps


def shifted_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logits (B, T-1, V), labels (B, T-1), mask (B, T-1)): the logits at t, the token t+1
    they score, and whether that token counts.

    A right-padded batch runs without its attention mask: under causal attention a real token only sees
    earlier positions, which are all real, so padding cannot reach any real token's logits (padding
    positions are masked out of the loss). Without a mask SDPA takes its causal kernel, which skips the
    upper triangle and is faster than the masked one on CPU (docs/performance.md); the logits of real
    tokens are the same (tests/invariants/test_speed_paths.py)."""
    if attention_mask is not None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        attention_mask = None  # right padding (alignkit.train.batching.collate)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    return logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:]


def next_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logps (B, T-1), mask (B, T-1)): log pi(x_{t+1} | x_{<=t}) and whether that token counts."""
    logits, labels, mask = shifted_logits(model, input_ids, attention_mask, loss_mask)
    logps = token_logps(logits, labels)  # (B, T-1)
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

    Summed logps are log pi(y|x) (`losses.sequence_logps`), the quantity the DPO family and KTO compare."""
    logits, labels, mask = shifted_logits(model, **batch)  # (N, T-1, V), (N, T-1), (N, T-1)
    logps, token = sequence_logps(logits, labels, mask, per_token=True)  # (N,), (N, T-1)
    return logps, mask.sum(-1).to(logps.dtype), token
