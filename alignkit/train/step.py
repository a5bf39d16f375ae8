"""One optimizer step's plumbing, shared by every recipe: micro-batches under DDP's no_sync, then
clip, check, step and zero the gradients."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP


def micro_steps(ddp_model, micro_batches):
    """Yield each micro-batch; all but the last run inside DDP's `no_sync`, so gradients are
    all-reduced once per optimizer step."""
    for k, idx in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with nullcontext() if last or not isinstance(ddp_model, DDP) else ddp_model.no_sync():
            yield idx


def optimizer_step(run, model, optimizer, loss: float, step: int, detail: str = "") -> float:
    """Clip gradients by --max-grad-norm, step unless the loss is non-finite (`Run.check`), zero the
    gradients. Returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.max_grad_norm or float("inf"))
    if run.check(loss, step, detail):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()
