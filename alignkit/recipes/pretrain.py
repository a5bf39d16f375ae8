"""alignkit pretrain: next-token prediction on raw text (the base model of the notes).

Documents (each ending with EOS) are concatenated and cut into fixed blocks of --max-length tokens,
so no compute goes to padding; the incomplete tail is dropped and reported. Schedules: cosine, or
WSD (warmup-stable-decay, MiniCPM arXiv:2404.06395), whose decay stage can mix a second data source
in at --mid-ratio (midtraining / annealing on higher-quality data, the notes). A --mid-data file of
text is cut into blocks the same way; a file of chat/instruction records (any format `sft` reads) is
rendered through the chat template, one conversation per row, with the loss on assistant tokens only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from alignkit import lora
from alignkit.config import Repeatable, TrainConfig
from alignkit.data import DataStats, Example, detect_format, load_sft, load_text, read_records
from alignkit.logprobs import next_token_logps
from alignkit.losses import aggregate
from alignkit.models import load_tokenizer
from alignkit.train import parallel
from alignkit.train.batching import collate
from alignkit.train.optim import adamw, wsd_decay_start
from alignkit.train.run import Run
from alignkit.train.step import micro_steps, optimizer_step, schedule_lr


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining (next-token prediction) on {"text": ...} JSONL."""

    max_length: int = 256
    """Block length in tokens: the concatenated corpus is cut into blocks of this size."""
    strict: bool = False
    """A chat --mid-data example longer than --max-length is an error (naming file and line) instead of being truncated. Text is never truncated (documents run across blocks) and a bad text record is always an error, so this needs chat --mid-data."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    decay_fraction: float = 0.2
    """WSD: fraction of the steps spent in the final linear decay."""
    mid_data: Annotated[tuple[str, ...], Repeatable] = ()
    """WSD: second source mixed into the decay stage (midtraining): {"text"} records, or chat/instruction records (loss on assistant tokens only). Repeatable."""
    mid_ratio: float = 0.3
    """WSD: fraction of each decay-stage batch drawn from --mid-data."""


def make_blocks(docs, block: int) -> tuple[list[list[int]], int]:
    """Concatenate token lists and cut them into blocks of `block` tokens; returns (blocks, dropped tail tokens)."""
    stream = [t for d in docs for t in d]
    n = len(stream) // block
    return [stream[i * block:(i + 1) * block] for i in range(n)], len(stream) - n * block


def text_rows(paths, tokenizer, max_length: int) -> tuple[list[Example], int]:
    """Text files as blocks of `max_length` tokens, every token trained on; returns (rows, dropped tail tokens)."""
    blocks, tail = make_blocks(load_text(list(paths), tokenizer), max_length) if paths else ([], 0)
    return [Example(b, [1] * len(b)) for b in blocks], tail


def is_text_file(path: str) -> bool:
    """A --mid-data file holds text when its first record is {"text"}; anything else is read as chat data."""
    for _, record in read_records(path):
        try:
            return detect_format(record) == "text"
        except ValueError:
            return False  # the chat loader names the record and the problem
    return True


def mid_rows(paths, tokenizer, max_length: int, strict: bool) -> tuple[list[Example], int, DataStats | None]:
    """--mid-data as rows: text blocks, then one row per conversation (right-padded in its micro-batch,
    never packed with text, loss_mask on assistant tokens). Returns (rows, dropped tail tokens, chat stats)."""
    chat = [p for p in paths if not is_text_file(p)]
    rows, tail = text_rows([p for p in paths if p not in chat], tokenizer, max_length)
    if not chat:
        return rows, tail, None
    examples, stats = load_sft(chat, tokenizer, max_length, strict=strict)
    return rows + examples, tail, stats


class MixturePlan:
    """Global step -> row indices. Each source is read in seeded per-epoch permutations; during the
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
        """Indices < n_main are main rows; n_main + j is mid row j."""
        if self.decay_start is None or step < self.decay_start:
            idx = self._stream(self.n_main, step * self.per_step, self.per_step, 0)
        else:
            k = step - self.decay_start
            main_pos = self.decay_start * self.per_step + k * (self.per_step - self.mid_per_step)
            idx = self._stream(self.n_main, main_pos, self.per_step - self.mid_per_step, 0)
            idx += [self.n_main + j for j in self._stream(self.n_mid_blocks, k * self.mid_per_step, self.mid_per_step, 1)]
            random.Random(self.seed + step).shuffle(idx)  # spread mid rows over the micro-batches
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        return self.all_micro_batches(step)[rank::self.world_size]


def check_config(cfg: PretrainConfig) -> None:
    if not cfg.data:
        raise SystemExit("error: alignkit pretrain needs --data FILE")
    if cfg.mid_data and cfg.schedule != "wsd":
        raise SystemExit("error: --mid-data mixes data into the WSD decay stage; add --schedule wsd")
    if cfg.mid_data and not 0 < cfg.mid_ratio <= 1:
        raise SystemExit(f"error: --mid-ratio must be in (0, 1], got {cfg.mid_ratio}")
    if cfg.strict and all(is_text_file(p) for p in cfg.mid_data):
        raise SystemExit("error: --strict applies to chat --mid-data only: text is cut into blocks, never "
                         "truncated, and a bad text record is always an error")


