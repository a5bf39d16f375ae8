"""alignkit sft: supervised fine-tuning (instruction tuning), InstructGPT step 1.

Cross-entropy on assistant/output tokens only (the loss_mask of the data layer), length-grouped
batches so little compute goes to padding, token-mean loss over the whole global batch, AdamW with
warmup + cosine, gradient clipping, atomic checkpoints, resume, torchrun DDP.
Seeds: SFT teaches the format of answering and extracts knowledge the base model already holds; it
does not inject new knowledge (seed 003; seed 001 slides on SFT data).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from alignkit.config import TrainConfig, save_config
from alignkit.data import load_sft
from alignkit.logprobs import next_token_logps
from alignkit.losses import aggregate
from alignkit.models import load_causal_lm, load_tokenizer, save_model
from alignkit.train import checkpoint, dist as distributed
from alignkit.train.batching import StepPlan, collate, length_grouped_batches, shuffled_batches
from alignkit.train.optim import adamw, lr_factor, set_lr
from alignkit.train.tracking import GracefulStop, MetricsWriter, Throughput, check_finite, progress


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on conversational, Alpaca, ShareGPT or prompt-completion data."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    group_by_length: bool = True
    """Batch sequences of similar length together (less padding, same expected gradient)."""


def main(cfg: SFTConfig) -> dict:
    if not cfg.data:
        raise SystemExit("error: alignkit sft needs --data FILE")
    dist = distributed.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, stats = load_sft(list(cfg.data), tokenizer, cfg.max_length, strict=cfg.strict)
    if dist.is_main:
        stats.warn()
    lengths = [len(ex.input_ids) for ex in examples]
    n_labels = [sum(ex.loss_mask[1:]) for ex in examples]  # tokens that are trained on, as next-token labels

    ckpt = checkpoint.latest_checkpoint(cfg.output) if cfg.resume else None
    model = load_causal_lm(ckpt or cfg.model, cfg.dtype, cfg.trust_remote_code, dist.device)
    model.train()
    ddp_model = DDP(model) if dist.world_size > 1 else model
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)

    def make_epoch(epoch: int) -> list[list[int]]:
        if cfg.group_by_length:
            return length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch)
        return shuffled_batches(len(examples), cfg.batch_size, seed=cfg.seed + epoch)

    plan = StepPlan(make_epoch, cfg.grad_accum, dist.world_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * plan.steps_per_epoch)
    start_step = checkpoint.load_checkpoint(ckpt, optimizer)["step"] if ckpt else 0
    if dist.is_main:
        save_config(cfg, cfg.output)
        if ckpt:
            print(f"resuming from {ckpt} (step {start_step})")
    metrics = MetricsWriter(cfg.output, dist.is_main, resume_step=start_step if ckpt else None)
    bar = progress(total_steps, start_step, cfg.progress and dist.is_main, "sft")
    speed = Throughput()
    total_tokens = 0

    with GracefulStop() as stop:
        for step in range(start_step, total_steps):
            lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            global_batches = plan.all_micro_batches(step)
            # Token-mean over the whole global batch: every micro-batch on every process divides by the
            # same global label count (losses.aggregate, "global-denominator trap"); DDP averages
            # gradients over processes, hence the factor world_size.
            n_tokens = sum(n_labels[i] for b in global_batches for i in b)
            step_tokens = sum(lengths[i] for b in global_batches for i in b)
            micro = plan.micro_batches(step, dist.rank)
            loss_sum = 0.0
            for k, idx in enumerate(micro):
                batch = collate([examples[i].input_ids for i in idx], [examples[i].loss_mask for i in idx],
                                tokenizer.pad_token_id, dist.device)
                sync = k == len(micro) - 1 or dist.world_size == 1
                with nullcontext() if sync else ddp_model.no_sync():
                    logps, mask = next_token_logps(ddp_model, **batch)  # (B, T-1)
                    loss = aggregate(-logps, mask, "token_mean", denominator=n_tokens) * dist.world_size
                    loss.backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            step_loss = dist.all_reduce_sum(loss_sum).item() / dist.world_size
            check_finite(step_loss, step + 1, "loss", f" (micro-batches {micro})")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            speed.add(step_tokens)
            total_tokens += step_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                metrics.log({"step": step + 1, "epoch": (step + 1) / plan.steps_per_epoch, "loss": step_loss,
                             "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": speed.rate(),
                             "label_tokens": n_tokens})
            done = step + 1 == total_steps
            if stop.requested or (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
                if dist.is_main:
                    checkpoint.save_checkpoint(cfg.output, step + 1, model, tokenizer, optimizer,
                                               keep=cfg.save_total_limit)
                dist.barrier()
            if stop.requested and not done:
                bar.close()
                raise SystemExit(f"stopped at step {step + 1}; continue with --resume")
    bar.close()
    final = {"step": total_steps, "final": True, "tokens": total_tokens, "seconds": speed.elapsed(),
             "examples": len(examples), "truncated": stats.truncated, "dropped": stats.dropped,
             "skipped_batches_per_epoch": plan.skipped_per_epoch}
    metrics.log(final)
    if dist.is_main:
        save_model(model, tokenizer, cfg.output)
    distributed.teardown()
    return final
