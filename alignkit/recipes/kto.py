"""alignkit kto: Kahneman-Tversky optimisation on unpaired preferences (a thumbs up or down per answer).

KTO (Ethayarajh et al. 2024) needs no pairs: each example is one completion labelled desirable
or undesirable ({prompt, completion, label}; paired {prompt, chosen, rejected} data is unpaired
automatically by `load_unpaired`). With the implicit reward r = log pi(y|x) - log ref(y|x) (as in
DPO, seed notes 002 §13.6.2) and a reference point z0, the value of a desirable completion is
sigmoid(beta (r - z0)) and of an undesirable one sigmoid(beta (z0 - r)); the loss is
weight * (1 - value) (`losses.kto_loss`).

z0 estimates KL(pi || ref) on mismatched prompt/completion pairs (the paper's and TRL's
estimator): within each global batch, example k's completion is scored after example k+1's prompt
(shifted), under the policy and the reference. It is detached, averaged over the whole global
batch (all-reduced across DDP processes, so 1 process with accumulation and N processes agree)
and clamped at 0. The mismatched pairs of a step follow from the deterministic StepPlan, so
their reference log-probs are precomputed with the others (`--precompute-ref`, default on).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from alignkit import lora
from alignkit.config import TrainConfig
from alignkit.data import load_unpaired
from alignkit.logprobs import completion_logps, pack_completions
from alignkit.losses import kto_loss
from alignkit.models import load_tokenizer
from alignkit.train.batching import StepPlan, length_grouped_batches, shuffled_batches
from alignkit.train.optim import adamw, lr_factor, set_lr
from alignkit.train.run import Run


@dataclass
class KTOConfig(TrainConfig):
    """KTO on unpaired {prompt, completion, label} examples (or paired data, split into two)."""

    lr: float = 1e-6
    """Peak learning rate (AdamW); TRL's KTO default."""
    batch_size: int = 8
    """Examples per micro-batch on each process. The KL reference point is estimated over the global batch."""
    beta: float = 0.1
    """Strength of the implicit KL to the reference (higher = stay closer)."""
    desirable_weight: float = 1.0
    """Loss weight of desirable examples (lambda_D)."""
    undesirable_weight: float = 1.0
    """Loss weight of undesirable examples (lambda_U). The paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3]."""
    precompute_ref: bool = True
    """Compute reference log-probs (incl. the mismatched KL pairs) once before training and free the reference model."""
    ref_model: str | None = None
    """Reference model directory (default: --model, or the base model with adapters disabled under LoRA)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, same expected gradient)."""


def mismatched_pairs(global_batches: list[list[int]], examples) -> list[list[tuple[int, int]]]:
    """Per micro-batch, the (prompt index, completion index) rows of the KL estimate: completion k
    after the prompt of example k+1 of the global batch (cyclically), skipping examples that share
    k's prompt (the two halves of an unpaired pair would not be mismatched)."""
    flat = [i for b in global_batches for i in b]
    n, rows = len(flat), []
    for k, i in enumerate(flat):
        shift = next((s for s in range(1, n) if examples[flat[(k + s) % n]].prompt_ids != examples[i].prompt_ids), 1)
        rows.append((flat[(k + shift) % n], i))
    out, k = [], 0
    for b in global_batches:
        out.append(rows[k:k + len(b)])
        k += len(b)
    return out


def rows_logps(model, examples, rows: list[tuple[int, int]], pad_id: int, device) -> torch.Tensor:
    """log pi(completion of c | prompt of p), (R,), for rows (p, c), in one forward pass."""
    batch = pack_completions([examples[p].prompt_ids for p, _ in rows],
                             [examples[c].completion_ids for _, c in rows], pad_id, device)
    return completion_logps(model, batch)[0]  # (R,)


