"""AdamW with the usual no-decay groups, and the learning-rate schedules (cosine, WSD)."""

from __future__ import annotations

import math

import torch


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; biases, norms and embeddings (1-D or tied) get no weight decay (GPT-2/nanoGPT convention)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused (CPU and CUDA since torch 2.4, as transformers' default optimizer): foreach would allocate a
    # temporary the size of the whole model for sqrt(v) at every step.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    cosine: linear warmup, then cosine from 1 to `min_lr_ratio`.
    wsd:    warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv:2404.06395): linear warmup, constant,
            then a linear decay to `min_lr_ratio` over the last `decay_fraction` of the steps.
    constant: warmup, then 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = wsd_decay_start(total_steps, warmup_steps, decay_fraction)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, wsd or constant")


def wsd_decay_start(total_steps: int, warmup_steps: int, decay_fraction: float) -> int:
    return max(warmup_steps, total_steps - int(round(decay_fraction * total_steps)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
