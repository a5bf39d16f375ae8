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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from alignkit import lora
from alignkit.config import TrainConfig
from alignkit.data import load_prompts
from alignkit.engines import EngineOptions, build_engine, check_engine
from alignkit.errors import UserError
from alignkit.logprobs import pack_completions
from alignkit.losses import (aggregate, gae, kl_penalty, masked_sum, ppo_policy_loss, ppo_value_loss,
                             truncated_importance_weights, whiten)
from alignkit.models import (LastTokenReward, backbone_and_head, forward_token_logps, load_causal_lm, load_tokenizer,
                             prepare, save_model)
from alignkit.rewards import load_scorer
from alignkit.train import parallel
from alignkit.train.batching import StepPlan, shuffled_batches
from alignkit.train.optim import adamw
from alignkit.train.run import Run
from alignkit.train.step import micro_steps, optimizer_step, schedule_lr


@dataclass
class PPOConfig(EngineOptions, TrainConfig):
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
    tis_cap: float = 0.0
    """Truncated importance sampling (Yao et al. 2025): each token's policy loss is weighted by
    min(exp(old_logps - engine_logps), C), C = this value (e.g. 2; 0 = off), correcting for a rollout engine whose
    token probabilities differ from the trainer's. Needs an engine that returns its log-probs (--rollout-engine vllm)."""


def token_scores(scorer, input_ids, attention_mask) -> torch.Tensor:
    """Score head at every position (B, T): the value function's V(state) at every token (the reward model
    is read at each row's last real token only, by `LastTokenReward`, as `alignkit reward` trained it)."""
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


def completion_token_logps(model, batch: dict, temperature: float, entropy: bool = False, hidden: bool = False):
    """(logps (B, W), entropies (B, W) or None, last hidden states (B, W, H) or None) of the completion
    tokens under the temperature-scaled policy, without materialised logits (`models.install_token_logps`)."""
    out = forward_token_logps(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False, output_hidden_states=hidden, token_labels=batch["labels"],
                              token_positions=batch["positions"], token_temperature=temperature, token_entropy=entropy)
    rows = torch.arange(len(batch["positions"]), device=batch["positions"].device)[:, None]  # (B, 1)
    return out.logps, out.entropy, (out.hidden_states[-1][rows, batch["positions"]] if hidden else None)


