"""alignkit pretrain: next-token prediction on raw text (the base model of seed 001/003).

Documents (each ending with EOS) are concatenated and cut into fixed blocks of --max-length tokens,
so no compute goes to padding; the incomplete tail is dropped and reported. Schedules: cosine, or
WSD (warmup-stable-decay, MiniCPM arXiv:2404.06395), whose decay stage can mix a second data source
in at --mid-ratio (midtraining / annealing on higher-quality data, seed 001 slides 29-30).
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from alignkit import lora
from alignkit.config import Repeatable, TrainConfig
from alignkit.data import load_text
from alignkit.logprobs import next_token_logps
from alignkit.losses import aggregate
from alignkit.models import load_tokenizer
from alignkit.train.optim import adamw, lr_factor, set_lr, wsd_decay_start
from alignkit.train.run import Run


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining (next-token prediction) on {"text": ...} JSONL."""

    max_length: int = 256
    """Block length in tokens: the concatenated corpus is cut into blocks of this size."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    decay_fraction: float = 0.2
    """WSD: fraction of the steps spent in the final linear decay."""
    mid_data: Annotated[tuple[str, ...], Repeatable] = ()
    """WSD: second text source mixed into the decay stage (midtraining). Repeatable."""
    mid_ratio: float = 0.3
    """WSD: fraction of each decay-stage batch drawn from --mid-data."""


def make_blocks(docs, block: int) -> tuple[list[list[int]], int]:
    """Concatenate token lists and cut them into blocks of `block` tokens; returns (blocks, dropped tail tokens)."""
    stream = [t for d in docs for t in d]
    n = len(stream) // block
    return [stream[i * block:(i + 1) * block] for i in range(n)], len(stream) - n * block


class MixturePlan:
    """Global step -> block indices. Each source is read in seeded per-epoch permutations; during the
    WSD decay stage `n_mid` of the `per_step` sequences come from the mid source. Pure function of
    (seed, step), so resume and DDP see the same data as an uninterrupted single-process run."""

    def __init__(self, n_main: int, n_mid: int, per_step: int, batch_size: int, world_size: int,
                 seed: int, decay_start: int | None, mid_ratio: float):
        self.n_main, self.n_mid_blocks = n_main, n_mid
        self.per_step, self.batch_size, self.world_size, self.seed = per_step, batch_size, world_size, seed
        self.decay_start = decay_start if n_mid else None
        self.mid_per_step = round(mid_ratio * per_step) if self.decay_start is not None else 0

    def _stream(self, n: int, pos: int, count: int, salt: int) -> list[int]:
        out = []
        while count > 0:
            epoch, off = divmod(pos, n)
            perm = list(range(n))
            random.Random(self.seed * 1000 + salt * 100003 + epoch).shuffle(perm)
            take = perm[off:off + count]
            out += take
            pos, count = pos + len(take), count - len(take)
        return out

    def all_micro_batches(self, step: int) -> list[list[int]]:
        """Indices < n_main are main blocks; n_main + j is mid block j."""
        if self.decay_start is None or step < self.decay_start:
            idx = self._stream(self.n_main, step * self.per_step, self.per_step, 0)
        else:
            k = step - self.decay_start
            main_pos = self.decay_start * self.per_step + k * (self.per_step - self.mid_per_step)
            idx = self._stream(self.n_main, main_pos, self.per_step - self.mid_per_step, 0)
            idx += [self.n_main + j for j in self._stream(self.n_mid_blocks, k * self.mid_per_step, self.mid_per_step, 1)]
            random.Random(self.seed + step).shuffle(idx)  # spread mid blocks over the micro-batches
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        return self.all_micro_batches(step)[rank::self.world_size]


def main(cfg: PretrainConfig) -> dict:
    if not cfg.data:
        raise SystemExit("error: alignkit pretrain needs --data FILE")
    if cfg.mid_data and cfg.schedule != "wsd":
        raise SystemExit("error: --mid-data mixes data into the WSD decay stage; add --schedule wsd")
    run = Run(cfg, "pretrain")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    blocks, dropped_tail = make_blocks(load_text(list(cfg.data), tokenizer), cfg.max_length)
    mid_blocks, mid_tail = make_blocks(load_text(list(cfg.mid_data), tokenizer), cfg.max_length) if cfg.mid_data else ([], 0)
    all_blocks = blocks + mid_blocks
    per_step = cfg.batch_size * cfg.grad_accum * run.world_size
    if len(blocks) < per_step:
        raise SystemExit(f"error: the corpus makes {len(blocks)} blocks of {cfg.max_length} tokens, fewer than one "
                         f"optimizer step needs ({per_step}); lower --batch-size / --max-length or add text")
    if run.is_main:
        print(f"pretrain data: {len(blocks)} blocks of {cfg.max_length} tokens "
              f"({dropped_tail} tail tokens dropped)" + (f", mid data: {len(mid_blocks)} blocks" if cfg.mid_data else ""))

    steps_per_epoch = len(blocks) // per_step
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    decay_start = wsd_decay_start(total_steps, cfg.warmup_steps, cfg.decay_fraction) if cfg.schedule == "wsd" else None
    plan = MixturePlan(len(blocks), len(mid_blocks), per_step, cfg.batch_size, run.world_size, cfg.seed,
                       decay_start, cfg.mid_ratio)

    model = lora.load_trainable(cfg, run.checkpoint, run.device)
    model.train()
    ddp_model = DDP(model) if run.world_size > 1 else model
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    start_step = run.begin(model, tokenizer, optimizer, total_steps)
    n_tokens = per_step * (cfg.max_length - 1)  # next-token labels in one global batch
    ones = torch.ones((cfg.batch_size, cfg.max_length), dtype=torch.long, device=run.device)

    for step in range(start_step, total_steps):
        lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio,
                                cfg.decay_fraction)
        set_lr(optimizer, lr)
        micro = plan.micro_batches(step, run.dist.rank)
        loss_sum = 0.0
        for k, idx in enumerate(micro):
            input_ids = torch.tensor([all_blocks[i] for i in idx], device=run.device)  # (B, T)
            sync = k == len(micro) - 1 or run.world_size == 1
            with nullcontext() if sync else ddp_model.no_sync():
                logps, mask = next_token_logps(ddp_model, input_ids, None, ones[:len(idx)])  # (B, T-1)
                loss = aggregate(-logps, mask, "token_mean", denominator=n_tokens) * run.world_size
                loss.backward()
            loss_sum += loss.item()
        step_loss = run.dist.all_reduce_sum(loss_sum).item() / run.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        if run.check(step_loss, step + 1, f" (blocks {plan.all_micro_batches(step)})"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        in_decay = decay_start is not None and step >= decay_start
        run.log(step + 1, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm.item(),
                           "mid_fraction": plan.mid_per_step / per_step if in_decay else 0.0},
                tokens=per_step * cfg.max_length)
        run.end_step(step + 1)
    return run.finish({"tokens": total_steps * per_step * cfg.max_length, "blocks": len(blocks),
                       "dropped_tail_tokens": dropped_tail + mid_tail})
