"""Batches without wasting compute on padding, in an order that is a pure function of (seed, step),
so that resume and multi-process runs see exactly the same micro-batches as a plain run."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int = 32) -> list[list[int]]:
    """Shuffle, cut into mega-batches of `mega_batch_mult * batch_size`, sort each by length and cut
    into batches, then shuffle the batches (the `group_by_length` sampler of HF Trainer). Sequences
    in a batch have similar lengths, so little of the padded (B, T) rectangle is padding, while the
    order stays random at the scale of mega-batches. The last incomplete batch is kept."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = mega_batch_mult * batch_size
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i:i + mega], key=lambda j: -lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def grouped_batches(keys: Sequence, groups_per_batch: int, seed: int) -> list[list[int]]:
    """Examples with equal keys (e.g. the same prompt) in the same batch, `groups_per_batch` whole groups
    per batch, groups in shuffled order. For InstructGPT's reward-model batches: every comparison of one
    prompt's ranking together (Ouyang et al. 2022, §3.5), so each answer is scored once and the correlated
    comparisons form one update. The number of batches does not depend on the seed."""
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    return [[i for g in order[k:k + groups_per_batch] for i in g] for k in range(0, len(order), groups_per_batch)]


def shuffled_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[k:k + batch_size] for k in range(0, n, batch_size)]


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, by_length: bool = True,
                  group_keys: Sequence | None = None):
    """`make_epoch` for a StepPlan: epoch e's batches, seeded by seed + e. Whole groups of equal
    `group_keys` when given (`grouped_batches`), else length-grouped (`--group-by-length`, keyed on
    `lengths`, the padded width each example sets) or plainly shuffled."""
    def make_epoch(epoch: int) -> list[list[int]]:
        if group_keys is not None:
            return grouped_batches(group_keys, batch_size, seed=seed + epoch)
        if by_length:
            return length_grouped_batches(lengths, batch_size, seed=seed + epoch)
        return shuffled_batches(len(lengths), batch_size, seed=seed + epoch)
    return make_epoch


def collate(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch. Returns input_ids, attention_mask and
    loss_mask, all (B, T); loss_mask is 0 on padding. attention_mask is None when nothing is padded
    (SDPA then runs its unmasked causal kernel, which is faster on CPU)."""
    T = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)] = torch.as_tensor(s)
        attention_mask[i, :len(s)] = 1
        loss_mask[i, :len(m)] = torch.as_tensor(m)
    padded = bool((attention_mask == 0).any())
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device) if padded else None,
        "loss_mask": loss_mask.to(device),
    }


class StepPlan:
    """Maps an optimizer step to its micro-batches over repeated epochs.

    `make_epoch(e)` returns the list of batches (lists of example indices) of epoch e. Each optimizer
    step consumes `grad_accum * world_size` consecutive batches; process `rank` takes every
    `world_size`-th of them, so 1 process x K accumulation and K processes x 1 see the same data.
    An epoch's leftover batches that do not fill a step are skipped (and counted in `skipped_per_epoch`).
    """

    def __init__(self, make_epoch, grad_accum: int, world_size: int):
        self.make_epoch = make_epoch
        self.per_step = grad_accum * world_size
        self.world_size = world_size
        self._cache: dict[int, list[list[int]]] = {}
        first = self._epoch(0)
        self.steps_per_epoch = len(first) // self.per_step
        self.skipped_per_epoch = len(first) - self.steps_per_epoch * self.per_step
        if self.steps_per_epoch == 0:
            raise SystemExit(
                f"error: the data makes {len(first)} batches per epoch, fewer than one optimizer step needs "
                f"({self.per_step} = grad_accum x processes); lower --batch-size or --grad-accum or add data"
            )

    def total_steps(self, max_steps: int, epochs: float) -> int:
        """--max-steps when given (> 0), else the steps of --epochs epochs."""
        return max_steps if max_steps > 0 else math.ceil(epochs * self.steps_per_epoch)

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._cache:
            batches = self.make_epoch(e)
            if e and len(batches) // self.per_step != self.steps_per_epoch:
                raise ValueError(f"epoch {e} makes {len(batches)} batches where epoch 0 made a different number of steps")
            self._cache = {e: batches}
        return self._cache[e]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        e, i = divmod(step, self.steps_per_epoch)
        window = self._epoch(e)[i * self.per_step:(i + 1) * self.per_step]
        return window[rank::self.world_size]

    def all_micro_batches(self, step: int) -> list[list[int]]:
        e, i = divmod(step, self.steps_per_epoch)
        return self._epoch(e)[i * self.per_step:(i + 1) * self.per_step]