class ActorCritic(torch.nn.Module):
    """Policy + value function in one module, so one optimizer and one DDP wrapper cover both."""

    def __init__(self, policy, value_model=None, value_head=None, temperature: float = 1.0):
        super().__init__()
        self.policy, self.value_model, self.value_head, self.temperature = policy, value_model, value_head, temperature

    def forward(self, batch: dict, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(logps (B, W), entropies (B, W) or None, values (B, W)) in the completion layout; the value is
        V(state before completion token j)."""
        logps, ent, hidden = completion_token_logps(self.policy, batch, self.temperature, entropy,
                                                    hidden=self.value_head is not None)
        if self.value_head is not None:
            return logps, ent, self.value_head(hidden).squeeze(-1).float()  # (B, W)
        rows = torch.arange(len(batch["positions"]), device=logps.device)[:, None]
        values = token_scores(self.value_model, batch["input_ids"], batch["attention_mask"])  # (B, T)
        return logps, ent, values[rows, batch["positions"]]  # (B, W)


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


def save_value(value_model, value_head, tokenizer, out: Path, is_main: bool = True) -> None:
    """The value function as OUT/value_head.safetensors (head) or an HF model directory OUT (separate model),
    written by process 0. Under --fsdp every process calls it: gathering the sharded weights is a collective."""
    if value_head is not None:
        state = parallel.full_state_dict(value_head)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "value_head.safetensors"))
    elif parallel.is_sharded(value_model):
        parallel.save_sharded(value_model, tokenizer, out, is_main)
    elif is_main:
        save_model(value_model, tokenizer, out)


def shard_actor_critic(actor_critic: ActorCritic, device) -> ActorCritic:
    """--fsdp: the policy, and the value backbone and head (or the value head on the policy), each sharded as
    a root of its own: they are called separately (the policy also alone, as the LoRA reference), and an FSDP
    unit unshards its parameters only when it is the module called."""
    parallel.shard(actor_critic.policy, device)
    if actor_critic.value_head is not None:
        parallel.shard(actor_critic.value_head, device, roots=[actor_critic.value_head])
    else:
        parallel.shard(actor_critic.value_model, device, roots=list(backbone_and_head(actor_critic.value_model)))
    return actor_critic


@dataclass
class Rollout:
    """One step's samples on this process: row i is prompt_ids[i] + completions[i] (group_size rows per prompt)."""

    prompt_ids: list[list[int]]
    completions: list[list[int]]
    ended: torch.Tensor  # (N,) True where sampling stopped at a stop token
    lengths: torch.Tensor  # (N,) completion lengths
    mask: torch.Tensor  # (N, W) real completion tokens in the completion layout
    pad_id: int
    engine_logps: torch.Tensor | None = None  # (N, W) the engine's log-prob of each sampled token (TIS)

    def pack(self, rows: list[int]) -> dict:
        return pack_rollout([self.prompt_ids[i] for i in rows], [self.completions[i] for i in rows],
                            self.mask.shape[1], self.pad_id, self.mask.device)


@dataclass
class Scored:
    """What the rollout's policy, reference, value function and reward model say about it, before any update."""

    old_logps: torch.Tensor  # (N, W)
    ref_logps: torch.Tensor  # (N, W)
    old_values: torch.Tensor  # (N, W)
    scores: torch.Tensor  # (N,) reward-model scores


def check_config(cfg: PPOConfig) -> None:
    if not cfg.data or not cfg.reward_model:
        raise SystemExit("error: alignkit ppo needs --data FILE (prompts) and --reward-model DIR")
    if cfg.value_head and cfg.value_model:
        raise SystemExit("error: --value-head and --value-model are alternatives; give one")
    if not 0 < cfg.max_new_tokens < cfg.max_length:
        raise SystemExit(f"error: --max-new-tokens {cfg.max_new_tokens} must be > 0 and leave room for a prompt in --max-length {cfg.max_length}")
    check_engine(cfg.rollout_engine)


def load_models(cfg: PPOConfig, run: Run, tokenizer):
    """(policy, reference, reward model, value model, value head), each prepared for --autocast/--compile.
    Dropout stays off everywhere (eval mode): the rollout's log-probs and the first PPO forward must agree
    exactly, or the "ratio" is noise from the start (Huang et al. 2024)."""
    dev = run.device
    policy = lora.load_trainable(cfg, run.checkpoint, dev)
    reference = None if lora.is_peft(policy) else (
        prepare(load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, dev), cfg).eval().requires_grad_(False))
    reward_model = load_scorer(cfg.reward_model, tokenizer, dev, cfg.dtype, cfg.trust_remote_code, cfg=cfg,
                               same_tokenizer=True)
    resume_value = run.checkpoint / "value" if run.checkpoint else None  # written by save_value each checkpoint
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
    return policy, reference, reward_model, value_model, value_head


def rollout(cfg: PPOConfig, run: Run, engine, tokenizer, prompt_ids: list[list[int]], step: int) -> Rollout:
    """group_size samples per prompt, seeded per (step, rank): a resumed run samples what the original did."""
    out = engine.generate(prompt_ids, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                          seed=cfg.seed * 100003 + step + run.dist.rank * 7919)
    completions = out.completion_ids
    lengths = torch.tensor([len(c) for c in completions], device=run.device)  # (N,)
    mask = torch.arange(int(lengths.max()), device=run.device)[None] < lengths[:, None]  # (N, W)
    engine_logps = None
    if cfg.tis_cap > 0:
        engine_logps = torch.zeros(mask.shape, device=run.device)  # (N, W)
        for i, lp in enumerate(out.logps):
            engine_logps[i, :len(lp)] = torch.tensor(lp, device=run.device)
    return Rollout([p for p in prompt_ids for _ in range(cfg.group_size)], completions,
                   torch.tensor(out.ended, device=run.device), lengths, mask, tokenizer.pad_token_id, engine_logps)


