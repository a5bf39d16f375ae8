"""Model forward -> per-token log-probs of the sequence's own next tokens: the one place where
logits and labels are shifted (logits at position t score token t+1)."""

from __future__ import annotations

import torch

from alignkit.losses import token_logps


def next_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logps (B, T-1), mask (B, T-1)): log pi(x_{t+1} | x_{<=t}) and whether that token counts."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    logps = token_logps(logits[:, :-1], input_ids[:, 1:])  # (B, T-1)
    return logps, loss_mask[:, 1:].to(logps.dtype)  # (B, T-1)
