"""Reference log-probs computed once, before training (the DPO family and KTO): the reference never
changes, so training then holds one model. A row's value depends only on the fixed batch it falls in,
never on which rows a run still needs, so a resumed run uses the numbers of the uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from alignkit import lora
from alignkit.train import parallel


def fixed_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Rows longest first (ties in index order) cut into batches of `batch_size`: little padding, and each
    batch a function of the lengths alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def needed_batches(batches: list[list[int]], needed) -> list[list[int]]:
    """The batches holding at least one needed row (the others need no forward pass)."""
    needed = set(needed)
    return [b for b in batches if needed.intersection(b)]


@torch.no_grad()
def precompute(ref_model, batches: list[list[int]], logps_of: Callable, n_rows: int, width: int = 1,
               dist=None) -> torch.Tensor:
    """(n_rows, width) float64 table: `logps_of(ref_model, batch)`, (B, width), for each batch, in eval mode
    with any adapters off (the base model is the reference); 0 for rows in no batch. Under DDP each process
    computes every world_size-th batch and the table is summed across processes. A sharded (FSDP) model's forward is a
    collective, so there every process runs the same number of forwards: one short of batches repeats
    the first batch and drops the result."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    table = torch.zeros(n_rows, width, dtype=torch.float64)
    mine = batches[rank::world]
    n_forwards = -(-len(batches) // world) if parallel.is_sharded(ref_model) else len(mine)
    was_training = ref_model.training
    ref_model.eval()
    # eager: one forward pass over the data does not repay a compile of the no-grad graph
    with lora.reference(ref_model), torch.compiler.set_stance("force_eager"):
        for k in range(n_forwards):
            if k < len(mine):
                table[mine[k]] = logps_of(ref_model, mine[k]).double().cpu().reshape(len(mine[k]), width)
            else:
                logps_of(ref_model, batches[0])
    ref_model.train(was_training)
    return dist.all_reduce_sum(table).cpu() if dist is not None else table
