"""alignkit kto: Kahneman-Tversky optimisation on unpaired preferences (a thumbs up or down per answer).

KTO (Ethayarajh et al. 2024) needs no pairs: each example is one completion labelled desirable
or undesirable ({prompt, completion, label}; paired {prompt, chosen, rejected} data is unpaired
automatically by `load_unpaired`). With the implicit reward r = log pi(y|x) - log ref(y|x) (as in
DPO, the notes, §13.6.2) and a reference point z0, the value of a desirable completion is
sigmoid(beta (r - z0)) and of an undesirable one sigmoid(beta (z0 - r)); the loss is
weight * (1 - value) (`losses.kto_loss`).

z0 estimates KL(pi || ref) on mismatched prompt/completion pairs (the paper's and TRL's
estimator): within each global batch, example k's completion is scored after example k+1's prompt
(shifted), under the policy and the reference. It is detached, averaged over the whole global
batch (all-reduced across DDP processes, so 1 process with accumulation and N processes agree)
and clamped at 0. The mismatched pairs of a step follow from the deterministic StepPlan, so
their reference log-probs are precomputed with the others (`--precompute-ref`, default on), in
batches fixed by the data and the step (`alignkit.train.reference`): a resumed run is bit-identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from alignkit import lora
from alignkit.config import TrainConfig
from alignkit.data import load_unpaired
from alignkit.logprobs import completion_logps, pack_completions
from alignkit.losses import kto_loss
from alignkit.models import load_tokenizer
from alignkit.train import parallel
from alignkit.train.batching import StepPlan, epoch_batches
from alignkit.train.optim import adamw
from alignkit.train.reference import fixed_batches, needed_batches, precompute
from alignkit.train.run import Run
from alignkit.train.step import accumulate, optimizer_step, schedule_lr


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


def row_length(examples, row: tuple[int, int]) -> int:
    return len(examples[row[0]].prompt_ids) + len(examples[row[1]].completion_ids)


def reference_table(ref_model, examples, plan, steps, pad_id: int, batch_size: int, device, dist=None) -> dict:
    """Reference log-probs of every row `steps` use: each example's own completion, keyed (i, i), in fixed
    batches over all examples; each step's mismatched KL rows, keyed (step, p, c), in fixed batches of
    that step's rows (`train.reference`: a value never depends on which steps are still to run)."""
    rows = [(i, i) for i in range(len(examples))]
    used = {i for s in steps for b in plan.all_micro_batches(s) for i in b}
    batches = needed_batches(fixed_batches([row_length(examples, r) for r in rows], batch_size), used)
    keys: list = list(rows)
    for s in steps:
        kl_rows = [r for mb in mismatched_pairs(plan.all_micro_batches(s), examples) for r in mb]
        batches += [[len(rows) + j for j in b] for b in fixed_batches([row_length(examples, r) for r in kl_rows],
                                                                       batch_size)]
        rows += kl_rows
        keys += [(s, *r) for r in kl_rows]
    logps_of = lambda model, idx: rows_logps(model, examples, [rows[j] for j in idx], pad_id, device)  # noqa: E731
    return dict(zip(keys, precompute(ref_model, batches, logps_of, len(rows), 1, dist)[:, 0].tolist()))


def reference_for(cfg, model, examples, plan, steps, pad_id: int, run):
    """`ref(rows, like, step=None) -> reference log-probs (R,)` of (prompt, completion) rows (`step` for a
    step's KL rows): from the table computed here, or a frozen reference's forward (--no-precompute-ref)."""
    ref = lora.reference_model(cfg, model, run.device, cfg.ref_model,
                               frozen_copy=run.checkpoint is not None or not cfg.precompute_ref)
    if not cfg.precompute_ref:
        def per_batch(rows, like, step=None):
            with torch.no_grad(), lora.reference(ref):
                return rows_logps(ref, examples, rows, pad_id, run.device)
        return per_batch
    table = reference_table(ref, examples, plan, steps, pad_id, cfg.batch_size, run.device, run.dist)
    if run.is_main:
        print(f"computed reference log-probs for {len(table)} prompt/completion rows (incl. mismatched KL pairs)")
    return lambda rows, like, step=None: torch.tensor([table[r if step is None else (step, *r)] for r in rows],
                                                      dtype=like.dtype, device=like.device)


def check(cfg: KTOConfig) -> None:
    if not cfg.data:
        raise SystemExit("error: alignkit kto needs --data FILE")
    if cfg.beta <= 0:
        raise SystemExit(f"error: --beta must be > 0, got {cfg.beta}")


def warn_label_balance(cfg: KTOConfig, examples) -> None:
    n_d = sum(ex.label for ex in examples)
    ratio = cfg.desirable_weight * n_d / max(1e-9, cfg.undesirable_weight * (len(examples) - n_d))
    if not 1 <= ratio <= 4 / 3:  # Ethayarajh et al. 2024, §4.2 (eq. 9)
        print(f"note: {n_d} desirable / {len(examples) - n_d} undesirable examples; lambda_D n_D / (lambda_U n_U) "
              f"= {ratio:.2f}, the paper advises [1, 4/3] (adjust --desirable-weight / --undesirable-weight)")


