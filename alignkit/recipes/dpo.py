"""alignkit dpo: offline preference optimisation (DPO and its family) on {prompt, chosen, rejected} pairs.

DPO (Rafailov et al. 2023, eq. 7; the notes, §13.6.2) needs no reward model and no RL loop:
the policy's log-ratio to a frozen reference, beta * log(pi(y|x) / ref(y|x)), is an implicit
reward, and a logistic loss on the chosen-minus-rejected difference of that reward raises chosen
answers relative to rejected ones. `--loss` picks the pairwise objective (all in `alignkit.losses`):

    sigmoid  DPO; with --label-smoothing eps, conservative DPO (Mitchell 2023)      beta 0.1
    robust   unbiased under label-flip rate eps (Chowdhury et al. 2024)            beta 0.1
    hinge    SLiC hinge on reference-normalised log-ratios (Zhao et al. 2023)      beta 0.1
    ipo      IPO, squared loss on length-averaged log-ratios (Azar et al. 2023)    beta (= tau) 0.1
    ln_dpo   length-normalised DPO (Tulu 3, Lambert et al. 2024; the notes, §13.6.3)     beta 5.0
    simpo    SimPO, reference-free, with target margin --gamma (Meng et al. 2024)  beta 2.0

(the right column is the default when --beta is not given: per-token log-ratios are ~|y| times
smaller than sequence ones, so the length-normalised losses need a much larger beta.)

Reference log-probs never change, so by default (`--precompute-ref`) they are computed once, before
training, for the pairs the run will use, and the reference model is freed: training then holds
one model. With LoRA the reference is the base model with adapters disabled (no second copy).
SimPO has no reference at all. On `--resume` they are recomputed in the same fixed batches
(`alignkit.train.reference`), so the resumed run is bit-identical to the uninterrupted one (and
recomputing is cheaper than keeping a cache consistent with the data, the model and --max-length).

Chosen and rejected rows of a micro-batch go through the policy in ONE forward pass (2B rows).
Dropout is off, as in TRL (disable_dropout): the implicit reward compares policy and reference
log-probs, which must be computed the same way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal

import torch

from alignkit import lora
from alignkit.config import TrainConfig
from alignkit.data import load_preference
from alignkit.logprobs import completion_logps, pack_completions
from alignkit.losses import chosen_nll, dpo_loss, length_normalized_dpo_loss, simpo_loss
from alignkit.models import load_tokenizer
from alignkit.train import parallel
from alignkit.train.batching import StepPlan, epoch_batches
from alignkit.train.optim import adamw
from alignkit.train.reference import fixed_batches, needed_batches, precompute
from alignkit.train.run import Run
from alignkit.train.step import accumulate, optimizer_step, schedule_lr

DEFAULT_BETA = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.1, "ln_dpo": 5.0, "simpo": 2.0}


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation (and IPO, robust, hinge, LN-DPO, SimPO) on preference pairs."""

    lr: float = 1e-6
    """Peak learning rate (AdamW). DPO moves far from the reference quickly; TRL's default is 1e-6."""
    batch_size: int = 8
    """Pairs per micro-batch on each process (2x rows go through the model). Global batch = batch_size * grad_accum * processes."""
    loss: Literal["sigmoid", "robust", "hinge", "ipo", "ln_dpo", "simpo"] = "sigmoid"
    """sigmoid = DPO (Rafailov 2023), robust (Chowdhury 2024), hinge = SLiC (Zhao 2023), ipo (Azar 2023), ln_dpo (Tulu 3), simpo (Meng 2024)."""
    beta: float | None = None
    """Strength of the implicit KL to the reference (higher = stay closer). Default per loss: 0.1 (sigmoid, robust, hinge, ipo), 5.0 (ln_dpo), 2.0 (simpo)."""
    gamma: float = 0.5
    """SimPO target reward margin (simpo only)."""
    label_smoothing: float = 0.0
    """Assumed rate of flipped preference labels, in [0, 0.5) (sigmoid = cDPO, robust)."""
    rpo_alpha: float = 0.0
    """Weight of an NLL term on the chosen response, per token (RPO, Pang et al. 2024; TRL's rpo_alpha). 0 = off."""
    precompute_ref: bool = True
    """Compute reference log-probs once before training, so no reference model is held during training."""
    ref_model: str | None = None
    """Reference model directory (default: --model, or the base model with adapters disabled under LoRA)."""
    group_by_length: bool = True
    """Batch pairs of similar length together (less padding, same expected gradient)."""