def update_plan(cfg: PPOConfig, step: int, n: int) -> list[list[list[list[int]]]]:
    """PPO's shuffled mini-batches for every epoch, fixed before the rollout is scored: epochs[e] = mini-batches,
    each a list of micro-batches (lists of rollout rows). The scoring forward runs on exactly the first epoch's
    micro-batches, so the first update's forward repeats it bit for bit (ratio == 1)."""
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + step)
    size = cfg.mini_batch_size or n
    epochs = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=gen).tolist()
        epochs.append([chunks(order[k:k + size], cfg.grad_accum) for k in range(0, n, size)])
    return epochs


@torch.no_grad()
def score(cfg: PPOConfig, actor_critic: ActorCritic, reference, reward_model, ro: Rollout, micro_batches) -> Scored:
    """Old log-probs and values (the policy before any update), reference log-probs and reward-model scores."""
    N, W = ro.mask.shape
    policy, dev = actor_critic.policy, ro.mask.device
    s = Scored(*(torch.zeros(N, W, device=dev) for _ in range(3)), torch.zeros(N, device=dev))
    reward = LastTokenReward(reward_model)  # the token `alignkit reward` trained on
    for rows in micro_batches:
        b = ro.pack(rows)
        s.old_logps[rows], _, s.old_values[rows] = actor_critic(b)
        with lora.reference(policy):
            s.ref_logps[rows] = completion_token_logps(reference or policy, b, cfg.temperature)[0]
        s.scores[rows] = reward(b["input_ids"], b["attention_mask"]).float()
    return s


def advantages_and_returns(cfg: PPOConfig, ro: Rollout, s: Scored, kl_coef: float):
    """KL-shaped per-token rewards -> GAE -> whitened advantages, all (N, W) in the completion layout."""
    penalized = s.scores - cfg.missing_eos_penalty * (~ro.ended).float()  # (N,)
    kl = kl_penalty(s.old_logps, s.ref_logps, cfg.kl_estimator)  # (N, W)
    rewards = kl_shaped_rewards(penalized, kl, ro.mask, kl_coef)  # (N, W)
    advantages, returns = gae(rewards, s.old_values, ro.mask, cfg.gamma, cfg.lam)  # (N, W) each
    return whiten(advantages, ro.mask), returns, rewards  # whitened per process, as TRL (Ziegler et al. 2019)


UPDATE_METRICS = ("loss", "policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl")


def update(cfg: PPOConfig, run: Run, ddp_ac, actor_critic, optimizer, ro: Rollout, s: Scored, advantages, returns,
           epochs, step: int, tis=None) -> tuple[dict, dict, int]:
    """PPO epochs, one optimizer update per mini-batch; token means over the whole mini-batch (a global
    denominator across micro-batches and processes, times world_size for DDP's average).
    `tis`: (N, W) truncated importance weights of the policy loss (--tis-cap), or None.
    Returns (summed means over updates, {approx_kl, clip_frac: one value per update}, tokens processed)."""
    ws = run.world_size
    sums = dict.fromkeys((*UPDATE_METRICS, "grad_norm"), 0.0)
    per_update = {"approx_kl": [], "clip_frac": []}  # the first one is exactly 0: nothing changed yet
    tokens = 0
    for mini_batches in epochs:
        for micro in mini_batches:
            n_tokens = run.dist.all_reduce_sum(sum(len(ro.completions[i]) for mb in micro for i in mb)).item()
            local = dict.fromkeys(UPDATE_METRICS, 0.0)  # token means over this mini-batch, by name
            for rows in micro_steps(ddp_ac, micro):
                b, m = ro.pack(rows), ro.mask[rows]
                logps, entropies, values = ddp_ac(b, entropy=True)  # (B, W) each
                pg, pm = ppo_policy_loss(logps, s.old_logps[rows], advantages[rows], m, cfg.clip_eps)
                if tis is not None:
                    pg = pg * tis[rows]  # (B, W)
                vf = ppo_value_loss(values, s.old_values[rows], returns[rows], m, cfg.clip_eps_value)
                policy_loss = aggregate(pg, m, "token_mean", denominator=n_tokens)
                value_loss = aggregate(vf, m, "token_mean", denominator=n_tokens)
                entropy = aggregate(entropies, m, "token_mean", denominator=n_tokens)
                loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
                (loss * ws).backward()
                share = m.sum().item() / n_tokens  # this micro-batch's weight in the mini-batch token mean
                got = {"loss": loss.item(), "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                       "entropy": entropy.item(), "clip_frac": pm["clip_frac"].item() * share,
                       "approx_kl": pm["approx_kl"].item() * share}
                local = {key: local[key] + got[key] for key in local}
                tokens += b["input_ids"].numel() if b["attention_mask"] is None else int(b["attention_mask"].sum())
            totals = run.dist.reduce_sums(local)
            totals["grad_norm"] = optimizer_step(run, actor_critic, optimizer, totals["loss"], step + 1,
                                                 f" (mini-batch of completions {sorted(i for mb in micro for i in mb)})")
            for key in sums:
                sums[key] += totals[key]
            for key in per_update:
                per_update[key].append(totals[key])
    return sums, per_update, tokens


