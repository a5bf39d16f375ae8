"""alignkit self-reward: self-rewarding language models (Yuan et al. 2024, §2) and, with an external judge,
online / iterative DPO (Xu et al. 2023; Guo et al. 2024).

One plain loop, K iterations, each from the model the previous one trained:

    sample   --group-size completions per prompt from the current model
    judge    each completion: by default the current policy itself, pointwise, through the LLM-as-a-judge
             prompt (`alignkit.judge.LLMJudge` on the already loaded policy); or any judge the judge flags
             name (--judge-model, --reward-model, --reward), pointwise or --judge-mode pairwise (round robin)
    pairs    best (chosen) vs worst (rejected) per prompt; ties (best - worst <= --min-margin) and, unless
             --keep-truncated, completions that hit --max-new-tokens without a stop token are left out (counted)
    dpo      the existing recipe (`alignkit.recipes.dpo.main`, every flag as --dpo.*), its reference the
             iteration's starting model (Yuan et al.)

OUTPUT/iter-k/ holds samples.jsonl, pairs.jsonl and dpo/ (the iteration's model and its DPO metrics);
OUTPUT/iter-k/.complete is written last, so a rerun of the same command continues at the first
incomplete iteration (redone from scratch: sampling is seeded per (seed, k, batch)). OUTPUT/model is the
last iteration's model. Under torchrun, prompt batches are sampled and judged across processes as in
best-of-n and process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from alignkit.config import Repeatable, to_dict
from alignkit.decoding import SamplingOptions, decoding_rules
from alignkit.engines import EngineOptions, build_engine, check_engine
from alignkit.errors import UserError, writing
from alignkit.judge import JudgeOptions
from alignkit.recipes.dpo import DPOConfig

Hidden = tyro.conf.Suppress


@dataclass
class IterationDPOConfig(DPOConfig):
    """The DPO step of each iteration (`alignkit dpo`'s options; model, data, output and reference are set
    by the loop)."""

    model: Hidden[str] = ""
    data: Hidden[tuple[str, ...]] = ()
    output: Hidden[str] = ""
    config: Hidden[str | None] = None
    resume: Hidden[bool] = False
    overwrite: Hidden[bool] = False
    ref_model: Hidden[str | None] = None
    device: Hidden[str] = "auto"
    dtype: Hidden[Literal["float32", "bfloat16"]] = "float32"
    trust_remote_code: Hidden[bool] = False
    progress: Hidden[bool] = True


@dataclass
class SelfRewardConfig(EngineOptions, JudgeOptions, SamplingOptions):
    """Self-rewarding / online iterative DPO: sample, judge (the policy itself by default), best-vs-worst pairs,
    DPO, repeat from the new model."""

    model: str = ""
    """Local Hugging Face model directory: the policy of iteration 1 (and, by default, its own judge)."""
    data: Annotated[tuple[str, ...], Repeatable] = ()
    """Prompt file(s): records with a 'prompt' field (string or messages); other fields are kept in samples.jsonl
    and go to reward functions."""
    output: str = "runs/self-reward"
    """Output directory: iter-k/{samples.jsonl, pairs.jsonl, dpo/}, metrics.jsonl, config.yaml, model/."""
    config: str | None = None
    """YAML file of defaults for these fields (the DPO options under `dpo:`); command-line flags override it."""
    iterations: int = 3
    """Sample-judge-DPO iterations (Yuan et al. run 3)."""
    group_size: int = 4
    """Completions sampled per prompt per iteration (Yuan et al. sample 4)."""
    judge_mode: Literal["pointwise", "pairwise"] = "pointwise"
    """pointwise: a score per completion (Yuan et al.); pairwise: each completion's mean P(better) against the
    rest of its group (round robin, both orders)."""
    min_margin: float = 0.0
    """A prompt whose best minus worst score is at most this gives no pair (a tie, counted)."""
    keep_truncated: bool = False
    """Let completions that hit --max-new-tokens without a stop token be chosen or rejected (by default they
    cannot: DPO would learn to stop mid-sentence, or only that long answers lose)."""
    batch_size: int = 8
    """Prompts per sampling batch (each sampled --group-size times); the unit of sharding under torchrun."""
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
    seed: int = 0
    """Sampling seed (per iteration and prompt batch: the samples do not depend on the number of processes)."""
    strict: bool = False
    """Over-long prompts are an error instead of being dropped."""
    resume: bool = False
    """Continue the run in OUTPUT at its first incomplete iteration (a rerun of the same command does so too);
    refused if OUTPUT holds a run with other settings."""
    overwrite: bool = False
    """Delete the run already in OUTPUT and start over."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype (policy, judge and DPO)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""
    progress: bool = True
    """Show progress: a bar on a terminal, else a plain line every few steps or 30 s."""
    dpo: IterationDPOConfig = field(default_factory=IterationDPOConfig)
    """The DPO step: every `alignkit dpo` option as --dpo.NAME (e.g. --dpo.lr, --dpo.loss, --dpo.max-steps)."""


