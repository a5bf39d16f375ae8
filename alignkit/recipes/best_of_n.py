"""alignkit best-of-n: rejection sampling (the notes, slide 55; the rejection-sampling step of Llama 2,
Touvron et al. 2023 §3.2.3, and of iterative "RAFT"/expert-iteration pipelines).

For each prompt, sample --group-size completions from the model, score them with a reward model and/or reward
functions, and keep the best one. The kept completions are written as SFT data (OUTPUT/best.jsonl), and
with --pairs the best and the worst of each prompt as preference pairs (OUTPUT/pairs.jsonl) for an
iterative DPO round. Nothing is trained. The mean reward of the kept completions against the mean
reward of all samples (what one random sample would get) is the gain selection buys.

Runs under torchrun: prompt batch b goes to process b % world_size and is sampled with a seed derived
from (seed, b), so the output does not depend on the number of processes; process 0 merges the shards.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from alignkit.config import Repeatable, save_config
from alignkit.data import load_prompts
from alignkit.decoding import SamplingOptions, decoding_rules
from alignkit.engines import EngineOptions, build_engine, check_engine
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.rewards import load_rewards, score_samples
from alignkit.train import dist as distributed
from alignkit.train.tracking import MetricsWriter, progress_iter


@dataclass
class BestOfNConfig(EngineOptions, SamplingOptions):
    """Rejection sampling: keep the best of --group-size samples per prompt as SFT data (and best/worst pairs)."""

    model: str = ""
    """Local Hugging Face model directory (the policy that samples)."""
    data: Annotated[tuple[str, ...], Repeatable] = ()
    """Prompt file(s): records with a 'prompt' field (string or messages); other fields go to reward functions."""
    output: str = "runs/best-of-n"
    """Output directory: best.jsonl, pairs.jsonl (--pairs), metrics.jsonl, config.yaml."""
    config: str | None = None
    """YAML file of defaults for these fields; command-line flags override it."""
    group_size: Annotated[int, tyro.conf.arg(aliases=("--n", "--num-samples"))] = 8
    """Samples per prompt, as ppo's and grpo's --group-size (older names --n and --num-samples still work)."""
    batch_size: int = 8
    """Prompts per sampling batch (each sampled --group-size times)."""
    max_prompts: int = -1
    """Use only the first N prompts of the data (-1 = all)."""
    max_new_tokens: int = 128
    """Completion budget in tokens."""
    max_length: int = 512
    """Longest prompt + completion: prompts longer than max_length - max_new_tokens are dropped (counted)."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    generation_batch_size: int = 64
    """Sequences per generate call."""
    reward: Annotated[tuple[str, ...], Repeatable] = ()
    """Reward function MODULE:FUNCTION or path/file.py:FUNCTION (repeatable; TRL's signature, see alignkit.rewards)."""
    reward_weights: tuple[float, ...] = ()
    """Weight per reward: one per --reward, in order, then one for --reward-model if given (default all 1)."""
    reward_model: str | None = None
    """Sequence-classification reward model directory (e.g. from `alignkit reward`)."""
    reward_timeout: float = 600.0
    """Seconds one call of a --reward function may take; past that the run stops, naming the function and the sample it hangs on (0 = no limit)."""
    pairs: bool = False
    """Also write OUTPUT/pairs.jsonl: best (chosen) vs worst (rejected) per prompt; ties are skipped and counted."""
    keep_truncated: bool = False
    """Let completions that hit max_new_tokens without a stop token be kept (by default they cannot be best
    or worst: as SFT data they would teach stopping mid-sentence)."""
    seed: int = 0
    """Sampling seed (per prompt batch: the output does not depend on the number of processes)."""
    strict: bool = False
    """Over-long prompts are an error instead of being dropped."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""
    progress: bool = True
    """Show progress: a bar on a terminal, else a plain line every few steps or 30 s."""


def completion_record(prompt, text: str) -> dict:
    """SFT record: conversational when the prompt is a message list, else prompt/completion."""
    if isinstance(prompt, list):
        return {"messages": prompt + [{"role": "assistant", "content": text}]}
    return {"prompt": prompt, "completion": text}


def pair_record(prompt, chosen: str, rejected: str) -> dict:
    if isinstance(prompt, list):
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def main(cfg: BestOfNConfig) -> dict:
    if not cfg.data:
        raise SystemExit("error: alignkit best-of-n needs --data FILE (records with a 'prompt' field)")
    if cfg.group_size < 1 or cfg.group_size < 2 and cfg.pairs:
        raise SystemExit("error: --group-size must be >= 1 (>= 2 with --pairs)")
    if cfg.temperature <= 0:
        raise SystemExit("error: --temperature must be > 0: greedy decoding gives --group-size identical samples")
    if cfg.reward_timeout < 0:
        raise SystemExit(f"error: --reward-timeout {cfg.reward_timeout} must be >= 0 seconds (0 = no limit)")
    check_engine(cfg.rollout_engine)
    d = distributed.setup(cfg.device)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if d.is_main:
        save_config(cfg, out, "best-of-n")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts, stats = load_prompts(list(cfg.data), tokenizer, cfg.max_length - cfg.max_new_tokens, strict=cfg.strict)
    if d.is_main:
        stats.warn()
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts >= 0 else prompts
    if not prompts:
        raise SystemExit("error: no usable prompts (all longer than max_length - max_new_tokens?)")
    model = load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, d.device).eval()
    reward_fns = load_rewards(cfg.reward, cfg.reward_model, tokenizer, d.device, cfg.trust_remote_code, cfg.dtype,
                              cfg=cfg)
    if cfg.reward_weights and len(cfg.reward_weights) != len(reward_fns):
        raise SystemExit(f"error: {len(cfg.reward_weights)} --reward-weights for {len(reward_fns)} rewards")

    rules = decoding_rules(cfg, tokenizer, model)
    engine = build_engine(cfg, model, tokenizer, cfg.model, max_model_len=cfg.max_length, seed=cfg.seed)
    batches = [list(range(s, min(s + cfg.batch_size, len(prompts)))) for s in range(0, len(prompts), cfg.batch_size)]
    mine = list(range(d.rank, len(batches), d.world_size))
    t0 = time.perf_counter()
    shard = out / f".best-of-n-shard-{d.rank}.jsonl"
    with shard.open("w") as f, torch.no_grad():
        for b in progress_iter(mine, cfg.progress and d.is_main, "best-of-n"):
            idx = batches[b]
            s = engine.generate([prompts[i].prompt_ids for i in idx], cfg.group_size, cfg.max_new_tokens,
                                cfg.temperature, cfg.top_p, rules, seed=cfg.seed * 100003 + b,
                                batch_size=cfg.generation_batch_size)
            comp_ids, ended = s.completion_ids, s.ended
            exs = [prompts[i] for i in idx for _ in range(cfg.group_size)]
            # A failing or hanging reward function, or a NaN/inf reward, stops the run naming the function and sample.
            rewards, per_function, texts = score_samples(reward_fns, exs, comp_ids, tokenizer, cfg.reward_weights,
                                                         timeout=cfg.reward_timeout)
            for g, i in enumerate(idx):
                rows = range(g * cfg.group_size, (g + 1) * cfg.group_size)
                rs = [rewards[j].item() for j in rows]
                ok = [j for j in rows if ended[j] or cfg.keep_truncated]
                rec = {"index": i, "batch": b, "rewards": rs,
                       "per_function": {k: [None if math.isnan(x) else x for x in v[list(rows)].tolist()]
                                        for k, v in per_function.items()},
                       "truncated": sum(not ended[j] for j in rows), "best": None, "pair": None, "tie": False}
                if ok:
                    best = max(ok, key=lambda j: rewards[j].item())  # first of equals: deterministic
                    worst = min(ok, key=lambda j: rewards[j].item())
                    rec["best"] = {**completion_record(exs[best].prompt, texts[best]), "reward": rewards[best].item()}
                    rec["tie"] = rewards[best].item() == rewards[worst].item()
                    if cfg.pairs and not rec["tie"]:
                        rec["pair"] = {**pair_record(exs[best].prompt, texts[best], texts[worst]),
                                       "score_chosen": rewards[best].item(), "score_rejected": rewards[worst].item()}
                f.write(json.dumps(rec) + "\n")
    d.barrier()
    final = {}
    if d.is_main:
        final = merge(cfg, out, len(batches), d.world_size, time.perf_counter() - t0, stats.dropped)
    d.barrier()
    distributed.teardown()
    return final


def merge(cfg: BestOfNConfig, out: Path, n_batches: int, world_size: int, seconds: float, dropped: int) -> dict:
    """Process 0: shards -> best.jsonl / pairs.jsonl in prompt order, and metrics.jsonl (a row per prompt
    batch, then the final totals)."""
    recs = []
    for r in range(world_size):
        shard = out / f".best-of-n-shard-{r}.jsonl"
        recs += [json.loads(line) for line in shard.read_text().splitlines()]
        shard.unlink()
    recs.sort(key=lambda rec: rec["index"])
    kept = [rec for rec in recs if rec["best"] is not None]
    (out / "best.jsonl").write_text("".join(json.dumps(rec["best"]) + "\n" for rec in kept))
    if cfg.pairs:
        (out / "pairs.jsonl").write_text("".join(json.dumps(rec["pair"]) + "\n" for rec in recs if rec["pair"]))

    def summary(rs: list[dict]) -> dict:
        everything = [x for rec in rs for x in rec["rewards"] if x is not None]
        best = [rec["best"]["reward"] for rec in rs if rec["best"] is not None]
        row = {"reward_best": sum(best) / max(1, len(best)), "reward_mean": sum(everything) / max(1, len(everything)),
               "completions": len(rs) * cfg.group_size, "prompts": len(rs), "kept": len(best),
               "truncated": sum(rec["truncated"] for rec in rs)}
        for name in (rs[0]["per_function"] if rs else {}):
            vals = [x for rec in rs for x in rec["per_function"][name] if x is not None]
            row[f"reward/{name}"] = sum(vals) / max(1, len(vals))
        return row

    metrics = MetricsWriter(out, True)
    for b in range(n_batches):
        metrics.log({"step": b + 1, **summary([rec for rec in recs if rec["batch"] == b])})
    total = summary(recs)
    final = {"step": n_batches, "final": True, **total, "reward_gain": total["reward_best"] - total["reward_mean"],
             "skipped_prompts": total["prompts"] - total["kept"], "dropped_prompts": dropped,
             "ties": sum(rec["tie"] for rec in recs), "pairs": sum(rec["pair"] is not None for rec in recs),
             "seconds": seconds, "completions_per_s": total["completions"] / max(seconds, 1e-9)}
    metrics.log(final)
    print(f"best-of-{cfg.group_size}: {total['kept']}/{total['prompts']} prompts kept, reward of the best "
          f"{total['reward_best']:.4f} vs a random sample {total['reward_mean']:.4f} -> {out / 'best.jsonl'}")
    return final
