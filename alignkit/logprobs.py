"""Model forward -> per-token log-probs of the sequence's own next tokens: the one place where
logits and labels are shifted (logits at position t score token t+1)."""

from __future__ import annotations

import torch

from alignkit.losses import token_logps


def next_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logps (B, T-1), mask (B, T-1)): log pi(x_{t+1} | x_{<=t}) and whether that token counts.

    A right-padded batch runs without its attention mask: under causal attention a real token only sees
    earlier positions, which are all real, so padding cannot reach any real token's logits (padding
    positions are masked out of the loss). Without a mask SDPA takes its causal kernel, which skips the
    upper triangle and is faster than the masked one on CPU (docs/performance.md); the logits of real
    tokens are the same (tests/invariants/test_speed_paths.py)."""
    if attention_mask is not None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        attention_mask = None  # right padding (alignkit.train.batching.collate)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    logps = token_logps(logits[:, :-1], input_ids[:, 1:])  # (B, T-1)
    return logps, loss_mask[:, 1:].to(logps.dtype)  # (B, T-1)


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

    Summed logps are log pi(y|x), the quantity the DPO family and KTO compare."""
    logps, mask = next_token_logps(model, **batch)  # (N, T-1)
    token = torch.where(mask.bool(), logps, 0.0)  # (N, T-1)
    return token.sum(-1), mask.sum(-1), token  # (N,), (N,), (N, T-1)