# Settings that do not change what the loop computes: a run may be continued with other values of these
# (a larger --iterations adds iterations to a finished run).
RUN_ONLY = {"output", "config", "resume", "overwrite", "progress", "device", "trust_remote_code", "iterations"}
DPO_RUN_ONLY = {"log_every", "save_every", "save_total_limit", "compile", "report_to"}
HIDDEN_DPO = {"model", "data", "output", "config", "resume", "overwrite", "ref_model", "device", "dtype",
              "trust_remote_code", "progress"}  # set by the loop, not by --dpo.* flags
# What a DPO run writes besides its model: left out of the copy that is OUTPUT/model.
DPO_RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", ".lock", "tensorboard", "wandb", "trackio")


def settings(cfg: SelfRewardConfig) -> dict:
    """The config as saved in OUTPUT/config.yaml, less the fields a continued run may change."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY}
    d["dpo"] = {k: v for k, v in d["dpo"].items() if k not in DPO_RUN_ONLY and k not in HIDDEN_DPO}
    return d



def check_config(cfg: SelfRewardConfig) -> None:
    if not cfg.data:
        raise UserError("alignkit self-reward needs --data FILE (records with a 'prompt' field)")
    if cfg.iterations < 1:
        raise UserError(f"--iterations must be >= 1, got {cfg.iterations}")
    if cfg.group_size < 2:
        raise UserError(f"--group-size must be >= 2 (a pair needs a best and a worst), got {cfg.group_size}")
    if cfg.temperature <= 0:
        raise UserError("--temperature must be > 0: greedy decoding gives --group-size identical samples")
    if cfg.min_margin < 0:
        raise UserError(f"--min-margin must be >= 0, got {cfg.min_margin}")
    check_engine(cfg.rollout_engine)
    if cfg.reward_timeout < 0:
        raise UserError(f"--reward-timeout {cfg.reward_timeout} must be >= 0 seconds (0 = no limit)")


# ----------------------------------------------------------------------------------------------
# The output directory: one run, continued at its first incomplete iteration
# ----------------------------------------------------------------------------------------------


def iter_dir(out: Path, k: int) -> Path:
    return out / f"iter-{k}"


def is_complete(out: Path, k: int) -> bool:
    return (iter_dir(out, k) / ".complete").is_file()


def claim_output(cfg: SelfRewardConfig, out: Path):
    """Lock OUTPUT, check that a run in it is this run (else --overwrite deletes it), write config.yaml.
    Returns the lock (an open file) and the first iteration to run (K + 1 when all are done)."""
    import yaml

    from alignkit.config import save_config
    from alignkit.train import run

    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the run in --output, or replace it")
    with writing(out, "--output"):
        out.mkdir(parents=True, exist_ok=True)
    lock = run.lock_output(out)
    if lock is None:
        raise UserError(f"--output {out} is in use by another alignkit run; wait for it to finish or choose "
                        "another --output")
    run._held.remove(lock)  # held for the whole loop: each DPO run releases the outputs it holds when it ends
    try:
        return lock, first_iteration(cfg, out, yaml, save_config)
    except BaseException:
        lock.close()
        raise


def first_iteration(cfg: SelfRewardConfig, out: Path, yaml, save_config) -> int:
    saved_path = out / "config.yaml"
    found = saved_path.is_file() or any(out.glob("iter-*")) or (out / "model").exists()
    if found and cfg.overwrite:
        for path in [*out.glob("iter-*"), out / "model"]:
            shutil.rmtree(path, ignore_errors=True)
        for name in ("metrics.jsonl", "config.yaml", ".files.json"):
            (out / name).unlink(missing_ok=True)
        print(f"--overwrite: deleted the previous run in {out}")
    elif found:
        saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else None
        if not isinstance(saved, dict) or "dpo" not in saved:
            raise UserError(f"--output {out} holds files that are not a self-reward run; replace them with "
                            "--overwrite or choose another --output")
        saved = {k: v for k, v in saved.items() if k not in RUN_ONLY}
        saved["dpo"] = {k: v for k, v in saved["dpo"].items() if k not in DPO_RUN_ONLY and k not in HIDDEN_DPO}
        current = settings(cfg)
        diffs = [f"{k} {saved.get(k)} -> {v}" for k, v in current.items() if k != "dpo" and saved.get(k) != v]
        diffs += [f"dpo.{k} {saved['dpo'].get(k)} -> {v}" for k, v in current["dpo"].items()
                  if saved["dpo"].get(k) != v]
        files = json.loads((out / ".files.json").read_text()) if (out / ".files.json").is_file() else {}
        now = input_files(cfg)
        diffs += [f"{key.replace('=', ' ', 1)} changed since the run started (content hash)"
                  for key in sorted(set(files) & set(now)) if files[key] != now[key]]
        if diffs:
            raise UserError(f"--output {out} holds a self-reward run with other settings ({'; '.join(diffs)}); "
                            "rerun with the same ones to continue it, or pass --overwrite to start over")
    with writing(saved_path, "config"):
        save_config(cfg, out, "self-reward")
        (out / ".files.json").write_text(json.dumps(input_files(cfg)))
    k = 1
    while k <= cfg.iterations and is_complete(out, k):
        k += 1
    return k


def input_files(cfg: SelfRewardConfig) -> dict[str, str]:
    """Content hashes of the files and model directories the config names (as `alignkit.train.run` checks a
    resumed run's), so a continued run is refused if its data or starting model changed."""
    from alignkit.train import checkpoint

    return checkpoint.fingerprint(cfg, 1)["files"]


def write_metrics(out: Path, rows: list[dict]) -> None:
    from alignkit.commands import write_jsonl

    with writing(out / "metrics.jsonl", "metrics"):
        write_jsonl(str(out / "metrics.jsonl"), rows)


def completed_rows(out: Path, upto: int) -> list[dict]:
    """The metrics rows of iterations 1..upto, as each wrote them before its .complete marker."""
    return [json.loads((iter_dir(out, k) / "summary.json").read_text()) for k in range(1, upto + 1)]


# ----------------------------------------------------------------------------------------------
# One iteration: sample, judge, pairs, DPO
# ----------------------------------------------------------------------------------------------


def sample_and_judge(cfg: SelfRewardConfig, k: int, policy, tokenizer, judge, prompts, batches: list[list[int]],
                     mine: list[int], show: bool = True, engine=None) -> list[dict]:
    """This process's prompt batches: --group-size completions each from the policy, judged. Returns one
    record per prompt (its completions, their scores, whether each ended at a stop token)."""
    from alignkit.engines import LocalEngine
    from alignkit.judge import Item, score_items
    from alignkit.train.tracking import progress_iter

    recs = []
    rules = decoding_rules(cfg, tokenizer, policy)
    engine = engine or LocalEngine(policy, tokenizer)
    for b in progress_iter(mine, cfg.progress and show, f"iteration {k}: sample + judge"):
        idx = batches[b]
        with torch.no_grad():
            s = engine.generate([prompts[i].prompt_ids for i in idx], cfg.group_size, cfg.max_new_tokens,
                                cfg.temperature, cfg.top_p, rules, seed=cfg.seed * 1000003 + k * 10007 + b,
                                batch_size=cfg.generation_batch_size)
        comp_ids, ended = s.completion_ids, s.ended
        texts = tokenizer.batch_decode(comp_ids, skip_special_tokens=True)
        G = cfg.group_size
        items = [Item(f"prompt {i}", {}, "list", prompts[i].prompt, texts[g * G:(g + 1) * G], prompts[i].columns)
                 for g, i in enumerate(idx)]
        scored = score_items(judge, items, cfg.judge_mode, max(1, cfg.judge_batch_size), False)
        for g, (i, (scores, mass)) in enumerate(zip(idx, scored)):
            rows = range(g * G, (g + 1) * G)
            recs.append({"_index": i, "prompt": prompts[i].prompt, **prompts[i].columns,
                         "completions": [texts[j] for j in rows], "scores": scores, "label_mass": mass,
                         "ended": [ended[j] for j in rows], "tokens": [len(comp_ids[j]) for j in rows]})
    return recs


def best_vs_worst(cfg: SelfRewardConfig, rec: dict) -> tuple[dict | None, str]:
    """The prompt's pair (best chosen, worst rejected, Yuan et al. §2.3), or None and why not: 'tie' or
    'too_few' (fewer than two non-empty completions that ended at a stop token, or with --keep-truncated at all;
    an empty answer is no preference data)."""
    from alignkit.recipes.best_of_n import pair_record

    ok = [j for j, (e, c) in enumerate(zip(rec["ended"], rec["completions"]))
          if (e or cfg.keep_truncated) and c.strip()]
    if len(ok) < 2:
        return None, "too_few"
    scores = rec["scores"]
    best = max(ok, key=lambda j: scores[j])  # first of equals: deterministic
    worst = min(ok, key=lambda j: scores[j])
    if scores[best] - scores[worst] <= cfg.min_margin + 1e-12:
        return None, "tie"
    return {**pair_record(rec["prompt"], rec["completions"][best], rec["completions"][worst]),
            "score_chosen": scores[best], "score_rejected": scores[worst]}, "pair"


def summarize(recs: list[dict], reasons: list[str]) -> dict:
    scores = [x for rec in recs for x in rec["scores"]]
    n = max(1, len(scores))
    return {"prompts": len(recs), "completions": len(scores),
            "score_mean": sum(scores) / n,
            "score_best": sum(max(rec["scores"]) for rec in recs) / max(1, len(recs)),
            "score_worst": sum(min(rec["scores"]) for rec in recs) / max(1, len(recs)),
            "label_mass": sum(rec["label_mass"] for rec in recs) / max(1, len(recs)),
            "pairs": reasons.count("pair"), "ties": reasons.count("tie"),
            "no_pair": reasons.count("too_few"),
            "truncated": sum(not e for rec in recs for e in rec["ended"]),
            "empty": sum(not c.strip() for rec in recs for c in rec["completions"]),
            "length_tokens": sum(t for rec in recs for t in rec["tokens"]) / n,
            "length_words": sum(len(c.split()) for rec in recs for c in rec["completions"]) / n}


def dpo_config(cfg: SelfRewardConfig, model_dir: str, pairs_path: Path, out: Path) -> DPOConfig:
    """The iteration's DPO run: from the iteration's starting model, which is also its reference (the
    default of --ref-model); LoRA adapters are merged so the next iteration starts from full weights."""
    fields = {f.name: getattr(cfg.dpo, f.name) for f in dataclasses.fields(DPOConfig)}
    fields.update(model=model_dir, data=(str(pairs_path),), output=str(out), config=None, resume=False,
                  overwrite=False, ref_model=None, device=cfg.device, dtype=cfg.dtype,
                  trust_remote_code=cfg.trust_remote_code, progress=cfg.progress,
                  merge_lora=cfg.dpo.merge_lora or cfg.dpo.lora_r > 0)
    return DPOConfig(**fields)


def dpo_result(dpo_out: Path) -> dict:
    """The DPO run's last training row: its loss and reward accuracy."""
    rows = [json.loads(line) for line in (dpo_out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if not r.get("final") and "loss" in r]
    return {"dpo_loss": last[-1]["loss"] if last else None,
            "dpo_reward_accuracy": last[-1].get("reward_accuracy") if last else None,
            "dpo_steps": last[-1]["step"] if last else 0}


def run_iteration(cfg: SelfRewardConfig, k: int, model_dir: str, prompts, d, external_judge) -> None:
    """Iteration k from `model_dir`: writes OUTPUT/iter-k/ and, last, its .complete marker."""
    from alignkit.commands import write_jsonl
    from alignkit.judge import load_judge
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes import dpo
    from alignkit.train import dist as distributed

    out = Path(cfg.output)
    here = iter_dir(out, k)
    t0 = time.perf_counter()
    if d.is_main:
        shutil.rmtree(here, ignore_errors=True)  # an incomplete iteration is redone from scratch
        here.mkdir(parents=True)
    d.barrier()
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    policy = load_causal_lm(model_dir, cfg.dtype, cfg.trust_remote_code, d.device).eval()
    judge = external_judge or load_judge(cfg, model=policy, tokenizer=tokenizer)
    engine = build_engine(cfg, policy, tokenizer, model_dir, max_model_len=cfg.max_length, seed=cfg.seed + k)
    batches = [list(range(s, min(s + cfg.batch_size, len(prompts)))) for s in range(0, len(prompts), cfg.batch_size)]
    mine = list(range(d.rank, len(batches), d.world_size))
    recs = sample_and_judge(cfg, k, policy, tokenizer, judge, prompts, batches, mine, show=d.is_main, engine=engine)
    del policy, judge, engine
    (here / f".shard-{d.rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    d.barrier()
    failure = None
    if d.is_main:
        recs = []
        for r in range(d.world_size):
            shard = here / f".shard-{r}.jsonl"
            recs += [json.loads(line) for line in shard.read_text().splitlines()]
            shard.unlink()
        recs.sort(key=lambda rec: rec["_index"])
        made = [best_vs_worst(cfg, rec) for rec in recs]
        for rec in recs:
            del rec["_index"]
        write_jsonl(str(here / "samples.jsonl"), recs)
        write_jsonl(str(here / "pairs.jsonl"), [p for p, _ in made if p is not None])
        summary = summarize(recs, [why for _, why in made])
        (here / ".sampled.json").write_text(json.dumps(summary))
        if not summary["pairs"]:
            failure = (f"iteration {k}: no pairs from {summary['prompts']} prompts ({summary['ties']} ties, "
                       f"{summary['no_pair']} with fewer than two non-empty completions that ended; see "
                       f"{here / 'samples.jsonl'}): raise --max-new-tokens or --group-size, or pass --keep-truncated")
    if d.any(failure is not None):
        raise UserError(failure or f"iteration {k}: no pairs (see process 0)")
    if d.is_main:
        print(f"iteration {k}: {summary['pairs']} pairs, mean judge score {summary['score_mean']:.4f}, "
              f"{summary['length_words']:.1f} words per completion")
    with distributed.keep_group():
        dpo.main(dpo_config(cfg, model_dir, here / "pairs.jsonl", here / "dpo"))
    if d.is_main:
        shutil.rmtree(here / "dpo" / "checkpoints", ignore_errors=True)  # the DPO run is never resumed
        summary = json.loads((here / ".sampled.json").read_text())
        row = {"step": k, **summary, **dpo_result(here / "dpo"), "start_model": model_dir,
               "model": str(here / "dpo"), "seconds": time.perf_counter() - t0}
        (here / "summary.json").write_text(json.dumps(row))
        (here / ".complete").write_text("")
        write_metrics(out, completed_rows(out, k))
    d.barrier()


def main(cfg: SelfRewardConfig) -> dict:
    from alignkit.train import dist as distributed

    check_config(cfg)
    d = distributed.setup(cfg.device)
    out = Path(cfg.output)
    lock, start, failure = None, 0, None
    if d.is_main:
        try:
            lock, start = claim_output(cfg, out)
        except UserError as e:
            failure = str(e)
    if d.any(failure is not None):  # every process stops, not only the one that saw the error
        distributed.teardown()
        raise UserError(failure or "see process 0")
    start = int(d.all_reduce_sum(start).item())
    try:
        return loop(cfg, d, out, start)
    finally:
        if lock is not None:
            lock.close()


def loop(cfg: SelfRewardConfig, d, out: Path, start: int) -> dict:
    """Iterations start..K, then OUTPUT/model and the final metrics row."""
    from alignkit.data import load_prompts
    from alignkit.judge import load_judge
    from alignkit.models import load_tokenizer
    from alignkit.train import dist as distributed

    rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    last = json.loads(rows[-1]) if rows else {}
    finished = last.get("final") and last.get("iterations") == cfg.iterations and (out / "model").is_dir()
    if start > cfg.iterations and finished:  # else a kill came between the last iteration and the final row
        if d.is_main:
            print(f"self-reward: all {cfg.iterations} iterations in {out} are complete; nothing to do")
        distributed.teardown()
        return last
    if 1 < start <= cfg.iterations and d.is_main:
        print(f"self-reward: iterations 1-{start - 1} in {out} are complete; continuing at iteration {start}")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts, stats = load_prompts(list(cfg.data), tokenizer, cfg.max_length - cfg.max_new_tokens, strict=cfg.strict)
    if d.is_main:
        stats.warn()
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts >= 0 else prompts
    if not prompts:
        raise UserError("no usable prompts (all longer than max_length - max_new_tokens?)")
    external = None
    if cfg.judge_model or cfg.reward_model or cfg.reward:  # a fixed judge: loaded once for every iteration
        external = load_judge(cfg)
    t0 = time.perf_counter()
    for k in range(start, cfg.iterations + 1):
        model_dir = cfg.model if k == 1 else str(iter_dir(out, k - 1) / "dpo")
        run_iteration(cfg, k, model_dir, prompts, d, external)
    final = {}
    if d.is_main:
        # the last DPO run's model files, without its run files, so `--model OUTPUT/model` starts a fresh run
        shutil.rmtree(out / "model", ignore_errors=True)
        with writing(out / "model", "the model to"):
            shutil.copytree(iter_dir(out, cfg.iterations) / "dpo", out / "model",
                            ignore=shutil.ignore_patterns(*DPO_RUN_FILES))
        rows = completed_rows(out, cfg.iterations)
        final = {"step": cfg.iterations, "final": True, "iterations": cfg.iterations,
                 "score_mean_first": rows[0]["score_mean"], "score_mean_last": rows[-1]["score_mean"],
                 "length_words_first": rows[0]["length_words"], "length_words_last": rows[-1]["length_words"],
                 "pairs": sum(r["pairs"] for r in rows), "dropped_prompts": stats.dropped,
                 "judge": "self" if external is None else external.kind, "model": str(out / "model"),
                 "seconds": sum(r["seconds"] for r in rows), "seconds_this_launch": time.perf_counter() - t0}
        write_metrics(out, rows + [final])
        print(f"self-reward: {cfg.iterations} iteration{'s' * (cfg.iterations != 1)}, mean judge score "
              f"{final['score_mean_first']:.4f} -> {final['score_mean_last']:.4f} -> {out / 'model'}")
    d.barrier()
    distributed.teardown()
    return final
