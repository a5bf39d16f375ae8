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
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Literal

import torch

from alignkit import lora
from alignkit.config import Repeatable, TrainConfig
from alignkit.data import load_prompts
from alignkit.engines import EngineOptions, build_engine, check_engine
from alignkit.errors import UserError
from alignkit.logprobs import next_token_logps
from alignkit.losses import (aggregate, group_advantages, kl_penalty, masked_sum, ppo_policy_loss, reinforce_pp_advantages,
                             rloo_advantages, truncated_importance_weights)
from alignkit.models import load_causal_lm, load_tokenizer, prepare
from alignkit.rewards import load_rewards, score_samples
from alignkit.train import parallel
from alignkit.train.batching import StepPlan, collate, shuffled_batches
from alignkit.train.optim import adamw
from alignkit.train.run import Run
from alignkit.train.step import micro_steps, optimizer_step, schedule_lr


@dataclass
class GRPOConfig(EngineOptions, TrainConfig):
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
    """Sampling temperature (> 0: the group needs diverse samples); the policy's and the reference's
    log-probs are computed from logits / temperature, the distribution sampled from (as TRL and verl)."""
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
    """Divide group-centred rewards by the group's std (GRPO); --no-scale-rewards is Dr. GRPO (--advantage grpo only)."""
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage estimator: grpo (group mean, / group std unless --no-scale-rewards), rloo (leave-one-out mean of
    the other G - 1 samples; Ahmadian et al. 2024), reinforce_pp (group mean subtracted, then normalised over the
    global batch; REINFORCE++, Hu et al. 2025)."""
    ratio_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (PPO/GRPO) or per sequence, the length-normalised mean of the token log-ratios
    (GSPO, Zheng et al. 2025: use a far smaller --clip-eps, e.g. 3e-4)."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """Loss reduction: token_mean (DAPO, TRL's default), seq_mean_token_mean (GRPO paper), seq_mean_token_sum_norm (Dr. GRPO, normaliser max_new_tokens)."""
    num_iterations: int = 1
    """mu: optimizer updates (PPO epochs) on each rollout batch."""
    mini_batch_size: int = 0
    """Completions per forward/backward micro-batch of an update (0 = all of the process's completions)."""
    mask_truncated: bool = False
    """Leave completions that hit max_new_tokens without a stop token out of the loss (DAPO overlong filtering)."""
    tis_cap: float = 0.0
    """Truncated importance sampling (Yao et al. 2025): each token's policy loss is weighted by
    min(exp(old_logps - engine_logps), C), C = this value (e.g. 2; 0 = off), correcting for a rollout engine whose
    token probabilities differ from the trainer's. Needs an engine that returns its log-probs (--rollout-engine vllm)."""


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of the prompt batch at `position` in the step's global list of prompt batches: a resumed run
    samples as an uninterrupted one, and DDP ranks sample as the grad-accum positions of one process."""
    return (seed * 100003 + step) * 1009 + position


@dataclass
class Rollout:
    """One step's samples on this process: G consecutive rows per prompt (the layout group_advantages expects)."""

    examples: list  # the prompt record of each row
    completion_ids: list[list[int]]
    ended: list[bool]  # sampling stopped at a stop token
    engine_logps: list[list[float]] | None = None  # the engine's log-prob of each sampled token (TIS)


def check_config(cfg: GRPOConfig) -> None:
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
    if not cfg.scale_rewards and cfg.advantage != "grpo":
        raise SystemExit(f"error: --no-scale-rewards is for --advantage grpo (--advantage {cfg.advantage} has its own scale)")
    if cfg.max_new_tokens >= cfg.max_length:
        raise SystemExit(f"error: --max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                         f"--max-length {cfg.max_length}")
    check_engine(cfg.rollout_engine)


def rollout(cfg: GRPOConfig, run: Run, engine, prompts, plan: StepPlan, step: int) -> Rollout:
    """G samples of each of this process's prompts, each prompt batch seeded by its position in the step."""
    ro = Rollout([], [], [], [] if cfg.tis_cap > 0 else None)
    for k, idx in enumerate(plan.micro_batches(step, run.dist.rank)):
        out = engine.generate([prompts[i].prompt_ids for i in idx], cfg.group_size, cfg.max_new_tokens,
                              cfg.temperature, cfg.top_p, seed=sample_seed(cfg.seed, step, run.dist.rank + k * run.world_size),
                              batch_size=cfg.generation_batch_size)
        ro.examples += [prompts[i] for i in idx for _ in range(cfg.group_size)]
        ro.completion_ids += out.completion_ids
        ro.ended += out.ended
        if ro.engine_logps is not None:
            ro.engine_logps += out.logps
    return ro


def engine_logps_like(logps: torch.Tensor, ro: Rollout, rows: list[int]) -> torch.Tensor:
    """The engine's log-probs of rows `rows` in the (B, T-1) next-token layout of `next_token_logps`: completion
    token j of row i sits at position len(prompt_i) - 1 + j; 0 elsewhere (masked)."""
    out = torch.zeros_like(logps)  # (B, T-1)
    for b, i in enumerate(rows):
        start = len(ro.examples[i].prompt_ids) - 1
        values = ro.engine_logps[i]
        out[b, start:start + len(values)] = torch.tensor(values, dtype=logps.dtype, device=logps.device)
    return out


def update(cfg: GRPOConfig, run: Run, model, ddp_model, ref_model, optimizer, tokenizer, ro: Rollout, advantages,
           step: int, detail: str) -> dict:
    """--num-iterations optimizer updates on the rollout, each accumulated over micro-batches of
    --mini-batch-size completions. Returns the first update's loss and grad_norm, the clipped tokens summed
    over updates, the first update's KL sum, and the number of loss tokens (all over every process)."""
    ws = run.world_size
    # Loss masks: completion tokens incl. the stop token (generation cuts right after it).
    in_loss = [e or not cfg.mask_truncated for e in ro.ended]
    seqs = [ex.prompt_ids + c for ex, c in zip(ro.examples, ro.completion_ids)]
    masks = [[0] * len(ex.prompt_ids) + [int(m)] * len(c) for ex, c, m in zip(ro.examples, ro.completion_ids, in_loss)]
    # Global denominators (docs/algorithms.md, "global-denominator trap"): counted over all processes
    # before any backward, so every micro-batch on every rank divides by the same number.
    N = len(seqs)
    counts = run.dist.reduce_sums({"loss_tokens": sum(len(c) for c, m in zip(ro.completion_ids, in_loss) if m),
                                   "completions": N})
    denominator = counts["loss_tokens"] if cfg.loss_agg == "token_mean" else counts["completions"]
    size = cfg.mini_batch_size if cfg.mini_batch_size > 0 else N
    chunks = [list(range(s, min(s + size, N))) for s in range(0, N, size)]

    old_logps, ref_logps, tis = {}, {}, {}
    out = {"clipped": 0.0, "kl": 0.0, "tis_weight": 0.0, "tis_capped": 0.0, "loss_tokens": counts["loss_tokens"]}
    for it in range(cfg.num_iterations):
        loss_sum = 0.0
        for k, ch in enumerate(micro_steps(ddp_model, chunks)):
            batch = collate([seqs[i] for i in ch], [masks[i] for i in ch], tokenizer.pad_token_id, run.device)
            logps, mask = next_token_logps(ddp_model, **batch, temperature=cfg.temperature)  # (B, T-1)
            if it == 0:
                old_logps[k] = logps.detach()  # the sampling policy: ratio == 1 exactly at it == 0
                if cfg.beta > 0:
                    with torch.no_grad(), lora.reference(model):
                        ref_logps[k] = next_token_logps(ref_model or model, **batch,
                                                        temperature=cfg.temperature)[0]  # (B, T-1)
                if cfg.tis_cap > 0:
                    tis[k], tm = truncated_importance_weights(old_logps[k], engine_logps_like(logps, ro, ch), mask,
                                                              cfg.tis_cap)  # (B, T-1)
                    n_tok = mask.sum().item()
                    out["tis_weight"] += tm["weight_mean"].item() * n_tok
                    out["tis_capped"] += tm["capped_frac"].item() * n_tok
            per_token, m = ppo_policy_loss(logps, old_logps[k], advantages[ch], mask, cfg.clip_eps,
                                           cfg.clip_eps_high, cfg.ratio_level)  # (B, T-1)
            if cfg.tis_cap > 0:
                per_token = per_token * tis[k]  # the policy-gradient term only, not the KL penalty
            if cfg.beta > 0:
                kl = kl_penalty(logps, ref_logps[k], "k3")  # (B, T-1), Shao et al. eq. 4
                per_token = per_token + cfg.beta * kl
                if it == 0:
                    out["kl"] += masked_sum(kl.detach(), mask).item()
            loss = aggregate(per_token, mask, cfg.loss_agg, cfg.max_new_tokens, denominator=denominator) * ws
            loss.backward()
            loss_sum += loss.item()
            out["clipped"] += m["clip_frac"].item() * mask.sum().item()
        step_loss = run.dist.all_reduce_sum(loss_sum).item() / ws
        grad_norm = optimizer_step(run, model, optimizer, step_loss, step + 1, detail)
        if it == 0:
            out["loss"], out["grad_norm"] = step_loss, grad_norm
    out["seq_tokens"] = sum(len(s) for s in seqs)
    return out


def compute_advantages(cfg: GRPOConfig, run: Run, rewards: torch.Tensor) -> torch.Tensor:
    """(N,) advantages of this process's rewards by --advantage. A group whose rewards are all equal gets 0 under
    grpo and rloo; reinforce_pp normalises over the global batch, so its statistics are summed over processes."""
    if cfg.advantage == "rloo":
        return rloo_advantages(rewards, cfg.group_size)
    if cfg.advantage == "reinforce_pp":
        c = rewards - rewards.view(-1, cfg.group_size).mean(1).repeat_interleave(cfg.group_size)  # (N,)
        c = c[torch.isfinite(c)]  # a NaN reward (--skip-nonfinite) leaves its group out of the batch statistics
        g = run.dist.reduce_sums({"n": len(c), "sum": c.sum(), "sq": (c ** 2).sum()})
        mean = g["sum"] / g["n"]
        std = math.sqrt(max(0.0, (g["sq"] - g["n"] * mean ** 2) / max(1.0, g["n"] - 1)))
        return reinforce_pp_advantages(rewards, cfg.group_size, batch_mean=mean, batch_std=std)
    return group_advantages(rewards, cfg.group_size, normalize_std=cfg.scale_rewards)


def step_metrics(cfg: GRPOConfig, run: Run, ro: Rollout, rewards, per_function: dict, upd: dict) -> tuple[dict, int, int]:
    """(the step's metrics row, completions and tokens over all processes)."""
    grouped = rewards.view(-1, cfg.group_size)
    local = {"completions": len(ro.completion_ids), "reward": rewards.nansum(), "reward_sq": (rewards ** 2).nansum(),
             "groups": grouped.shape[0], "zero_std_groups": (grouped.std(dim=1) == 0).sum(),
             "completion_tokens": sum(len(c) for c in ro.completion_ids), "truncated": len(ro.ended) - sum(ro.ended),
             "clipped": upd["clipped"], "kl": upd["kl"], "seq_tokens": upd["seq_tokens"],
             "tis_weight": upd["tis_weight"], "tis_capped": upd["tis_capped"]}
    for name, r in per_function.items():
        local[f"reward/{name}"], local[f"applicable/{name}"] = r.nansum(), (~r.isnan()).sum()
    g = run.dist.reduce_sums(local)
    n, n_mask = g["completions"], upd["loss_tokens"]
    mean = g["reward"] / n
    row = {"loss": upd["loss"], "grad_norm": upd["grad_norm"], "reward_mean": mean,
           "reward_std": math.sqrt(max(0.0, (g["reward_sq"] - n * mean ** 2) / max(1.0, n - 1))),
           **{f"reward/{name}": g[f"reward/{name}"] / max(1.0, g[f"applicable/{name}"]) for name in per_function},
           "frac_zero_std": g["zero_std_groups"] / g["groups"], "completion_length": g["completion_tokens"] / n,
           "clipped_ratio": g["truncated"] / n, "clip_frac": g["clipped"] / max(1.0, n_mask * cfg.num_iterations),
           **({"kl": g["kl"] / max(1.0, n_mask)} if cfg.beta > 0 else {}),
           **({"tis_weight_mean": g["tis_weight"] / max(1.0, n_mask),
               "tis_capped_frac": g["tis_capped"] / max(1.0, n_mask)} if cfg.tis_cap > 0 else {})}
    return row, int(n), int(g["seq_tokens"]) * cfg.num_iterations


def main(cfg: GRPOConfig) -> dict:
    check_config(cfg)
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
    gen_model = parallel.generation_copy(model, cfg)  # under --fsdp a plain copy samples; else the model
    ddp_model = parallel.wrap(model, run, cfg)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    # the trainer's log-probs are of logits / temperature (as TRL's, verl's and ppo's), so the engine's
    # must be the processed ones
    engine = build_engine(cfg, gen_model, tokenizer, cfg.model, max_model_len=cfg.max_length, seed=cfg.seed,
                          logprobs_mode="processed_logprobs", owns_copy=gen_model is not model)
    if cfg.tis_cap > 0 and not engine.gives_logps:
        raise UserError(f"--tis-cap {cfg.tis_cap}: --rollout-engine {cfg.rollout_engine} samples from the policy being "
                        "trained and returns no log-probs of its own (every weight would be 1); TIS corrects an "
                        "engine that does, e.g. --rollout-engine vllm")

    plan = StepPlan(lambda e: shuffled_batches(len(prompts), cfg.batch_size, cfg.seed + e), cfg.grad_accum,
                    run.world_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * plan.steps_per_epoch)
    start_step = run.begin(model, tokenizer, optimizer, total_steps, totals=("completions", "tokens"))
    t_run = time.perf_counter()

    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        lr = schedule_lr(run, optimizer, step, cfg.schedule)
        engine.load_weights(parallel.rollout_weights(model))  # the policy after the last update (or as resumed)
        ro = rollout(cfg, run, engine, prompts, plan, step)
        rewards, per_function, _ = score_samples(  # (N,)
            reward_fns, ro.examples, ro.completion_ids, tokenizer, cfg.reward_weights,
            trainer_state=SimpleNamespace(global_step=step, max_steps=total_steps),
            on_error="nan" if cfg.skip_nonfinite else "raise", timeout=cfg.reward_timeout)
        advantages = compute_advantages(cfg, run, rewards).to(run.device)  # (N,)
        nonfinite = (~torch.isfinite(rewards)).nonzero().flatten().tolist()  # NaN only under --skip-nonfinite
        detail = f" (prompts {plan.all_micro_batches(step)})" + (f", non-finite rewards of completions {nonfinite}"
                                                                 if nonfinite else "")
        upd = update(cfg, run, model, ddp_model, ref_model, optimizer, tokenizer, ro, advantages, step, detail)
        row, n, tokens = step_metrics(cfg, run, ro, rewards, per_function, upd)
        run.count(completions=n, tokens=tokens)
        run.log(step + 1, {**row, "lr": lr, "completions_per_s": n / (time.perf_counter() - t_step)}, tokens=tokens)
        run.end_step(step + 1)
    seconds = time.perf_counter() - t_run
    return run.finish({"prompts": len(prompts), "dropped_prompts": stats.dropped,
                       "completions_per_s": run.counted_this_launch("completions") / max(seconds, 1e-9)})
