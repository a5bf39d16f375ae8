"""alignkit ppo: RLHF with PPO against a reward model, InstructGPT step 3.

The notes, §13.5 (clipped probability ratio, GAE, loss = policy + c1 * value - c2 * entropy);
Schulman et al. 2017 (PPO); Ouyang et al. 2022 (InstructGPT, eq. 2: RM score minus beta * KL to the
initial policy); Ziegler et al. 2019 (per-token KL penalty, adaptive KL controller). Implementation
details follow Huang et al. 2024, "The N Implementation Details of RLHF with PPO", and TRL's PPOTrainer.

Four models: the policy (--model, trained), the reference (a frozen copy of the initial policy; with
LoRA the base with adapters disabled), the reward model (--reward-model, frozen, scores prompt +
completion at its last token) and the value function (a separate model scored at every token, by
default initialised from the reward model as in InstructGPT, or --value-head: a linear head on the
policy's last hidden state). One step = one rollout batch:

  rollout (sample with KV cache) -> score (RM) -> KL-shaped per-token rewards -> GAE -> whitened
  advantages -> --ppo-epochs passes over mini-batches (clipped policy + clipped value - entropy) -> log.

Every per-token tensor uses the completion layout (N, W): row i, column j is completion token j of
rollout i (W = longest completion of the step); `mask` marks real tokens, so padding and the void
after a stop token never reach a loss, an advantage or a metric.

Metrics per step: reward_mean (RM score), reward_with_penalty (summed shaped rewards: score - missing-EOS
penalty - kl_coef * KL), kl (summed k1 KL per sequence), kl_coef, policy_loss, value_loss, entropy,
clip_frac, approx_kl (means over updates), approx_kl_per_update / clip_frac_per_update (one entry per
optimizer update; the first is exactly 0, the check that old log-probs are the sampling policy's),
completion_length and clipped_ratio (completions that hit max_new_tokens without a stop token; GRPO's
names), completions_per_s, lr.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from alignkit import lora
from alignkit.config import TrainConfig
from alignkit.data import load_prompts
from alignkit.generation import sample_groups
from alignkit.logprobs import pack_completions
from alignkit.losses import (aggregate, gae, kl_penalty, masked_sum, ppo_policy_loss, ppo_value_loss,
                             token_entropy, token_logps, whiten)
from alignkit.models import backbone_and_head, load_causal_lm, load_tokenizer, prepare, save_model
from alignkit.rewards import load_scorer
from alignkit.train.batching import StepPlan, shuffled_batches
from alignkit.train.optim import adamw, lr_factor, set_lr
from alignkit.train.run import Run


@dataclass
class PPOConfig(TrainConfig):
    """RLHF with PPO: policy (--model), frozen reference, frozen reward model, trained value function."""

    reward_model: str = ""
    """Reward model directory (sequence classifier with one output, same tokenizer as --model), e.g. from `alignkit reward`."""
    value_model: str = ""
    """Value model directory (sequence classifier scored at every token); default: a trainable copy of --reward-model (InstructGPT)."""
    value_head: bool = False
    """Use a Linear(hidden, 1) on the policy's last hidden state as the value function instead (trained jointly, saved as value_head.safetensors)."""
    batch_size: int = 8
    """Prompts per step on each process; each is sampled --group-size times."""
    grad_accum: int = 1
    """Micro-batches each mini-batch is split into (same update, less memory)."""
    group_size: int = 1
    """Completions sampled per prompt."""
    mini_batch_size: int = 0
    """Completions per optimizer update on each process; 0 = all completions of the step (one update per PPO epoch)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (each pass reshuffles the mini-batches)."""
    max_new_tokens: int = 64
    """Completion budget; prompts longer than max_length - max_new_tokens are dropped (counted)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed from logits / temperature to match the sampler."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    kl_coef: float = 0.05
    """beta: per-token KL penalty to the reference in the reward (initial value with --target-kl)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """KL estimator in the reward: k1 = logp - ref_logp (InstructGPT), k3 = low-variance, >= 0."""
    target_kl: float | None = None
    """Adaptive KL controller (Ziegler et al. 2019): steer the per-sequence KL to this value; default: fixed kl_coef."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon, in completions: larger = slower changes of kl_coef."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the RM score of completions that hit max_new_tokens without a stop token (TRL)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda: lower = less variance, more bias from the value function."""
    clip_eps: float = 0.2
    """Policy ratio clip range."""
    clip_eps_value: float = 0.2
    """Value clip range around the rollout's values."""
    vf_coef: float = 0.5
    """c1: weight of the value loss."""
    ent_coef: float = 0.01
    """c2: weight of the entropy bonus."""
    lr: float = 1e-5
    """Peak learning rate (AdamW), shared by policy and value function."""
    warmup_steps: int = 0
    """Linear warmup steps (rollout steps)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule over rollout steps after warmup."""


