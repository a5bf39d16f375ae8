"""alignkit reward: a Bradley-Terry reward model, InstructGPT step 2.

The SFT model's backbone with the language-modelling head replaced by a scalar head (a linear
"reward head", the notes, §13.4.1: the backbone is reused so the scorer inherits the model's
understanding of language). Trained on preference pairs with ``-log sigmoid(r_c - r_r - m)``
(Bradley & Terry 1952; Ouyang et al. 2022, eq. 1; the optional per-pair margin m is Llama 2's,
Touvron et al. 2023, eq. 2). The score of a sequence is the head's output at its last real
token, found from the attention mask (`models.LastTokenReward`; HF's classifier would skip a final
EOS when pad == EOS). Chosen and rejected rows go through the model in one forward pass, each distinct
(prompt, answer) once. With ``--group-by-prompt`` every pair of a prompt is in the same batch: data
made of all comparisons of a ranking of K answers (InstructGPT §3.5: K = 4-9, C(K,2) pairs each) then
costs K forward rows per prompt instead of 2 C(K,2), and the correlated comparisons form one update
("a single pass over the shuffled comparisons caused the reward model to overfit").

Held-out evaluation (`--eval-data`) reports pairwise accuracy and the calibration of
P(chosen wins) = sigmoid(r_c - r_r) (expected calibration error, `alignkit.eval.calibration`).
The saved model loads with `AutoModelForSequenceClassification.from_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.distributed as torch_dist

from alignkit import lora
from alignkit.config import Repeatable, TrainConfig
from alignkit.data import load_preference
from alignkit.data.formats import read_records
from alignkit.eval import pairwise_accuracy, preference_calibration_error, reliability_bins
from alignkit.logprobs import pack_completions
from alignkit.losses import bradley_terry_loss
from alignkit.models import LastTokenReward, load_reward_model, load_tokenizer, unwrap
from alignkit.train import parallel
from alignkit.train.batching import StepPlan, epoch_batches
from alignkit.train.optim import adamw
from alignkit.train.run import Run
from alignkit.train.step import accumulate, optimizer_step, schedule_lr


@dataclass
class RewardConfig(TrainConfig):
    """Train a scalar reward model on preference pairs {prompt, chosen, rejected}."""

    lr: float = 1e-5
    """Peak learning rate (AdamW). InstructGPT's reward models used 9e-6; tiny models take more."""
    batch_size: int = 8
    """Pairs per micro-batch on each process (2x rows go through the model); with --group-by-prompt, prompts
    per micro-batch, each with all its pairs. Global batch = batch_size * grad_accum * processes."""
    margin: bool = False
    """Use the per-pair `margin` field of the data in the loss (Llama 2); pairs without one get 0."""
    eval_data: Annotated[tuple[str, ...], Repeatable] = ()
    """Held-out preference pairs: accuracy and calibration at the end (and every --eval-every steps)."""
    eval_every: int = 0
    """Also evaluate every N optimizer steps (0 = only at the end)."""
    group_by_length: bool = True
    """Batch pairs of similar length together (less padding, same expected gradient)."""
    group_by_prompt: bool = False
    """Batch whole prompts: all pairs of a prompt in one micro-batch, --batch-size prompts per micro-batch
    (InstructGPT's reward-model batches for ranked data). Takes precedence over --group-by-length."""


def read_margins(paths: list[str], n_pairs: int) -> list[float]:
    """The `margin` field of every record (0 where absent), in file order."""
    margins = [float(rec.get("margin", 0.0)) for path in paths for _, rec in read_records(path)]
    if len(margins) != n_pairs:
        raise SystemExit(f"error: --margin: {len(margins) - n_pairs} pair(s) were dropped as too long, so margins "
                         "cannot be matched to pairs; raise --max-length or drop those records")
    if not any(margins):
        print("warning: --margin given but no record has a nonzero `margin` field; the loss uses margin 0")
    return margins