def tis_weights(cfg: PPOConfig, ro: Rollout, s: Scored) -> tuple[torch.Tensor | None, dict]:
    """(N, W) truncated importance weights (--tis-cap > 0; else None) and their token sums for the metrics."""
    if cfg.tis_cap <= 0:
        return None, {}
    w, m = truncated_importance_weights(s.old_logps, ro.engine_logps, ro.mask, cfg.tis_cap)  # (N, W)
    n = ro.mask.sum().item()
    return w, {"tis_weight": m["weight_mean"].item() * n, "tis_capped": m["capped_frac"].item() * n}


def step_metrics(run: Run, ro: Rollout, s: Scored, rewards, sums: dict, per_update: dict,
                 tokens: int, kl_coef: float, tis_sums: dict | None = None) -> tuple[dict, int, int]:
    """(the step's metrics row, completions and tokens over all processes)."""
    k1 = masked_sum(s.old_logps - s.ref_logps, ro.mask, dim=-1)  # (N,) summed k1 KL per sequence
    g = run.dist.reduce_sums({"score": s.scores.sum(), "shaped": rewards.sum(), "kl": k1.sum(),
                              "length": ro.lengths.sum(), "truncated": (~ro.ended).sum(),
                              "completions": len(ro.completions), "tokens": tokens, **(tis_sums or {})})
    n, n_updates = g["completions"], len(per_update["approx_kl"])
    row = {"reward_mean": g["score"] / n, "reward_with_penalty": g["shaped"] / n, "kl": g["kl"] / n,
           "kl_coef": kl_coef, **{k: v / n_updates for k, v in sums.items()},
           "approx_kl_per_update": per_update["approx_kl"], "clip_frac_per_update": per_update["clip_frac"],
           "completion_length": g["length"] / n, "clipped_ratio": g["truncated"] / n,
           **({"tis_weight_mean": g["tis_weight"] / max(1.0, g["length"]),
               "tis_capped_frac": g["tis_capped"] / max(1.0, g["length"])} if tis_sums else {})}
    return row, int(n), int(g["tokens"])