def load_rows(cfg: PretrainConfig, tokenizer, run: Run) -> tuple[list[Example], int, dict]:
    """All training rows (main text blocks first, then the mid rows), the number of main rows, and
    the load's counts for the final metrics row."""
    main, main_tail = text_rows(cfg.data, tokenizer, cfg.max_length)
    mid, mid_tail, chat_stats = mid_rows(cfg.mid_data, tokenizer, cfg.max_length, cfg.strict)
    per_step = cfg.batch_size * cfg.grad_accum * run.world_size
    if len(main) < per_step:
        raise SystemExit(f"error: the corpus makes {len(main)} blocks of {cfg.max_length} tokens, fewer than one "
                         f"optimizer step needs ({per_step}); lower --batch-size / --max-length or add text")
    if cfg.mid_data and not mid:
        raise SystemExit(f"error: --mid-data {', '.join(cfg.mid_data)}: no rows (less text than one block of "
                         f"{cfg.max_length} tokens and no conversation)")
    if cfg.mid_data and round(cfg.mid_ratio * per_step) == 0:
        raise SystemExit(f"error: --mid-ratio {cfg.mid_ratio} of a global batch of {per_step} rows is 0 rows")
    n_chat = chat_stats.kept if chat_stats else 0
    if run.is_main:
        print(f"pretrain data: {len(main)} blocks of {cfg.max_length} tokens ({main_tail} tail tokens dropped)"
              + (f", mid data: {len(mid) - n_chat} blocks, {n_chat} conversations" if cfg.mid_data else ""))
        if chat_stats:
            chat_stats.warn()
    counts = {"blocks": len(main), "dropped_tail_tokens": main_tail + mid_tail, "mid_data_rows": len(mid)}
    if chat_stats:
        counts.update(mid_truncated=chat_stats.truncated, mid_dropped=chat_stats.dropped)
    return main + mid, len(main), counts


def main(cfg: PretrainConfig) -> dict:
    check_config(cfg)
    run = Run(cfg, "pretrain")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    rows, n_main, counts = load_rows(cfg, tokenizer, run)
    labels = [sum(r.loss_mask[1:]) for r in rows]  # trained-on tokens of each row, as next-token labels
    per_step = cfg.batch_size * cfg.grad_accum * run.world_size
    steps_per_epoch = n_main // per_step
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    decay_start = wsd_decay_start(total_steps, cfg.warmup_steps, cfg.decay_fraction) if cfg.schedule == "wsd" else None
    plan = MixturePlan(n_main, len(rows) - n_main, per_step, cfg.batch_size, run.world_size, cfg.seed,
                       decay_start, cfg.mid_ratio)

    model = lora.load_trainable(cfg, run.checkpoint, run.device, meta=parallel.builds_on_meta(run, cfg))
    model.train()
    ddp_model = parallel.wrap(model, run, cfg)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    start_step = run.begin(model, tokenizer, optimizer, total_steps)

    for step in range(start_step, total_steps):
        lr = schedule_lr(run, optimizer, step, cfg.schedule, cfg.decay_fraction)
        global_batches = plan.all_micro_batches(step)
        # Token-mean over the whole global batch: every micro-batch on every process divides by the
        # same global label count, and DDP averages gradients over processes (hence * world_size).
        n_labels = sum(labels[i] for b in global_batches for i in b)
        sums = {"loss": 0.0, "tokens": 0, "mid_rows": 0, "mid_label_tokens": 0}
        for idx in micro_steps(ddp_model, plan.micro_batches(step, run.dist.rank)):
            batch = collate([rows[i].input_ids for i in idx], [rows[i].loss_mask for i in idx],
                            tokenizer.pad_token_id, run.device)
            logps, mask = next_token_logps(ddp_model, **batch)  # (B, T-1)
            loss = aggregate(-logps, mask, "token_mean", denominator=n_labels) * run.world_size
            loss.backward()
            from_mid = torch.tensor([i >= n_main for i in idx], device=mask.device)  # (B,)
            sums["loss"] += loss.item()
            sums["tokens"] += sum(len(rows[i].input_ids) for i in idx)
            sums["mid_rows"] += int(from_mid.sum())
            sums["mid_label_tokens"] += int(mask[from_mid].sum())
        sums = run.dist.reduce_sums(sums)
        step_loss = sums["loss"] / run.world_size
        grad_norm = optimizer_step(run, model, optimizer, step_loss, step + 1, f" (blocks {global_batches})")
        run.count(tokens=int(sums["tokens"]))
        run.log(step + 1, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "label_tokens": n_labels,
                           "mid_rows": int(sums["mid_rows"]), "mid_fraction": sums["mid_rows"] / per_step,
                           "mid_label_tokens": int(sums["mid_label_tokens"])}, tokens=int(sums["tokens"]))
        run.end_step(step + 1)
    return run.finish(counts)
