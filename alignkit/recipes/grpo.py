"""alignkit grpo: Group Relative Policy Optimization (the notes; Shao et al. 2024, DeepSeekMath, arXiv 2402.03300).

For each prompt the policy samples a group of G completions; reward functions (verifiable rewards such
as `alignkit.rewards:numeric_match`) and/or a reward model score them, and each completion's advantage
is its reward relative to its group, (r - mean) / std (§4.1.2): no value model. Every token of the
completion gets that advantage in PPO's clipped surrogate (eq. 3), optionally with a k3 KL penalty to
the reference policy (eq. 4, --beta > 0). Variants by flag: Dr. GRPO (Liu et al. 2025: --no-scale-rewards,
--loss-agg seq_mean_token_sum_norm) and DAPO (Yu et al. 2025: --clip-eps-high, --loss-agg token_mean).

One step = one rollout batch: each process takes grad_accum x batch_size prompts (StepPlan: a pure
function of the step, so resume and DDP see the same prompts), samples G completions of each with a seed
derived from (seed, step, prompt-batch position), scores them, then runs --num-iterations updates (PPO
epochs, mu) over them, each one optimizer step accumulated over micro-batches of --mini-batch-size
completions. old_logps are the log-probs of the first update's forward pass, detached: the sampling
policy is the policy before any update, so the first ratio is exactly 1 and no extra forward is needed.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Literal

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from alignkit import lora
from alignkit.config import Repeatable, TrainConfig
from alignkit.data import load_prompts
from alignkit.generation import sample_groups
from alignkit.logprobs import next_token_logps
from alignkit.losses import aggregate, group_advantages, kl_penalty, masked_sum, ppo_policy_loss
from alignkit.models import load_causal_lm, load_tokenizer, prepare
from alignkit.rewards import load_rewards, score_completions
from alignkit.train.batching import StepPlan, collate, shuffled_batches
from alignkit.train.optim import adamw, lr_factor, set_lr
from alignkit.train.run import Run


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO on prompts (with columns such as `answer` for reward functions)."""

    batch_size: int = 2
    """Prompts per rollout batch on each process; each is sampled group_size times."""
    lr: float = 1e-6
    """Peak learning rate (AdamW). RL fine-tuning uses small steps (TRL's default too)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    max_length: int = 512
    """Longest prompt + completion: prompts longer than max_length - max_new_tokens are dropped (counted)."""
    group_size: int = 8
    """G: completions sampled per prompt; the group is each completion's baseline."""
    reward: Annotated[tuple[str, ...], Repeatable] = ()
    """Reward function MODULE:FUNCTION or path/file.py:FUNCTION (repeatable; TRL's signature, see alignkit.rewards)."""
    reward_weights: tuple[float, ...] = ()
    """Weight per reward: one per --reward, in order, then one for --reward-model if given (default all 1)."""
    reward_model: str | None = None
    """Sequence-classification reward model directory (e.g. from `alignkit reward`), scored on prompt + completion."""
    reward_timeout: float = 600.0
    """Seconds one call of a --reward function may take; past that the run stops, naming the function and the sample it hangs on (0 = no limit)."""
    max_new_tokens: int = 128
    """Completion budget in tokens; completions that reach it without a stop token count in clipped_ratio."""
    temperature: float = 1.0
    """Sampling temperature (> 0: the group needs diverse samples)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    generation_batch_size: int = 64
    """Sequences per generate call."""
    beta: float = 0.0
    """KL coefficient (k3 estimator) to the reference model; 0 = no KL term and no reference model loaded."""
    clip_eps: float = 0.2
    """PPO clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """Upper clip range (DAPO clip-higher, e.g. 0.28); default = clip_eps."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group's std (GRPO); --no-scale-rewards is Dr. GRPO."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """Loss reduction: token_mean (DAPO, TRL's default), seq_mean_token_mean (GRPO paper), seq_mean_token_sum_norm (Dr. GRPO, normaliser max_new_tokens)."""
    num_iterations: int = 1
    """mu: optimizer updates (PPO epochs) on each rollout batch."""
    mini_batch_size: int = 0
    """Completions per forward/backward micro-batch of an update (0 = all of the process's completions)."""
    mask_truncated: bool = False
    """Leave completions that hit max_new_tokens without a stop token out of the loss (DAPO overlong filtering)."""


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of the prompt batch at `position` in the step's global list of prompt batches: a resumed run
    samples as an uninterrupted one, and DDP ranks sample as the grad-accum positions of one process."""
    return (seed * 100003 + step) * 1009 + position


def main(cfg: GRPOConfig) -> dict:
    if not cfg.data:
        raise SystemExit("error: alignkit grpo needs --data FILE (records with a 'prompt' field)")
    if cfg.group_size < 2:
        raise SystemExit("error: --group-size must be >= 2 (the group is the baseline)")
    if cfg.num_iterations < 1:
        raise SystemExit("error: --num-iterations must be >= 1")
    if cfg.reward_timeout < 0:
        raise SystemExit(f"error: --reward-timeout {cfg.reward_timeout} must be >= 0 seconds (0 = no limit)")
    if cfg.temperature <= 0:
        raise SystemExit("error: --temperature must be > 0: a greedy group has identical completions and no signal")
    if cfg.max_new_tokens >= cfg.max_length:
        raise SystemExit(f"error: --max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                         f"--max-length {cfg.max_length}")
    run = Run(cfg, "grpo")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts, stats = load_prompts(list(cfg.data), tokenizer, cfg.max_length - cfg.max_new_tokens, strict=cfg.strict)
    if run.is_main:
        stats.warn()
    if not prompts:
        raise SystemExit("error: no usable prompts (all longer than max_length - max_new_tokens?)")
    reward_fns = load_rewards(cfg.reward, cfg.reward_model, tokenizer, run.device, cfg.trust_remote_code, cfg.dtype,
                              cfg=cfg)
    if cfg.reward_weights and len(cfg.reward_weights) != len(reward_fns):
        raise SystemExit(f"error: {len(cfg.reward_weights)} --reward-weights for {len(reward_fns)} rewards "
                         "(one per --reward, then one for --reward-model)")

    model = lora.load_trainable(cfg, run.checkpoint, run.device)
    model.train()
    # The reference policy (only when the KL term is on): the base with adapters disabled under LoRA,
    # otherwise a frozen copy of the initial model (--model, also when resuming).
    ref_model = None
    if cfg.beta > 0 and not lora.is_peft(model):
        ref_model = prepare(load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, run.device), cfg)
        ref_model.eval().requires_grad_(False)
    ddp_model = DDP(model) if run.world_size > 1 else model
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)

    plan = StepPlan(lambda e: shuffled_batches(len(prompts), cfg.batch_size, cfg.seed + e), cfg.grad_accum,
                    run.world_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * plan.steps_per_epoch)
    start_step = run.begin(model, tokenizer, optimizer, total_steps)
    G, ws = cfg.group_size, run.world_size
    # Totals over the whole run, carried across --resume in the checkpoint's state.
    total_completions, total_tokens = run.state.get("completions", 0), run.state.get("tokens", 0)
    done_before = total_completions
    t_run = time.perf_counter()

    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        set_lr(optimizer, lr)

        # 1. Rollout: G samples per prompt, consecutive per prompt (the layout group_advantages expects).
        exs, completion_ids, ended = [], [], []
        for k, idx in enumerate(plan.micro_batches(step, run.dist.rank)):
            torch.manual_seed(sample_seed(cfg.seed, step, run.dist.rank + k * ws))
            comps, done = sample_groups(model, tokenizer, [prompts[i].prompt_ids for i in idx], G, cfg.max_new_tokens,
                                        cfg.temperature, cfg.top_p, cfg.generation_batch_size)
            exs += [prompts[i] for i in idx for _ in range(G)]
            completion_ids += comps
            ended += done
        N = len(completion_ids)

        # 2. Rewards (TRL's convention: conversational prompts get assistant-message completions) and
        # group-relative advantages; a group whose rewards are all equal gets advantage 0: no gradient.
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if isinstance(ex.prompt, list) else t
                       for ex, t in zip(exs, texts)]
        columns = {key: [ex.columns.get(key) for ex in exs] for key in sorted({k for ex in exs for k in ex.columns})}
        rewards, per_function = score_completions(
            reward_fns, [ex.prompt for ex in exs], completions, columns, cfg.reward_weights,
            completion_ids=completion_ids, prompt_ids=[ex.prompt_ids for ex in exs],
            trainer_state=SimpleNamespace(global_step=step, max_steps=total_steps),
            on_error="nan" if cfg.skip_nonfinite else "raise", timeout=cfg.reward_timeout)  # (N,)
        advantages = group_advantages(rewards, G, normalize_std=cfg.scale_rewards).to(run.device)  # (N,)
        nonfinite = (~torch.isfinite(rewards)).nonzero().flatten().tolist()  # NaN only under --skip-nonfinite
        detail = f" (prompts {plan.all_micro_batches(step)})" + (f", non-finite rewards of completions {nonfinite}"
                                                                 if nonfinite else "")

        # 3. Loss masks: completion tokens incl. the stop token (generation cuts right after it).
        in_loss = [e or not cfg.mask_truncated for e in ended]
        seqs = [ex.prompt_ids + c for ex, c in zip(exs, completion_ids)]
        masks = [[0] * len(ex.prompt_ids) + [int(m)] * len(c) for ex, c, m in zip(exs, completion_ids, in_loss)]
        # Global denominators (docs/algorithms.md, "global-denominator trap"): counted over all processes
        # before any backward, so every micro-batch on every rank divides by the same number.
        counts = run.dist.all_reduce_sum(torch.tensor([sum(len(c) for c, m in zip(completion_ids, in_loss) if m), N]))
        denominator = counts[0].item() if cfg.loss_agg == "token_mean" else counts[1].item()
        mb = cfg.mini_batch_size if cfg.mini_batch_size > 0 else N
        chunks = [list(range(s, min(s + mb, N))) for s in range(0, N, mb)]

        # 4. mu updates on this rollout batch, each accumulated over the micro-batches.
        old_logps, ref_logps = {}, {}
        clip_sum = kl_sum = 0.0
        for it in range(cfg.num_iterations):
            loss_sum = 0.0
            for k, ch in enumerate(chunks):
                batch = collate([seqs[i] for i in ch], [masks[i] for i in ch], tokenizer.pad_token_id, run.device)
                sync = k == len(chunks) - 1 or ws == 1
                with nullcontext() if sync else ddp_model.no_sync():
                    logps, mask = next_token_logps(ddp_model, **batch)  # (B, T-1)
                    if it == 0:
                        old_logps[k] = logps.detach()  # the sampling policy: ratio == 1 exactly at it == 0
                        if cfg.beta > 0:
                            with torch.no_grad(), lora.reference(model):
                                ref_logps[k] = next_token_logps(ref_model or model, **batch)[0]  # (B, T-1)
                    per_token, m = ppo_policy_loss(logps, old_logps[k], advantages[ch], mask, cfg.clip_eps,
                                                   cfg.clip_eps_high)  # (B, T-1)
                    if cfg.beta > 0:
                        kl = kl_penalty(logps, ref_logps[k], "k3")  # (B, T-1), Shao et al. eq. 4
                        per_token = per_token + cfg.beta * kl
                        if it == 0:
                            kl_sum += masked_sum(kl.detach(), mask).item()
                    loss = aggregate(per_token, mask, cfg.loss_agg, cfg.max_new_tokens, denominator=denominator) * ws
                    loss.backward()
                loss_sum += loss.item()
                clip_sum += m["clip_frac"].item() * mask.sum().item()
            step_loss = run.dist.all_reduce_sum(loss_sum).item() / ws
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            if run.check(step_loss, step + 1, detail):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if it == 0:
                first_loss, first_grad_norm = step_loss, grad_norm.item()

        # 5. Metrics over all processes (one all-reduce).
        grouped = rewards.view(-1, G)
        names = list(per_function)
        local = [N, rewards.nansum().item(), (rewards ** 2).nansum().item(), grouped.shape[0],
                 (grouped.std(dim=1) == 0).sum().item(), sum(len(c) for c in completion_ids), N - sum(ended),
                 clip_sum, kl_sum, sum(len(s) for s in seqs)]
        for name in names:
            r = per_function[name]
            local += [r.nansum().item(), (~r.isnan()).sum().item()]
        tot = run.dist.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        n, r_sum, r_sq, n_groups, n_zero, len_sum, n_clipped, clip_tot, kl_tot, seq_tokens = tot[:10]
        n_mask = counts[0].item()
        mean = r_sum / n
        step_tokens = int(seq_tokens) * cfg.num_iterations
        total_completions += int(n)
        total_tokens += step_tokens
        row = {"loss": first_loss, "lr": lr, "grad_norm": first_grad_norm,
               "reward_mean": mean, "reward_std": math.sqrt(max(0.0, (r_sq - n * mean ** 2) / max(1.0, n - 1))),
               **{f"reward/{name}": tot[10 + 2 * j] / max(1.0, tot[11 + 2 * j]) for j, name in enumerate(names)},
               "frac_zero_std": n_zero / n_groups, "completion_length": len_sum / n, "clipped_ratio": n_clipped / n,
               "clip_frac": clip_tot / max(1.0, n_mask * cfg.num_iterations),
               **({"kl": kl_tot / max(1.0, n_mask)} if cfg.beta > 0 else {}),
               "completions_per_s": n / (time.perf_counter() - t_step)}
        run.log(step + 1, row, tokens=step_tokens)
        run.end_step(step + 1, {"completions": total_completions, "tokens": total_tokens})
    seconds = time.perf_counter() - t_run
    return run.finish({"completions": total_completions, "tokens": total_tokens, "prompts": len(prompts),
                       "dropped_prompts": stats.dropped,
                       "completions_per_s": (total_completions - done_before) / max(seconds, 1e-9)})