@torch.no_grad()
def kl_estimate(model, examples, kl_rows, reference, step: int, n: int, pad_id: int, run) -> float:
    """z0: mean of log pi - log ref over the mismatched rows of the whole global batch (`n` rows), under
    the current policy, before any of the step's backward passes (kto_loss clamps it at 0)."""
    kl_sum = 0.0
    for rows in kl_rows:
        logps = rows_logps(model, examples, rows, pad_id, run.device)  # (B,)
        kl_sum += (logps - reference(rows, logps, step)).sum().item()
    return run.dist.reduce_sums({"kl": kl_sum})["kl"] / n


def train_micro_batch(cfg, model, examples, idx, reference, kl: float, n: int, world_size: int, pad_id: int,
                      device) -> dict:
    """Forward and backward of the examples `idx`: their share of the mean over the global batch's `n`
    examples (x world_size: DDP averages gradients over processes). Returns the sums of the logged metrics."""
    rows = [(i, i) for i in idx]
    labels = torch.tensor([examples[i].label for i in idx], device=device)
    logps = rows_logps(model, examples, rows, pad_id, device)  # (B,)
    ref_logps = reference(rows, logps)  # (B,)
    losses = kto_loss(logps, ref_logps, labels, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    (losses.sum() / n * world_size).backward()
    rewards = (cfg.beta * (logps - ref_logps)).detach().double().cpu()  # (B,) implicit rewards
    desirable = labels.cpu()
    return {"loss": losses.detach().sum().item(), "desirable": desirable.sum().item(),
            "rewards_desirable": rewards[desirable].sum().item(), "undesirable": (~desirable).sum().item(),
            "rewards_undesirable": rewards[~desirable].sum().item()}


def step_row(sums: dict, kl: float, n: int) -> dict:
    """The logged metrics of a step from its summed ones (a global batch may hold only one label)."""
    n_d, n_u = sums["desirable"], sums["undesirable"]
    rewards_d = sums["rewards_desirable"] / n_d if n_d else None
    rewards_u = sums["rewards_undesirable"] / n_u if n_u else None
    return {"loss": sums["loss"] / n, "kl": kl, "rewards_desirable": rewards_d, "rewards_undesirable": rewards_u,
            "reward_gap": rewards_d - rewards_u if n_d and n_u else None, "desirable_fraction": n_d / n}


def main(cfg: KTOConfig) -> dict:
    check(cfg)
    run = Run(cfg, "kto")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    examples, stats = load_unpaired(list(cfg.data), tokenizer, cfg.max_length, strict=cfg.strict)
    if run.is_main:
        stats.warn()
        warn_label_balance(cfg, examples)

    model = lora.load_trainable(cfg, run.checkpoint, run.device, meta=parallel.builds_on_meta(run, cfg))
    model.eval()  # dropout off, as in TRL: policy and reference log-probs must be computed alike
    ddp_model = parallel.wrap(model, run, cfg)  # before the optimizer: FSDP replaces the parameters
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    lengths = [len(ex.prompt_ids) + len(ex.completion_ids) for ex in examples]
    plan = StepPlan(epoch_batches(lengths, cfg.batch_size, cfg.seed, cfg.group_by_length), cfg.grad_accum,
                    run.world_size)
    if plan.per_step * cfg.batch_size < 2:
        raise SystemExit("error: KTO's KL estimate needs at least 2 examples per optimizer step")
    total_steps = plan.total_steps(cfg.max_steps, cfg.epochs)
    start_step = run.begin(model, tokenizer, optimizer, total_steps, totals=("pairs", "tokens"))

    t_start = time.perf_counter()
    reference = reference_for(cfg, model, examples, plan, range(start_step, total_steps), pad_id, run)
    ref_seconds = time.perf_counter() - t_start
    run.speed.rate()  # restart the tokens/s interval after the reference pass

    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        lr = schedule_lr(run, optimizer, step)
        global_batches = plan.all_micro_batches(step)
        n = sum(len(b) for b in global_batches)
        all_kl_rows = mismatched_pairs(global_batches, examples)
        step_tokens = sum(lengths[i] for b in global_batches for i in b) + sum(
            row_length(examples, r) for mb in all_kl_rows for r in mb)  # the KL rows go through the model too
        kl_rows = all_kl_rows[run.dist.rank::run.world_size]  # this process's share, like its micro-batches
        kl = kl_estimate(model, examples, kl_rows, reference, step, n, pad_id, run)
        sums = accumulate(ddp_model, plan.micro_batches(step, run.dist.rank), lambda idx: train_micro_batch(
            cfg, ddp_model, examples, idx, reference, kl, n, run.world_size, pad_id, run.device))
        row = step_row(run.dist.reduce_sums(sums), kl, n)
        grad_norm = optimizer_step(run, model, optimizer, row["loss"], step + 1, f" (examples {global_batches})")
        run.count(pairs=n, tokens=step_tokens)
        run.log(step + 1, {"epoch": (step + 1) / plan.steps_per_epoch, **row, "lr": lr, "grad_norm": grad_norm,
                           "pairs_per_s": n / (time.perf_counter() - t_step)}, tokens=step_tokens)
        run.end_step(step + 1)

    seconds = time.perf_counter() - t_start
    return run.finish({"pairs_per_s": run.counted_this_launch("pairs") / seconds,  # examples trained in this launch
                       "ref_seconds": ref_seconds, "examples": len(examples), "truncated": stats.truncated,
                       "dropped": stats.dropped, "skipped_batches_per_epoch": plan.skipped_per_epoch})