def distinct_rows(pairs) -> tuple[list[tuple], list[int]]:
    """The distinct (prompt, answer) rows among [chosens; rejecteds] of `pairs`, and the row of each of
    those 2B answers."""
    answers = [(ex.prompt_ids, ex.chosen_ids) for ex in pairs] + [(ex.prompt_ids, ex.rejected_ids) for ex in pairs]
    rows: dict[tuple, int] = {}  # (prompt, answer) -> its row
    index = [rows.setdefault((tuple(p), tuple(a)), len(rows)) for p, a in answers]
    return list(rows), index


def pair_rewards(model, pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rewards of chosen and rejected, each (B,), from ONE forward over the distinct rows among
    [chosen; rejected] (pairs from one ranking share answers; each is scored once).
    `model`: a `LastTokenReward` (possibly DDP-wrapped) or a sequence classifier, which is wrapped."""
    rows, index = distinct_rows(pairs)
    batch = pack_completions([list(p) for p, _ in rows], [list(c) for _, c in rows], pad_id, device)
    reward = model if isinstance(unwrap(model), LastTokenReward) else LastTokenReward(model)
    rewards = reward(batch["input_ids"], batch["attention_mask"])[torch.tensor(index, device=device)]  # (2B,)
    return rewards[:len(pairs)], rewards[len(pairs):], batch


def forward_tokens(pairs) -> int:
    """Tokens `pair_rewards` runs through the model for these pairs: each distinct (prompt, answer) once."""
    return sum(len(p) + len(c) for p, c in distinct_rows(pairs)[0])


@torch.no_grad()
def evaluate(model, examples, margins, pad_id: int, batch_size: int, device="cpu", rank: int = 0,
             world_size: int = 1) -> dict:
    """Held-out accuracy, mean margin r_c - r_r, loss and calibration. Each process scores its share
    of the pairs; the scores are gathered so every process returns the same numbers."""
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(examples), world_size))
    scores = []  # (index, r_c, r_r)
    for k in range(0, len(mine), batch_size):
        idx = mine[k:k + batch_size]
        r_c, r_r, _ = pair_rewards(model, [examples[i] for i in idx], pad_id, device)
        scores += list(zip(idx, r_c.tolist(), r_r.tolist()))
    if world_size > 1:
        gathered = [None] * world_size
        torch_dist.all_gather_object(gathered, scores)
        scores = [s for part in gathered for s in part]
    scores.sort()
    model.train(was_training)
    r_c = torch.tensor([s[1] for s in scores], dtype=torch.float64)  # (N,)
    r_r = torch.tensor([s[2] for s in scores], dtype=torch.float64)  # (N,)
    m = torch.tensor([margins[s[0]] for s in scores], dtype=torch.float64) if margins else None
    p = torch.sigmoid(r_c - r_r)  # (N,) P(chosen wins)
    return {"accuracy": pairwise_accuracy(r_c, r_r), "margin": float((r_c - r_r).mean()),
            "loss": float(bradley_terry_loss(r_c, r_r, m).mean()), "ece": preference_calibration_error(r_c, r_r),
            "pairs": len(scores),
            "bins": reliability_bins(torch.cat([p, 1 - p]), torch.cat([torch.ones_like(p), torch.zeros_like(p)]))}


def train_micro_batch(model, examples, idx, margins, n_pairs: int, world_size: int, pad_id: int, device) -> dict:
    """Forward and backward of the pairs `idx`: their share of the mean over the global batch's `n_pairs`
    pairs (x world_size: DDP averages gradients over processes). Returns the metrics summed over them."""
    r_c, r_r, _ = pair_rewards(model, [examples[i] for i in idx], pad_id, device)
    m = torch.tensor([margins[i] for i in idx], dtype=r_c.dtype, device=r_c.device) if margins else None
    losses = bradley_terry_loss(r_c, r_r, m)  # (B,)
    (losses.sum() / n_pairs * world_size).backward()
    r_c, r_r = r_c.detach().double().cpu(), r_r.detach().double().cpu()
    return {"loss": losses.detach().sum().item(), "accuracy": pairwise_accuracy(r_c, r_r) * len(idx),
            "margin": (r_c - r_r).sum().item()}


def write_eval(cfg: RewardConfig, step: int, result: dict, eval_stats) -> None:
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output) / "eval.json").write_text(json.dumps(
        {"step": step, **result, "truncated": eval_stats.truncated, "dropped": eval_stats.dropped}, indent=1))


def main(cfg: RewardConfig) -> dict:
    if not cfg.data:
        raise SystemExit("error: alignkit reward needs --data FILE")
    if cfg.fsdp and cfg.merge_lora and cfg.lora_r > 0:
        raise SystemExit("error: --merge-lora with --fsdp is for causal LMs; train the reward model's adapters "
                         "without --merge-lora (or without --fsdp)")
    run = Run(cfg, "reward")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    examples, stats = load_preference(list(cfg.data), tokenizer, cfg.max_length, strict=cfg.strict)
    if run.is_main:
        stats.warn()
    margins = read_margins(list(cfg.data), len(examples)) if cfg.margin else None
    eval_examples, eval_margins = [], None
    if cfg.eval_data:
        eval_examples, eval_stats = load_preference(list(cfg.eval_data), tokenizer, cfg.max_length, strict=cfg.strict)
        eval_margins = read_margins(list(cfg.eval_data), len(eval_examples)) if cfg.margin else None

    # The LM head is replaced by a fresh scalar head; with LoRA, peft's SEQ_CLS task keeps that head
    # fully trainable (and saved with the adapter) through modules_to_save.
    model = lora.load_trainable(cfg, run.checkpoint, run.device, loader=load_reward_model, pad_token_id=pad_id,
                                task_type="SEQ_CLS", meta=parallel.builds_on_meta(run, cfg))
    model.train()
    reward = LastTokenReward(model)
    ddp_model = parallel.wrap(reward, run, cfg)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    lengths = [len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids)) for ex in examples]
    prompts = [tuple(ex.prompt_ids) for ex in examples] if cfg.group_by_prompt else None
    plan = StepPlan(epoch_batches(lengths, cfg.batch_size, cfg.seed, cfg.group_by_length, group_keys=prompts),
                    cfg.grad_accum, run.world_size)
    total_steps = plan.total_steps(cfg.max_steps, cfg.epochs)
    start_step = run.begin(model, tokenizer, optimizer, total_steps, totals=("pairs", "tokens"))

    def run_eval(step: int) -> dict:
        result = evaluate(model, eval_examples, eval_margins, pad_id, cfg.batch_size, run.device, run.dist.rank,
                          run.world_size)
        run.metrics.log({"step": step, "eval": True, **{f"eval_{k}": v for k, v in result.items() if k != "bins"}})
        return result

    for step in range(start_step, total_steps):
        lr = schedule_lr(run, optimizer, step)
        global_batches = plan.all_micro_batches(step)
        n_pairs = sum(len(b) for b in global_batches)
        step_tokens = sum(forward_tokens([examples[i] for i in b]) for b in global_batches)
        sums = accumulate(ddp_model, plan.micro_batches(step, run.dist.rank), lambda idx: train_micro_batch(
            ddp_model, examples, idx, margins, n_pairs, run.world_size, pad_id, run.device))
        means = {k: v / n_pairs for k, v in run.dist.reduce_sums(sums).items()}
        grad_norm = optimizer_step(run, model, optimizer, means["loss"], step + 1, f" (pairs {global_batches})")
        run.count(pairs=n_pairs, tokens=step_tokens)
        run.log(step + 1, {"epoch": (step + 1) / plan.steps_per_epoch, **means, "lr": lr, "grad_norm": grad_norm},
                tokens=step_tokens)
        if eval_examples and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
            run_eval(step + 1)
        run.end_step(step + 1)

    final = {"examples": len(examples), "truncated": stats.truncated,
             "dropped": stats.dropped, "skipped_batches_per_epoch": plan.skipped_per_epoch}
    if eval_examples:
        result = run_eval(total_steps)
        if run.is_main:
            write_eval(cfg, total_steps, result, eval_stats)
        final.update({f"eval_{k}": v for k, v in result.items() if k != "bins"})
    return run.finish(final)