@torch.no_grad()
def reference_logps(ref_model, examples, rows: list[tuple[int, int]], pad_id: int, batch_size: int, device,
                    dist=None) -> dict[tuple[int, int], float]:
    """Reference log-probs of the (prompt, completion) rows, sorted by length for little padding;
    under DDP each process computes every world_size-th batch and the results are summed."""
    order = sorted(rows, key=lambda r: -(len(examples[r[0]].prompt_ids) + len(examples[r[1]].completion_ids)))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    values = torch.zeros(len(order), dtype=torch.float64)
    was_training = ref_model.training
    ref_model.eval()
    with lora.reference(ref_model):  # adapters off: the base model is the reference
        for b in range(rank, len(batches), world):
            values[b * batch_size:b * batch_size + len(batches[b])] = rows_logps(
                ref_model, examples, batches[b], pad_id, device).double().cpu()
    ref_model.train(was_training)
    values = dist.all_reduce_sum(values).cpu() if dist is not None else values
    return dict(zip(order, values.tolist()))


def main(cfg: KTOConfig) -> dict:
    if not cfg.data:
        raise SystemExit("error: alignkit kto needs --data FILE")
    if cfg.beta <= 0:
        raise SystemExit(f"error: --beta must be > 0, got {cfg.beta}")
    run = Run(cfg, "kto")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    examples, stats = load_unpaired(list(cfg.data), tokenizer, cfg.max_length, strict=cfg.strict)
    if run.is_main:
        stats.warn()
        n_d = sum(ex.label for ex in examples)
        ratio = cfg.desirable_weight * n_d / max(1e-9, cfg.undesirable_weight * (len(examples) - n_d))
        if not 1 <= ratio <= 4 / 3:  # Ethayarajh et al. 2024, §4.2 (eq. 9)
            print(f"note: {n_d} desirable / {len(examples) - n_d} undesirable examples; lambda_D n_D / (lambda_U n_U) "
                  f"= {ratio:.2f}, the paper advises [1, 4/3] (adjust --desirable-weight / --undesirable-weight)")
    lengths = [len(ex.prompt_ids) + len(ex.completion_ids) for ex in examples]

    model = lora.load_trainable(cfg, run.checkpoint, run.device)
    model.eval()  # dropout off, as in TRL: policy and reference log-probs must be computed alike
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)

    def make_epoch(epoch: int) -> list[list[int]]:
        if cfg.group_by_length:
            return length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch)
        return shuffled_batches(len(examples), cfg.batch_size, seed=cfg.seed + epoch)

    plan = StepPlan(make_epoch, cfg.grad_accum, run.world_size)
    if plan.per_step * cfg.batch_size < 2:
        raise SystemExit("error: KTO's KL estimate needs at least 2 examples per optimizer step")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * plan.steps_per_epoch)
    start_step = run.begin(model, tokenizer, optimizer, total_steps)

    t_start = time.perf_counter()
    ref = lora.reference_model(cfg, model, run.checkpoint is not None, run.device)
    ref_table = None
    if cfg.precompute_ref:
        rows = set()
        for s in range(start_step, total_steps):
            batches = plan.all_micro_batches(s)
            rows |= {(i, i) for b in batches for i in b} | {r for mb in mismatched_pairs(batches, examples) for r in mb}
        if run.is_main:
            print(f"computing reference log-probs for {len(rows)} prompt/completion rows (incl. mismatched KL pairs)")
        ref_table = reference_logps(ref, examples, sorted(rows), pad_id, cfg.batch_size, run.device, run.dist)
        ref = None

    def ref_logps(rows: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
        if ref_table is not None:
            return torch.tensor([ref_table[r] for r in rows], dtype=like.dtype, device=like.device)
        with torch.no_grad(), lora.reference(ref):
            return rows_logps(ref, examples, rows, pad_id, run.device)

    ref_seconds = time.perf_counter() - t_start
    run.speed.rate()  # restart the tokens/s interval after the reference pass
    ddp_model = DDP(model) if run.world_size > 1 else model
    # Totals over the whole run, carried across --resume in the checkpoint's state.
    total_examples, total_tokens = run.state.get("pairs", 0), run.state.get("tokens", 0)
    done_before = total_examples

    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup_steps, "cosine", cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        global_batches = plan.all_micro_batches(step)
        n = sum(len(b) for b in global_batches)
        micro = plan.micro_batches(step, run.dist.rank)
        all_kl_rows = mismatched_pairs(global_batches, examples)
        kl_rows = all_kl_rows[run.dist.rank::run.world_size]  # this process's share, like its micro-batches
        step_tokens = sum(lengths[i] for b in global_batches for i in b)  # + the KL rows' tokens:
        step_tokens += sum(len(examples[p].prompt_ids) + len(examples[c].completion_ids) for mb in all_kl_rows
                           for p, c in mb)

        # 1. Reference point z0: mean of log pi - log ref on the mismatched pairs of the whole global
        #    batch, under the current policy, before any of this step's backward passes.
        kl_sum = 0.0
        with torch.no_grad():
            for rows in kl_rows:
                logps = rows_logps(model, examples, rows, pad_id, run.device)  # (B,)
                kl_sum += (logps - ref_logps(rows, logps)).sum().item()
        kl = run.dist.all_reduce_sum(kl_sum).item() / n  # kto_loss clamps it at 0 and detaches it

        # 2. The loss: mean over the examples of the global batch (summed / global count, x world_size
        #    because DDP averages gradients over processes).
        sums = torch.zeros(5, dtype=torch.float64)  # loss, desirable count, reward sum, undesirable count, sum
        for k, idx in enumerate(micro):
            sync = k == len(micro) - 1 or run.world_size == 1
            rows = [(i, i) for i in idx]
            labels = torch.tensor([examples[i].label for i in idx], device=run.device)
            with nullcontext() if sync else ddp_model.no_sync():
                logps = rows_logps(ddp_model, examples, rows, pad_id, run.device)  # (B,)
                ref_lp = ref_logps(rows, logps)  # (B,)
                losses = kto_loss(logps, ref_lp, labels, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
                loss = losses.sum() / n * run.world_size
                loss.backward()
            rewards = (cfg.beta * (logps - ref_lp)).detach().double().cpu()  # (B,) implicit rewards
            desirable = labels.cpu()
            sums += torch.tensor([losses.detach().sum().item(), desirable.sum().item(), rewards[desirable].sum().item(),
                                  (~desirable).sum().item(), rewards[~desirable].sum().item()], dtype=torch.float64)
        loss_sum, n_d, r_d, n_u, r_u = run.dist.all_reduce_sum(sums).tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        if run.check(loss_sum / n, step + 1, f" (examples {global_batches})"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total_examples += n
        total_tokens += step_tokens
        rewards_d = r_d / n_d if n_d else None  # a global batch may hold only one label
        rewards_u = r_u / n_u if n_u else None
        run.log(step + 1, {"epoch": (step + 1) / plan.steps_per_epoch, "loss": loss_sum / n, "kl": kl,
                           "rewards_desirable": rewards_d, "rewards_undesirable": rewards_u,
                           "reward_gap": rewards_d - rewards_u if n_d and n_u else None,
                           "desirable_fraction": n_d / n, "lr": lr, "grad_norm": grad_norm.item(),
                           "pairs_per_s": n / (time.perf_counter() - t_step)}, tokens=step_tokens)
        run.end_step(step + 1, {"pairs": total_examples, "tokens": total_tokens})

    seconds = time.perf_counter() - t_start
    return run.finish({"pairs": total_examples, "tokens": total_tokens,
                       "pairs_per_s": (total_examples - done_before) / seconds,  # examples trained in this launch
                       "ref_seconds": ref_seconds, "examples": len(examples), "truncated": stats.truncated,
                       "dropped": stats.dropped, "skipped_batches_per_epoch": plan.skipped_per_epoch})