def token_scores(scorer, input_ids, attention_mask) -> torch.Tensor:
    """Score head at every position (B, T): the value function needs every position, and the reward
    model is read at each row's last real token, as `alignkit reward` trained it (`LastTokenReward`)."""
    backbone, head = backbone_and_head(scorer)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head(hidden).squeeze(-1).float()  # (B, T)


def pack_rollout(prompts, completions, width: int, pad_id: int, device) -> dict:
    """prompt + completion rows (right-padded) and the completion layout: positions[i, j] = P_i - 1 + j is
    where the logits (and the value of the state) predicting completion token j sit; labels are the tokens."""
    batch = pack_completions(prompts, completions, pad_id, device)
    P = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    C = torch.tensor([len(c) for c in completions], device=device)  # (B,)
    j = torch.arange(width, device=device)  # (W,)
    labels = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)  # (B, W)
    for i, c in enumerate(completions):
        labels[i, :len(c)] = torch.as_tensor(c)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
            "positions": P[:, None] - 1 + torch.minimum(j[None], C[:, None] - 1),  # (B, W), in range
            "last": P + C - 1}  # (B,) index of each row's last token: where the RM scores it


def completion_logits(model, batch: dict, temperature: float, hidden: bool = False):
    """Logits (B, W, V) predicting the completion tokens (and the last hidden states there if `hidden`)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_hidden_states=hidden)
    rows = torch.arange(len(batch["positions"]), device=batch["positions"].device)[:, None]  # (B, 1)
    logits = out.logits[rows, batch["positions"]]  # (B, W, V)
    logits = logits / temperature if temperature != 1.0 else logits
    return logits, (out.hidden_states[-1][rows, batch["positions"]] if hidden else None)


class ActorCritic(torch.nn.Module):
    """Policy + value function in one module, so one optimizer and one DDP wrapper cover both."""

    def __init__(self, policy, value_model=None, value_head=None, temperature: float = 1.0):
        super().__init__()
        self.policy, self.value_model, self.value_head, self.temperature = policy, value_model, value_head, temperature

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, W, V), values (B, W)): V(state before completion token j) in the completion layout."""
        logits, hidden = completion_logits(self.policy, batch, self.temperature, hidden=self.value_head is not None)
        if self.value_head is not None:
            return logits, self.value_head(hidden).squeeze(-1).float()  # (B, W)
        rows = torch.arange(len(batch["positions"]), device=logits.device)[:, None]
        values = token_scores(self.value_model, batch["input_ids"], batch["attention_mask"])  # (B, T)
        return logits, values[rows, batch["positions"]]  # (B, W)


def kl_shaped_rewards(scores, kl, mask, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (Ziegler et al. 2019; InstructGPT eq. 2): -kl_coef * KL at every completion
    token, plus the sequence's score at its last token. scores (N,), kl and mask (N, W) -> (N, W)."""
    rewards = torch.where(mask, -kl_coef * kl, 0.0)  # (N, W)
    last = mask.sum(-1) - 1  # (N,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al. 2019, §2.2 (TRL's AdaptiveKLController): proportional control of beta,
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), n = completions this step."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n / horizon)


