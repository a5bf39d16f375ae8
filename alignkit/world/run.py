"""`alignkit world run`: the world's experiments over one or more seeds, every model measured against the
gold judge, with a report.

Each seed's stages live in OUT/seed-S/ (alignkit/world/stages.py caches them by content, so experiments share
the base and SFT models); its results go to OUT/seed-S/results.json (a contract, checked by tests/world),
its timings and commands to OUT/seed-S/timings.json, its report to OUT/seed-S/report.md. After the seeds,
OUT/results.json and OUT/report.{md,html} aggregate every seed directory in OUT with intervals.
docs/world.md describes the world and records what it has measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from alignkit.config import Repeatable

# Bit-identical reruns: MKL picks its code path once per process from this variable (conditional numerical
# reproducibility), so it must be set before torch's first matrix product; the parallel seeds' processes get
# it in their environment before torch is imported. AUTO keeps the machine's fastest path and makes it
# reproducible run to run; COMPATIBLE (the same results on every x86 machine) is 2.4 times slower here.
REPRODUCIBLE_ENV = {"MKL_CBWR": "AUTO", "PYTHONHASHSEED": "0"}


@dataclass
class WorldRunConfig:
    """Build the world, train tokenizer and model from scratch, run the experiments, evaluate, report."""

    output: str = "runs/world"
    """Directory for data, models and the reports (one seed-S/ subdirectory per seed)."""
    preset: Literal["smoke", "tiny", "small"] = "tiny"
    """tiny: the ladder in under 10 minutes per seed on 2 CPU cores; small: budgeted at about 40 minutes per seed
    (not yet measured), clearer effects; smoke: a pipeline check of a few minutes whose figures mean nothing."""
    seeds: str = "0"
    """Comma-separated seeds (world and every stage); each seed's results are written as it finishes."""
    seed: int | None = None
    """The same as --seeds N (one seed)."""
    experiment: Annotated[tuple[str, ...], Repeatable] = ()
    """Experiment to run (repeatable; `all` = every one; default: ladder; `alignkit world list` says what each
    shows)."""
    stages: str = "all"
    """The ladder's stages: a comma-separated subset of sft,reward,dpo,ppo,grpo,overopt (pretraining
    and the base model always run)."""
    parallel: int = 1
    """Run this many seeds at once, each in its own process with cores // parallel threads."""
    stage_processes: int = 1
    """Train an experiment's independent post-SFT stages (the ladder's DPO, PPO, GRPO, ...) this many at a time, each in
    its own single-threaded process."""
    threads: int | None = None
    """torch threads per seed (default: the cores, divided among the parallel seeds). Results depend on it."""
    aggregate: bool = True
    """After the seeds, aggregate every seed directory in OUTPUT into OUTPUT/results.json and the report."""
    progress: bool = True
    """Show the commands' progress bars."""


