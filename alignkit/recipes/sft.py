"""alignkit sft: supervised fine-tuning (instruction tuning), InstructGPT step 1.

Cross-entropy on assistant/output tokens only (the loss_mask of the data layer), length-grouped
batches so little compute goes to padding, token-mean loss over the whole global batch, AdamW with
warmup + cosine, gradient clipping, atomic checkpoints, resume, torchrun DDP.
SFT teaches the format of answering and extracts knowledge the base model already holds; it does not
inject new knowledge (the notes on SFT and on SFT data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


from alignkit import lora
from alignkit.config import TrainConfig
from alignkit.data import load_sft
from alignkit.logprobs import next_token_logps
from alignkit.losses import aggregate
from alignkit.models import load_tokenizer
from alignkit.train import parallel
from alignkit.train.batching import StepPlan, collate, epoch_batches
from alignkit.train.optim import adamw
from alignkit.train.run import Run
from alignkit.train.step import micro_steps, optimizer_step, schedule_lr


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on conversational, Alpaca, ShareGPT or prompt-completion data."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    group_by_length: bool = True
    """Batch sequences of similar length together (less padding, same expected gradient)."""


def train_micro_batch(model, examples, idx, n_tokens: int, world_size: int, pad_id: int, device) -> float:
    """Forward and backward of the examples `idx`. Token-mean over the whole global batch: every
    micro-batch on every process divides by the same global label count `n_tokens` (losses.aggregate,
    "global-denominator trap"); DDP averages gradients over processes, hence the factor world_size.
    Returns the micro-batch's share of the step loss."""
    batch = collate([examples[i].input_ids for i in idx], [examples[i].loss_mask for i in idx], pad_id, device)
    logps, mask = next_token_logps(model, **batch)  # (B, T-1)
    loss = aggregate(-logps, mask, "token_mean", denominator=n_tokens) * world_size
    loss.backward()
    return loss.item()


def main(cfg: SFTConfig) -> dict:
    if not cfg.data:
        raise SystemExit("error: alignkit sft needs --data FILE")
    run = Run(cfg, "sft")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, stats = load_sft(list(cfg.data), tokenizer, cfg.max_length, strict=cfg.strict)
    if run.is_main:
        stats.warn()
    lengths = [len(ex.input_ids) for ex in examples]
    n_labels = [sum(ex.loss_mask[1:]) for ex in examples]  # tokens that are trained on, as next-token labels

    model = lora.load_trainable(cfg, run.checkpoint, run.device, meta=parallel.builds_on_meta(run, cfg))
    model.train()
    ddp_model = parallel.wrap(model, run, cfg)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    plan = StepPlan(epoch_batches(lengths, cfg.batch_size, cfg.seed, cfg.group_by_length), cfg.grad_accum,
                    run.world_size)
    total_steps = plan.total_steps(cfg.max_steps, cfg.epochs)
    start_step = run.begin(model, tokenizer, optimizer, total_steps)

    for step in range(start_step, total_steps):
        lr = schedule_lr(run, optimizer, step, cfg.schedule)
        global_batches = plan.all_micro_batches(step)
        n_tokens = sum(n_labels[i] for b in global_batches for i in b)
        step_tokens = sum(lengths[i] for b in global_batches for i in b)
        loss_sum = sum(train_micro_batch(ddp_model, examples, idx, n_tokens, run.world_size, tokenizer.pad_token_id,
                                         run.device)
                       for idx in micro_steps(ddp_model, plan.micro_batches(step, run.dist.rank)))
        step_loss = run.dist.reduce_sums({"loss": loss_sum})["loss"] / run.world_size
        grad_norm = optimizer_step(run, model, optimizer, step_loss, step + 1, f" (examples {global_batches})")
        run.count(tokens=step_tokens)
        run.log(step + 1, {"epoch": (step + 1) / plan.steps_per_epoch, "loss": step_loss, "lr": lr,
                           "grad_norm": grad_norm, "label_tokens": n_tokens}, tokens=step_tokens)
        run.end_step(step + 1)
    return run.finish({"examples": len(examples), "truncated": stats.truncated,
                       "dropped": stats.dropped, "skipped_batches_per_epoch": plan.skipped_per_epoch})