def main(cfg: PPOConfig) -> dict:
    check_config(cfg)
    run = Run(cfg, "ppo")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts, stats = load_prompts(list(cfg.data), tokenizer, cfg.max_length - cfg.max_new_tokens, strict=cfg.strict)
    if run.is_main:
        stats.warn()
    policy, reference, reward_model, value_model, value_head = load_models(cfg, run, tokenizer)
    actor_critic = ActorCritic(policy, value_model, value_head, cfg.temperature).eval()
    gen_model = parallel.generation_copy(policy, cfg)  # under --fsdp a plain copy samples; else the policy
    ddp_ac = shard_actor_critic(actor_critic, run.device) if cfg.fsdp else parallel.wrap(actor_critic, run, cfg)
    optimizer = adamw(actor_critic, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    # the trainer's log-probs are of logits / temperature, so the engine's must be the processed ones
    engine = build_engine(cfg, gen_model, tokenizer, cfg.model, max_model_len=cfg.max_length, seed=cfg.seed,
                          logprobs_mode="processed_logprobs", owns_copy=gen_model is not policy)
    if cfg.tis_cap > 0 and not engine.gives_logps:
        raise UserError(f"--tis-cap {cfg.tis_cap}: --rollout-engine {cfg.rollout_engine} samples from the policy being "
                        "trained and returns no log-probs of its own (every weight would be 1); TIS corrects an "
                        "engine that does, e.g. --rollout-engine vllm")

    # Prompt order: a pure function of (seed, step), so resume and DDP see the same prompts.
    plan = StepPlan(lambda e: [b for b in shuffled_batches(len(prompts), cfg.batch_size, cfg.seed + e)
                               if len(b) == cfg.batch_size], 1, run.world_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * plan.steps_per_epoch)
    start_step = run.begin(policy, tokenizer, optimizer, total_steps, totals=("completions", "tokens"),
                           trained=actor_critic)
    state = {"kl_coef": run.state.get("kl_coef", cfg.kl_coef)}  # adaptive, so carried across --resume

    def save_value_state(checkpoint_dir: Path) -> None:  # into each checkpoint, atomically with the policy
        save_value(value_model, value_head, tokenizer, checkpoint_dir / "value", run.is_main)

    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = schedule_lr(run, optimizer, step, cfg.schedule)
        engine.load_weights(parallel.rollout_weights(policy))  # the policy after the last update (or as resumed)
        ro = rollout(cfg, run, engine, tokenizer, [prompts[i].prompt_ids
                                                   for i in plan.micro_batches(step, run.dist.rank)[0]], step)
        epochs = update_plan(cfg, step, len(ro.completions))
        s = score(cfg, actor_critic, reference, reward_model, ro, [mb for mini in epochs[0] for mb in mini])
        bad = (~torch.isfinite(s.scores)).nonzero().flatten().tolist()[:1]
        detail = "".join(f" (reward model score {s.scores[i].item()} for prompt {tokenizer.decode(ro.prompt_ids[i])!r}, "
                         f"completion {tokenizer.decode(ro.completions[i])!r})" for i in bad)
        if not run.check(run.dist.all_reduce_sum(s.scores.sum()).item(), step + 1, detail):
            run.log(step + 1, {"skipped_nonfinite_reward": 1.0, "lr": lr})
            run.end_step(step + 1, state, save_extra=save_value_state)
            continue
        advantages, returns, rewards = advantages_and_returns(cfg, ro, s, state["kl_coef"])
        tis, tis_sums = tis_weights(cfg, ro, s)
        sums, per_update, tokens = update(cfg, run, ddp_ac, actor_critic, optimizer, ro, s, advantages, returns,
                                          epochs, step, tis)
        row, n, tokens = step_metrics(run, ro, s, rewards, sums, per_update, tokens, state["kl_coef"], tis_sums)
        row.update(completions_per_s=n / (time.perf_counter() - t0), lr=lr)
        if cfg.target_kl is not None:
            state["kl_coef"] = adaptive_kl_coef(state["kl_coef"], row["kl"], cfg.target_kl, cfg.kl_horizon, n)
        run.count(completions=n, tokens=tokens)
        run.log(step + 1, row, tokens=tokens)
        run.end_step(step + 1, state, save_extra=save_value_state)

    save_value(value_model, value_head, tokenizer,
               Path(cfg.output) / "value_model" if value_head is None else Path(cfg.output), run.is_main)
    return run.finish({"kl_coef": state["kl_coef"], "prompts": len(prompts),
                       "dropped_prompts": stats.dropped})
