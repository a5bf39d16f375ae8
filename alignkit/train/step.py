"""One optimizer step's plumbing, shared by every recipe: the scheduled learning rate, micro-batches
without gradient sync (DDP's no_sync, FSDP2's set_requires_gradient_sync) but the last, then clip, check,
step and zero the gradients."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from alignkit.train.optim import lr_factor, set_lr
from alignkit.train.parallel import no_sync


def schedule_lr(run, optimizer, step: int, schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Set the learning rate of `step` (0-based): --lr times the warmup + `schedule` factor over the run's
    steps (`Run.begin` sets them; `decay_fraction` is WSD's). Returns it, for the metrics."""
    cfg = run.cfg
    lr = cfg.lr * lr_factor(step, run.total_steps, cfg.warmup_steps, schedule, cfg.min_lr_ratio, decay_fraction)
    set_lr(optimizer, lr)
    return lr


def micro_steps(ddp_model, micro_batches):
    """Yield each micro-batch; all but the last run without gradient sync (`parallel.no_sync`), so
    gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per optimizer step."""
    for k, idx in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with nullcontext() if last else no_sync(ddp_model):
            yield idx


def accumulate(ddp_model, micro_batches, train_micro_batch) -> dict[str, float]:
    """Run `train_micro_batch(indices) -> {name: sum}` (forward and backward) on each micro-batch of this
    process, under `micro_steps`, and add up its named sums."""
    sums: dict[str, float] = {}
    for idx in micro_steps(ddp_model, micro_batches):
        for name, value in train_micro_batch(idx).items():
            sums[name] = sums.get(name, 0.0) + value
    return sums


def optimizer_step(run, model, optimizer, loss: float, step: int, detail: str = "") -> float:
    """Clip gradients by --max-grad-norm, step unless the loss is non-finite (`Run.check`), zero the
    gradients. Returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor norm over the sharded gradients
        grad_norm = grad_norm.full_tensor()
    if run.check(loss, step, detail):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()