@dataclass
class WorldListConfig:
    """What each experiment of `alignkit world run --experiment NAME` shows, and roughly how long it takes."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def list_main(cfg: WorldListConfig | None = None) -> None:
    from alignkit.world.experiments import EXPERIMENTS

    for name, module in EXPERIMENTS.items():
        minutes = ", ".join(f"{preset} ~{m:g} (estimate)" if preset in module.ESTIMATED else f"{preset} {m:g}"
                            for preset, m in module.MINUTES.items())
        print(f"{name}\n    {module.SUMMARY}\n    minutes per seed on 2 cores: {minutes}")


def experiments(cfg: WorldRunConfig) -> list[str]:
    from alignkit.world.experiments import EXPERIMENTS

    given = cfg.experiment or ("ladder",)
    names = list(EXPERIMENTS) if "all" in given else list(dict.fromkeys(given))
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"error: --experiment: unknown {', '.join(unknown)}; the experiments are: "
                         f"{', '.join(EXPERIMENTS)} (or all)")
    return names


def check_stages(cfg: WorldRunConfig) -> None:
    from alignkit.world.experiments.ladder import STAGES

    unknown = [s for s in cfg.stages.split(",") if s.strip() not in STAGES] if cfg.stages != "all" else []
    if unknown:
        raise SystemExit(f"error: --stages: unknown {', '.join(unknown)}; the ladder's stages are: {','.join(STAGES)} "
                         "(SimPO and LN-DPO are in --experiment dpo-family)")


def seeds(cfg: WorldRunConfig) -> list[int]:
    if cfg.seed is not None:
        return [cfg.seed]
    try:
        return [int(s) for s in cfg.seeds.split(",") if s.strip()] or [0]
    except ValueError:
        raise SystemExit(f"error: --seeds {cfg.seeds!r}: expected comma-separated integers such as 0,1,2") from None


@contextmanager
def pinned(threads: int):
    """Fix what a same-machine rerun could otherwise vary (thread count, algorithms, MKL's code path); the
    caller's torch settings are restored afterwards."""
    import torch

    for k, v in REPRODUCIBLE_ENV.items():
        os.environ.setdefault(k, v)
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def run_seed(cfg: WorldRunConfig, seed: int, names: list[str], threads: int) -> dict:
    from alignkit.world.experiments import EXPERIMENTS
    from alignkit.world.report import write_report
    from alignkit.world.stages import Context

    out = Path(cfg.output) / f"seed-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, seed, cfg.preset, cfg.progress, cfg.stages, cfg.stage_processes)
    results_path = out / "results.json"
    # Experiments run at another time (or with other --experiment) keep their sections.
    old = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = {"preset": cfg.preset, "seed": seed,
               "experiments": old.get("experiments", {}) if old.get("preset") == cfg.preset else {}}
    t0 = time.perf_counter()
    with pinned(threads):
        for name in names:
            results["experiments"][name] = EXPERIMENTS[name].run(ctx)
            _write_json(results_path, results)
    seconds = time.perf_counter() - t0
    _write_json(out / "timings.json", {"seconds": seconds, "threads": threads, "timings": ctx.timings,
                                       "commands": ctx.commands})
    write_report(out, results)
    print(f"\n== seed {seed}: stage timings ==")
    for k, v in ctx.timings.items():
        print(f"  {k:<16} {v:7.1f} s")
    print(f"  {'total':<16} {seconds:7.1f} s\nreport: {out / 'report.md'}", flush=True)
    return results


def _write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a killed run never leaves half a results.json)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def run_parallel(cfg: WorldRunConfig, all_seeds: list[int], names: list[str], threads: int) -> None:
    """Each seed in its own `alignkit world run` process; its output goes to OUT/seed-S/log.txt."""
    env = {**os.environ, **REPRODUCIBLE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running, failed = list(all_seeds), [], []
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < cfg.parallel:
            seed = pending.pop(0)
            log = Path(cfg.output) / f"seed-{seed}" / "log.txt"
            log.parent.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "alignkit.cli", "world", "run", "--output", cfg.output, "--preset",
                    cfg.preset, "--seeds", str(seed), "--stages", cfg.stages, "--threads", str(threads),
                    "--stage-processes", str(cfg.stage_processes),
                    "--no-aggregate", "--no-progress", *(a for n in names for a in ("--experiment", n))]
            print(f"== seed {seed}: {' '.join(argv[1:])} > {log}", flush=True)
            f = open(log, "w")
            running.append((seed, subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env), f))
        time.sleep(1.0)
        for item in [r for r in running if r[1].poll() is not None]:
            seed, proc, f = item
            f.close()
            running.remove(item)
            print(f"== seed {seed}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}",
                  flush=True)
            if proc.returncode != 0:
                failed.append(seed)
    if failed:
        raise SystemExit(f"error: seed(s) {', '.join(map(str, failed))} failed; see "
                         + ", ".join(f"{cfg.output}/seed-{s}/log.txt" for s in failed))


def main(cfg: WorldRunConfig) -> dict:
    names = experiments(cfg)
    check_stages(cfg)
    all_seeds = seeds(cfg)
    parallel = max(1, min(cfg.parallel, len(all_seeds)))
    threads = cfg.threads or max(1, cores() // parallel)
    out = Path(cfg.output)
    if parallel > 1:
        run_parallel(cfg, all_seeds, names, threads)
        results = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in all_seeds}
    else:
        results = {s: run_seed(cfg, s, names, threads) for s in all_seeds}
    if cfg.aggregate:
        from alignkit.world.report import write_report
        from alignkit.world.stats import aggregate

        write_report(out, aggregate(out))
        print(f"aggregate over the seeds in {out}: {out / 'results.json'}, {out / 'report.md'}")
    if cfg.preset == "smoke":
        from alignkit.world.report import SMOKE_NOTE

        print(SMOKE_NOTE)
    return results[all_seeds[0]] if len(all_seeds) == 1 else results