def pair_logps(model, pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi(chosen|x), log pi(rejected|x) (summed over completion tokens) and completion lengths,
    each (B,), from ONE forward pass over the 2B rows [chosen; rejected]."""
    prompts = [ex.prompt_ids for ex in pairs] * 2
    completions = [ex.chosen_ids for ex in pairs] + [ex.rejected_ids for ex in pairs]
    logps, lengths, _ = completion_logps(model, pack_completions(prompts, completions, pad_id, device))  # (2B,)
    B = len(pairs)
    return logps[:B], logps[B:], lengths[:B], lengths[B:]


def pair_length(ex) -> int:
    """The padded width a pair sets: its prompt and the longer of its two answers."""
    return len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))


def reference_logps(ref_model, examples, indices, pad_id: int, batch_size: int, device, dist=None) -> torch.Tensor:
    """(N, 2) float64 table of reference log-probs [chosen, rejected] for the pairs in `indices` (0 for
    pairs of batches that hold none of them), from fixed batches over all pairs (`train.reference`)."""
    batches = needed_batches(fixed_batches([pair_length(ex) for ex in examples], batch_size), indices)
    def logps_of(model, idx):  # (B, 2)
        return torch.stack(pair_logps(model, [examples[i] for i in idx], pad_id, device)[:2], 1)
    return precompute(ref_model, batches, logps_of, len(examples), 2, dist)


def reference_for(cfg, model, examples, needed, pad_id: int, run):
    """`ref(indices, like) -> (ref chosen logps, ref rejected logps)`, (B,) each: from the table computed
    here for the `needed` pairs, from a frozen reference's forward per micro-batch (--no-precompute-ref),
    or zeros (SimPO has no reference)."""
    if cfg.loss == "simpo":
        return lambda idx, like: (torch.zeros_like(like), torch.zeros_like(like))
    ref = lora.reference_model(cfg, model, run.device, cfg.ref_model,
                               frozen_copy=run.checkpoint is not None or not cfg.precompute_ref)
    if not cfg.precompute_ref:
        def per_batch(idx, like):
            with torch.no_grad(), lora.reference(ref):
                return pair_logps(ref, [examples[i] for i in idx], pad_id, run.device)[:2]
        return per_batch
    if run.is_main:
        print(f"computing reference log-probs for {len(needed)} pairs")
    table = reference_logps(ref, examples, needed, pad_id, cfg.batch_size, run.device, run.dist)
    return lambda idx, like: (table[idx, 0].to(like), table[idx, 1].to(like))


def preference_loss(cfg, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, rejected_lengths):
    """Per-pair losses (B,) and implicit rewards of chosen and rejected (B,), per `--loss`."""
    if cfg.loss == "simpo":
        losses = simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, cfg.beta, cfg.gamma)
        # SimPO's implicit reward is the length-averaged log-prob itself, scaled by beta (eq. 4).
        per_token = lambda logps, n: cfg.beta * logps.detach() / n.clamp(min=1)  # noqa: E731
        return losses, per_token(chosen_logps, chosen_lengths), per_token(rejected_logps, rejected_lengths)
    if cfg.loss == "ln_dpo":
        return length_normalized_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                          chosen_lengths, rejected_lengths, cfg.beta)
    if cfg.loss == "ipo":  # IPO's target 1/(2 tau) is on a per-token scale: length-average the logps
        nc, nr = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
        return dpo_loss(chosen_logps / nc, rejected_logps / nr, ref_chosen_logps / nc, ref_rejected_logps / nr,
                        cfg.beta, "ipo")
    return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, cfg.beta, cfg.loss,
                    cfg.label_smoothing)


def resolved(cfg: DPOConfig) -> DPOConfig:
    """The config with its flags checked and --beta resolved (saved so)."""
    if not cfg.data:
        raise SystemExit("error: alignkit dpo needs --data FILE")
    if cfg.label_smoothing and cfg.loss not in ("sigmoid", "robust"):
        raise SystemExit(f"error: --label-smoothing applies to --loss sigmoid or robust, not {cfg.loss}")
    if cfg.rpo_alpha < 0:
        raise SystemExit(f"error: --rpo-alpha must be >= 0, got {cfg.rpo_alpha}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise SystemExit(f"error: --label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    cfg = dataclasses.replace(cfg, beta=DEFAULT_BETA[cfg.loss] if cfg.beta is None else cfg.beta)
    if cfg.beta <= 0:
        raise SystemExit(f"error: --beta must be > 0, got {cfg.beta}")
    return cfg


def train_micro_batch(cfg, model, examples, idx, reference, n_pairs: int, world_size: int, pad_id: int,
                      device) -> dict:
    """Forward and backward of the pairs `idx`: their share of the mean over the global batch's `n_pairs`
    pairs (x world_size: DDP averages gradients over processes). Returns the metrics summed over them."""
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = pair_logps(
        model, [examples[i] for i in idx], pad_id, device)
    ref_chosen_logps, ref_rejected_logps = reference(idx, chosen_logps)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        cfg, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths)
    if cfg.rpo_alpha:
        losses = losses + cfg.rpo_alpha * chosen_nll(chosen_logps, chosen_lengths)  # (B,)
    (losses.sum() / n_pairs * world_size).backward()
    # a tie counts half (alignkit.eval.pairwise_accuracy): policy == reference gives 0.5
    correct = (chosen_rewards > rejected_rewards) + 0.5 * (chosen_rewards == rejected_rewards)
    named = {"loss": losses, "reward_accuracy": correct, "reward_margin": chosen_rewards - rejected_rewards,
             "chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "chosen_length": chosen_lengths,
             "rejected_length": rejected_lengths, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    return {name: t.detach().double().sum().item() for name, t in named.items()}


def main(cfg: DPOConfig) -> dict:
    cfg = resolved(cfg)
    run = Run(cfg, "dpo")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    examples, stats = load_preference(list(cfg.data), tokenizer, cfg.max_length, strict=cfg.strict)
    if run.is_main:
        stats.warn()
    row_tokens = [2 * len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in examples]

    model = lora.load_trainable(cfg, run.checkpoint, run.device, meta=parallel.builds_on_meta(run, cfg))
    model.eval()  # dropout off (see the module docstring); gradients still flow
    ddp_model = parallel.wrap(model, run, cfg)  # before the optimizer: FSDP replaces the parameters
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    lengths = [pair_length(ex) for ex in examples]  # the longer row sets a pair's padded width
    plan = StepPlan(epoch_batches(lengths, cfg.batch_size, cfg.seed, cfg.group_by_length), cfg.grad_accum,
                    run.world_size)
    total_steps = plan.total_steps(cfg.max_steps, cfg.epochs)
    start_step = run.begin(model, tokenizer, optimizer, total_steps, totals=("pairs", "tokens"))

    t_start = time.perf_counter()
    needed = sorted({i for s in range(start_step, total_steps) for b in plan.all_micro_batches(s) for i in b})
    reference = reference_for(cfg, model, examples, needed, pad_id, run)
    ref_seconds = time.perf_counter() - t_start
    run.speed.rate()  # restart the tokens/s interval after the reference pass

    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        lr = schedule_lr(run, optimizer, step)
        global_batches = plan.all_micro_batches(step)
        n_pairs = sum(len(b) for b in global_batches)
        step_tokens = sum(row_tokens[i] for b in global_batches for i in b)
        sums = accumulate(ddp_model, plan.micro_batches(step, run.dist.rank), lambda idx: train_micro_batch(
            cfg, ddp_model, examples, idx, reference, n_pairs, run.world_size, pad_id, run.device))
        means = {k: v / n_pairs for k, v in run.dist.reduce_sums(sums).items()}
        grad_norm = optimizer_step(run, model, optimizer, means["loss"], step + 1, f" (pairs {global_batches})")
        run.count(pairs=n_pairs, tokens=step_tokens)
        run.log(step + 1, {"epoch": (step + 1) / plan.steps_per_epoch, **means, "lr": lr, "grad_norm": grad_norm,
                           "pairs_per_s": n_pairs / (time.perf_counter() - t_step)}, tokens=step_tokens)
        run.end_step(step + 1)

    seconds = time.perf_counter() - t_start  # reference pass + training, as a peer trainer would time it
    return run.finish({"pairs_per_s": run.counted_this_launch("pairs") / seconds,
                       "ref_seconds": ref_seconds, "examples": len(examples), "truncated": stats.truncated,
                       "dropped": stats.dropped, "skipped_batches_per_epoch": plan.skipped_per_epoch})