def chunks(rows: list[int], n: int) -> list[list[int]]:
    """`rows` cut into at most n consecutive, non-empty parts."""
    size = math.ceil(len(rows) / n)
    return [rows[a:a + size] for a in range(0, len(rows), size)]


def save_value(value_model, value_head, tokenizer, out: Path) -> None:
    """The value function as OUT/value_head.safetensors (head) or an HF model directory OUT (separate model)."""
    if value_head is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
                  str(out / "value_head.safetensors"))
    else:
        save_model(value_model, tokenizer, out)


def main(cfg: PPOConfig) -> dict:
    if not cfg.data or not cfg.reward_model:
        raise SystemExit("error: alignkit ppo needs --data FILE (prompts) and --reward-model DIR")
    if cfg.value_head and cfg.value_model:
        raise SystemExit("error: --value-head and --value-model are alternatives; give one")
    if not 0 < cfg.max_new_tokens < cfg.max_length:
        raise SystemExit(f"error: --max-new-tokens {cfg.max_new_tokens} must be > 0 and leave room for a prompt in --max-length {cfg.max_length}")
    run = Run(cfg, "ppo")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts, stats = load_prompts(list(cfg.data), tokenizer, cfg.max_length - cfg.max_new_tokens, strict=cfg.strict)
    if run.is_main:
        stats.warn()
    pad, dev, ws = tokenizer.pad_token_id, run.device, run.world_size

    # Models. Dropout stays off everywhere (eval mode): the rollout's log-probs and the first PPO
    # forward must agree exactly, or the "ratio" is noise from the start (Huang et al. 2024).
    policy = lora.load_trainable(cfg, run.checkpoint, dev)
    reference = None if lora.is_peft(policy) else (
        prepare(load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, dev), cfg).eval().requires_grad_(False))
    reward_model = load_scorer(cfg.reward_model, tokenizer, dev, cfg.dtype, cfg.trust_remote_code, cfg=cfg,
                               same_tokenizer=True)
    resume_value = run.checkpoint / "value" if run.checkpoint else None  # written by save_extra below
    if resume_value and not resume_value.is_dir():
        raise SystemExit(f"error: {run.checkpoint} has no value function state ({resume_value}); "
                         "delete that checkpoint to resume from the previous one")
    value_model = value_head = None
    if cfg.value_head:
        value_head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1).to(dev)
        for param in value_head.parameters():  # V = 0 at the start: no random baseline noise
            torch.nn.init.zeros_(param)
        if resume_value:
            value_head.load_state_dict(load_file(str(resume_value / "value_head.safetensors")))
    else:
        path = resume_value or cfg.value_model or cfg.reward_model
        value_model = load_scorer(path, tokenizer, dev, cfg.dtype, cfg.trust_remote_code, cfg=cfg, flag="--value-model",
                                  trained=False, same_tokenizer=True)
    def save_value_state(checkpoint_dir: Path) -> None:  # into each checkpoint, atomically with the policy
        save_value(value_model, value_head, tokenizer, checkpoint_dir / "value")

    actor_critic = ActorCritic(policy, value_model, value_head, cfg.temperature).eval()
    ddp_ac = DDP(actor_critic) if ws > 1 else actor_critic
    optimizer = adamw(actor_critic, cfg.lr, cfg.weight_decay, cfg.adam_betas)

    # Prompt order: a pure function of (seed, step), so resume and DDP see the same prompts.
    plan = StepPlan(lambda e: [b for b in shuffled_batches(len(prompts), cfg.batch_size, cfg.seed + e)
                               if len(b) == cfg.batch_size], 1, ws)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * plan.steps_per_epoch)
    start_step = run.begin(policy, tokenizer, optimizer, total_steps)
    kl_coef = run.state.get("kl_coef", cfg.kl_coef)
    N = cfg.batch_size * cfg.group_size  # completions per step on this process
    M = cfg.mini_batch_size or N
    # Totals over the whole run, carried across --resume in the checkpoint's state.
    total_completions, total_tokens = run.state.get("completions", 0), run.state.get("tokens", 0)

    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        set_lr(optimizer, lr)

        # 1. Rollout. Sampling is seeded per (step, rank): a resumed run samples what the original did.
        torch.manual_seed(cfg.seed * 100003 + step + run.dist.rank * 7919)
        prompt_ids = [prompts[i].prompt_ids for i in plan.micro_batches(step, run.dist.rank)[0]]
        completions, ended = sample_groups(policy, tokenizer, prompt_ids, cfg.group_size, cfg.max_new_tokens,
                                           cfg.temperature, cfg.top_p)
        rollout_prompts = [p for p in prompt_ids for _ in range(cfg.group_size)]
        W = max(len(c) for c in completions)
        lengths = torch.tensor([len(c) for c in completions], device=dev)  # (N,)
        mask = torch.arange(W, device=dev)[None] < lengths[:, None]  # (N, W)
        ended = torch.tensor(ended, device=dev)  # (N,)

        def pack(rows):
            return pack_rollout([rollout_prompts[i] for i in rows], [completions[i] for i in rows], W, pad, dev)

        # PPO's shuffled mini-batches for every epoch, fixed now. The rollout forward runs on exactly the
        # first epoch's micro-batches, so the first update's forward repeats it bit for bit (ratio == 1).
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + step)
        epochs = []  # epochs[e] = mini-batches, each a list of micro-batches (lists of rollout rows)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(N, generator=gen).tolist()
            epochs.append([chunks(order[k:k + M], cfg.grad_accum) for k in range(0, N, M)])

        # 2. Score: old log-probs and values (policy before any update), reference log-probs, RM scores.
        old_logps, ref_logps, old_values = (torch.zeros(N, W, device=dev) for _ in range(3))
        scores = torch.zeros(N, device=dev)
        with torch.no_grad():
            for rows in (mb for mini in epochs[0] for mb in mini):
                b = pack(rows)
                logits, values = actor_critic(b)
                old_logps[rows], old_values[rows] = token_logps(logits, b["labels"]), values
                with lora.reference(policy):
                    ref_logps[rows] = token_logps(completion_logits(reference or policy, b, cfg.temperature)[0], b["labels"])
                scores[rows] = token_scores(reward_model, b["input_ids"], b["attention_mask"])[torch.arange(len(rows)), b["last"]]
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()[:1]
        detail = "".join(f" (reward model score {scores[i].item()} for prompt {tokenizer.decode(rollout_prompts[i])!r}, "
                         f"completion {tokenizer.decode(completions[i])!r})" for i in bad)
        if not run.check(run.dist.all_reduce_sum(scores.sum()).item(), step + 1, detail):
            run.log(step + 1, {"skipped_nonfinite_reward": 1.0, "lr": lr})
            run.end_step(step + 1, {"kl_coef": kl_coef, "completions": total_completions, "tokens": total_tokens},
                         save_extra=save_value_state)
            continue

        # 3. KL-shaped per-token rewards -> GAE -> whitened advantages (all in the completion layout).
        penalized = scores - cfg.missing_eos_penalty * (~ended).float()  # (N,)
        kl = kl_penalty(old_logps, ref_logps, cfg.kl_estimator)  # (N, W)
        rewards = kl_shaped_rewards(penalized, kl, mask, kl_coef)  # (N, W)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # (N, W) each
        advantages = whiten(advantages, mask)  # per process, as TRL (Ziegler et al. 2019)

        # 4. PPO epochs: one optimizer update per mini-batch; token means over the whole mini-batch
        # (global denominator across micro-batches and processes, times world_size for DDP's average).
        sums = {k: 0.0 for k in ("loss", "policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "grad_norm")}
        per_update = {"approx_kl": [], "clip_frac": []}  # the first one is exactly 0: nothing changed yet
        step_tokens = 0
        for mini_batches in epochs:
            for micro in mini_batches:
                n_tokens = run.dist.all_reduce_sum(sum(len(completions[i]) for mb in micro for i in mb)).item()
                totals = torch.zeros(6, dtype=torch.float64, device=dev)
                for k, rows in enumerate(micro):
                    b, m = pack(rows), mask[rows]
                    with nullcontext() if k == len(micro) - 1 or ws == 1 else ddp_ac.no_sync():
                        logits, values = ddp_ac(b)
                        logps = token_logps(logits, b["labels"])  # (B, W)
                        pg, pm = ppo_policy_loss(logps, old_logps[rows], advantages[rows], m, cfg.clip_eps)
                        vf = ppo_value_loss(values, old_values[rows], returns[rows], m, cfg.clip_eps_value)
                        policy_loss = aggregate(pg, m, "token_mean", denominator=n_tokens)
                        value_loss = aggregate(vf, m, "token_mean", denominator=n_tokens)
                        entropy = aggregate(token_entropy(logits), m, "token_mean", denominator=n_tokens)
                        loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
                        (loss * ws).backward()
                    share = m.sum().item() / n_tokens  # this micro-batch's weight in the mini-batch token mean
                    totals += torch.tensor([loss.item(), policy_loss.item(), value_loss.item(), entropy.item(),
                                          pm["clip_frac"].item() * share, pm["approx_kl"].item() * share],
                                         dtype=torch.float64, device=dev)
                    step_tokens += b["input_ids"].numel() if b["attention_mask"] is None else int(b["attention_mask"].sum())
                totals = run.dist.all_reduce_sum(totals)
                grad_norm = torch.nn.utils.clip_grad_norm_(actor_critic.parameters(), cfg.max_grad_norm or float("inf"))
                if run.check(totals[0].item(), step + 1, f" (mini-batch of completions {sorted(i for mb in micro for i in mb)})"):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for key, v in zip(sums, [*totals.tolist(), grad_norm.item()]):
                    sums[key] += v
                per_update["clip_frac"].append(totals[4].item())
                per_update["approx_kl"].append(totals[5].item())

        # 5. Log (global over processes), then adapt the KL coefficient for the next step.
        k1 = masked_sum(old_logps - ref_logps, mask, dim=-1)  # (N,) summed k1 KL per sequence
        g = run.dist.all_reduce_sum(torch.stack([
            scores.sum(), rewards.sum(), k1.sum(), lengths.sum().float(), (~ended).sum().float(),
            torch.tensor(float(N), device=dev), torch.tensor(float(step_tokens), device=dev)]))
        n_global, step_tokens = int(g[5]), int(g[6])
        n_updates = len(per_update["approx_kl"])
        row = {"reward_mean": g[0].item() / n_global, "reward_with_penalty": g[1].item() / n_global,
               "kl": g[2].item() / n_global, "kl_coef": kl_coef, **{k: v / n_updates for k, v in sums.items()},
               "approx_kl_per_update": per_update["approx_kl"], "clip_frac_per_update": per_update["clip_frac"],
               "completion_length": g[3].item() / n_global, "clipped_ratio": g[4].item() / n_global,
               "completions_per_s": n_global / (time.perf_counter() - t0), "lr": lr}
        if cfg.target_kl is not None:
            kl_coef = adaptive_kl_coef(kl_coef, row["kl"], cfg.target_kl, cfg.kl_horizon, n_global)
        total_completions, total_tokens = total_completions + n_global, total_tokens + step_tokens
        run.log(step + 1, row, tokens=step_tokens)
        run.end_step(step + 1, {"kl_coef": kl_coef, "completions": total_completions, "tokens": total_tokens},
                     save_extra=save_value_state)

    if run.is_main:
        save_value(value_model, value_head, tokenizer,
                   Path(cfg.output) / "value_model" if value_head is None else Path(cfg.output))
    return run.finish({"completions": total_completions, "tokens": total_tokens, "kl_coef": kl_coef,
                       "prompts": len(prompts), "dropped_prompts": stats.dropped})
