"""`alignkit bench`: SFT, DPO and GRPO throughput on the benchmark fixture, optionally against TRL.

`--shape` picks the model: the tiny fixture (default), or a random model with a real model's published
configuration (`alignkit.bench.fixture.SHAPES`, e.g. qwen2.5-0.5b: vocabulary 151,936), where memory, not
speed, is usually what decides whether a run fits; the jobs there are small (JOBS).

Every run is a fresh subprocess (an `alignkit` command, or `trl_peer.py` in the peer's interpreter) so
that its peak RSS is its own (os.wait4's rusage) and no run warms another's caches. Throughput is
measured from the end of the last warm-up step to the end of the last step, from per-step end times
(alignkit: metrics.jsonl `elapsed`; TRL: a step-end callback), so start-up, data preparation, the
first-step costs (allocator, compile) and the final save are excluded for both.

Achieved FLOP/s counts useful work only (non-padding tokens) with the PaLM estimate per token:
6N + 12·L·d·T to train, 2N + 4·L·d·T forward only (N = non-embedding parameters + LM head, L layers,
width d, T = mean sequence length of the step's sequences). DPO adds a reference forward over every
token; GRPO adds the rollout forward over every prompt + completion token (decode and prefill alike).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Task = Literal["sft", "dpo", "grpo"]
Shape = Literal["tiny", "qwen2.5-0.5b", "llama-3.2-1b"]
# The jobs both implementations run, per fixture: the tiny one, and the real shapes (one step of a 0.5B
# model takes tens of seconds on 2 cores). (warmup, measured) steps are the defaults of --TASK-warmup/-steps.
JOBS = {
    "tiny": {"sft": dict(batch=8, max_length=512, lr=3e-4, steps=(3, 30)),
             "dpo": dict(batch=8, max_length=512, lr=5e-5, steps=(3, 30)),
             "grpo": dict(prompts=2, group=8, new_tokens=64, lr=1e-5, steps=(2, 10))},
    "real": {"sft": dict(batch=2, max_length=512, lr=3e-4, steps=(1, 3)),
             "dpo": dict(batch=2, max_length=512, lr=5e-5, steps=(2, 3)),
             "grpo": dict(prompts=1, group=4, new_tokens=32, lr=1e-5, steps=(1, 3))},
}


def jobs_of(shape: str) -> dict:
    return JOBS["tiny" if shape == "tiny" else "real"]


def units(task: str, job: dict) -> tuple[str, int | None, int]:
    """What one step of `task` processes: the unit reported, units per step (None = the step's tokens) and
    sequences per step (for the mean sequence length T)."""
    if task == "sft":
        return "tokens", None, job["batch"]
    if task == "dpo":
        return "pairs", job["batch"], 2 * job["batch"]
    return "completions", job["prompts"] * job["group"], job["prompts"] * job["group"]


@dataclass
class BenchConfig:
    """Throughput of SFT, DPO and GRPO on a fixed CPU fixture, optionally against TRL on the same fixture."""

    fixture: str | None = None
    """Fixture directory (model/, sft.jsonl, pref.jsonl, prompts.jsonl); built here when it has no model/ yet.
    Default: runs/bench-fixture (tiny) or runs/bench-fixture-SHAPE."""
    shape: Shape = "tiny"
    """Model of the fixture: the tiny 3.4M-parameter Llama, or random weights with a real model's published
    configuration (qwen2.5-0.5b: 494M parameters, vocabulary 151,936; llama-3.2-1b: 1.24B, 128,256), run on
    small jobs (SFT 2 x 512 tokens, DPO 2 pairs, GRPO 1 prompt x 4 completions of 32 tokens)."""
    output: str = "runs/bench"
    """Output directory: bench.json, bench.txt (the table) and runs/ (one directory per run, with its logs)."""
    peer: Literal["none", "trl"] = "none"
    """Also run TRL's trainers with the same settings and report alignkit/TRL ratios."""
    peer_python: str | None = None
    """Python interpreter that can import trl (e.g. another virtualenv's bin/python). Default: this one."""
    tasks: tuple[Task, ...] = ("sft", "dpo", "grpo")
    """Tasks to run."""
    repeats: int = 3
    """Runs per task and implementation; the table reports medians (ratios: median of paired ratios)."""
    sft_warmup: int | None = None
    """SFT steps run before the measured ones (not timed). Default: 3 (tiny), 1 (real shapes)."""
    sft_steps: int | None = None
    """SFT steps measured. Default: 30 (tiny), 3 (real shapes)."""
    dpo_warmup: int | None = None
    """DPO steps run before the measured ones (not timed). Default: 3 (tiny), 2 (real shapes)."""
    dpo_steps: int | None = None
    """DPO steps measured. Default: 30 (tiny), 3 (real shapes)."""
    grpo_warmup: int | None = None
    """GRPO steps run before the measured ones (not timed). Default: 2 (tiny), 1 (real shapes)."""
    grpo_steps: int | None = None
    """GRPO steps measured. Default: 10 (tiny), 3 (real shapes)."""
    sft_batch_size: int | None = None
    """SFT sequences per step (both sides). Default: 8 (tiny), 2 (real shapes)."""
    dpo_batch_size: int | None = None
    """DPO pairs per step (both sides). Default: 8 (tiny), 2 (real shapes)."""
    keep_weights: bool = False
    """Keep each alignkit run's model and checkpoints (7-10 GB per run at the real shapes); by default only
    its logs, metrics and resolved config stay."""
    compile: bool = True
    """Pass --compile to the alignkit commands (TRL runs eager: its best CPU setting)."""
    gradient_checkpointing: bool = False
    """Gradient checkpointing on both sides (alignkit --gradient-checkpointing, TRL gradient_checkpointing=True)."""
    matmul_size: int = 2048
    """Side of the square fp32 matmul that measures the machine's peak FLOP/s."""


# ---------------------------------------------------------------------------------------------------
# Measurement


def matmul_peak(n: int = 2048, reps: int = 7) -> dict:
    """fp32 FLOP/s of an n×n matmul on all of torch's threads: median of `reps` timed runs after warm-up."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return {"flops_per_s": 2 * n ** 3 / statistics.median(times), "size": n, "seconds": times,
            "threads": torch.get_num_threads()}


def flop_model(model_dir: str | Path) -> dict:
    """N (non-embedding parameters + LM head), layers and width of a model directory, for the PaLM estimate."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    # A tied head is the embedding matrix (parameters() lists it once) but still costs a matmul per token.
    n = sum(p.numel() for p in model.parameters() if p is not emb) + (head.numel() if head is emb else 0)
    return {"n": n, "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def step_flops(task: str, tokens: float, fm: dict, sequences: int) -> float:
    """Useful FLOPs of one step that processed `tokens` non-padding tokens in `sequences` sequences (see the
    module docstring)."""
    seq_len = tokens / sequences
    attn = fm["layers"] * fm["hidden"] * seq_len
    train, forward = 6 * fm["n"] + 12 * attn, 2 * fm["n"] + 4 * attn
    return tokens * (train if task == "sft" else train + forward)  # dpo: reference; grpo: rollout


def alignkit_steps(rows: list[dict]) -> list[tuple[float, float]]:
    """(end time in seconds since the run started, tokens) per step, from metrics.jsonl rows logged every step."""
    out, prev = [], 0.0
    for r in sorted((r for r in rows if not r.get("final")), key=lambda r: r["step"]):
        # Rows carry the tokens/s since the previous row (the rate's interval restarts right where the
        # previous row's `elapsed` was read), so this recovers the step's count to within microseconds.
        tokens = r["tokens"] if "tokens" in r else r["tokens_per_s"] * (r["elapsed"] - prev)
        out.append((r["elapsed"], tokens))
        prev = r["elapsed"]
    return out


def peer_steps(result: dict) -> list[tuple[float, float]]:
    """(end time, tokens) per step from trl_peer.py's JSON line (cumulative num_tokens per step)."""
    if None in result["num_tokens"]:
        raise ValueError("TRL's log history has no num_tokens for some steps")
    cum = [0.0] + [float(n) for n in result["num_tokens"]]
    return [(t, cum[i + 1] - cum[i]) for i, t in enumerate(result["step_end"])]


def throughput(steps: list[tuple[float, float]], warmup: int, per_step: int | None = None,
               extra_seconds: float = 0.0) -> dict:
    """Units/s over the steps after the first `warmup` ones: from the end of step `warmup` to the end of
    the last step (+ `extra_seconds`, e.g. an amortised one-off pass). Units are the steps' tokens, or
    `per_step` per step."""
    if warmup < 1 or len(steps) <= warmup:
        raise ValueError(f"need at least one warm-up step and one measured step, got {len(steps)} steps "
                         f"for warmup={warmup}")
    measured = steps[warmup:]
    seconds = measured[-1][0] - steps[warmup - 1][0] + extra_seconds
    tokens = sum(t for _, t in measured)
    units = tokens if per_step is None else per_step * len(measured)
    return {"steps": len(measured), "seconds": seconds, "units": units, "tokens": tokens,
            "units_per_s": units / seconds, "tokens_per_s": tokens / seconds}


# ---------------------------------------------------------------------------------------------------
# Runs


def run_process(name: str, argv: list[str], run_dir: Path) -> dict:
    """Run one benchmark subprocess with its output in run_dir/{stdout,stderr}.txt; returns its peak RSS,
    wall time and stdout. Exits naming the run and showing the stderr tail if it fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = run_dir / "stdout.txt", run_dir / "stderr.txt"
    t = time.perf_counter()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        # wait4 (not Popen.wait) returns the child's own rusage: ru_maxrss is its peak RSS (KiB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(err_path.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"error: bench run {name} failed (exit status {proc.returncode})\n"
                         f"command: {' '.join(argv)}\n--- last lines of {err_path} ---\n{tail}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_seconds": time.perf_counter() - t,
            "stdout": out_path.read_text()}


def alignkit_argv(task: str, fx: Path, total: int, out: Path, job: dict, compile: bool,
                  gradient_checkpointing: bool = False) -> list[str]:
    """The alignkit command mirroring the TRL peer's settings for `task`."""
    model = ["--model", str(fx / "model"), "--max-steps", str(total)]
    common = ["--no-progress", "--log-every", "1", "--output", str(out), "--compile" if compile else "--no-compile",
              *(["--gradient-checkpointing"] if gradient_checkpointing else [])]
    if task == "grpo":
        per_task = ["--data", str(fx / "prompts.jsonl"), "--batch-size", str(job["prompts"]), "--group-size",
                    str(job["group"]), "--max-new-tokens", str(job["new_tokens"]), "--lr", str(job["lr"]),
                    "--reward", "alignkit.rewards:numeric_match"]
    else:
        per_task = ["--data", str(fx / ("sft.jsonl" if task == "sft" else "pref.jsonl")), "--batch-size",
                    str(job["batch"]), "--max-length", str(job["max_length"]), "--lr", str(job["lr"]),
                    *(["--beta", "0.1"] if task == "dpo" else [])]
    return [sys.executable, "-m", "alignkit.cli", task, *model, *per_task, *common]


KEPT = {"stdout.txt", "stderr.txt", "metrics.jsonl", "config.yaml"}


def drop_weights(run_dir: Path) -> None:
    """Remove what an alignkit run saved besides its logs, metrics and config (model, tokenizer, checkpoints)."""
    for p in run_dir.iterdir():
        if p.name not in KEPT:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def measure_run(task: str, impl: str, steps: list[tuple[float, float]], warmup: int, proc: dict, fm: dict,
                peak: float, job: dict, ref_seconds: float | None = None) -> dict:
    """One run's record: throughput after warm-up, achieved FLOP/s and its fraction of the matmul peak."""
    unit, per_step, sequences = units(task, job)
    extra = 0.0
    if ref_seconds is not None:
        # alignkit's DPO computes reference log-probs for all the run's pairs once, before step 1 (TRL does
        # a reference forward inside each step). Charge the measured steps their share of that pass.
        extra = ref_seconds * (len(steps) - warmup) / len(steps)
    m = throughput(steps, warmup, per_step, extra)
    flops = sum(step_flops(task, tok, fm, sequences) for _, tok in steps[warmup:])
    rec = {"impl": impl, "unit": unit, **m, "flops_per_s": flops / m["seconds"],
           "fraction_of_peak": flops / m["seconds"] / peak, "peak_rss_mb": proc["peak_rss_mb"],
           "wall_seconds": proc["wall_seconds"]}
    if ref_seconds is not None:
        rec["units_per_s_train_only"] = m["units"] / (m["seconds"] - extra)
        rec["ref_seconds_amortised"] = extra
    return rec


def peer_check(python: str | None) -> dict:
    """Versions of trl & co. in the peer interpreter; exits with a hint when it cannot import them."""
    py = python or sys.executable
    code = ("import json, datasets, torch, transformers, trl; print(json.dumps({'trl': trl.__version__, "
            "'transformers': transformers.__version__, 'torch': torch.__version__, 'datasets': datasets.__version__}))")
    try:
        r = subprocess.run([py, "-c", code], capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(f"error: --peer-python {py}: cannot run it ({e})") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        hint = ("pass --peer-python /path/to/venv/bin/python of a virtualenv with trl and datasets installed"
                if python is None else "install trl and datasets in that interpreter's environment")
        raise SystemExit(f"error: --peer trl: {py} cannot import trl/datasets ({last}); {hint}")
    return {"python": py, **json.loads(r.stdout.strip().splitlines()[-1])}


def check_fixture_shape(fx: Path, shape: str) -> None:
    """A fixture built for another --shape is a user error (its numbers would be read as this shape's)."""
    from transformers import AutoConfig

    from alignkit.bench.fixture import SHAPES

    got = AutoConfig.from_pretrained(fx / "model")
    want = {"hidden_size": 256, "num_hidden_layers": 4, "vocab_size": None} if shape == "tiny" else SHAPES[shape][1]
    wrong = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size")
             if want[k] is not None and getattr(got, k) != want[k]]
    if wrong:
        raise SystemExit(f"error: --fixture {fx}: its model is not the {shape} shape ({', '.join(f'{k} {getattr(got, k)}' for k in wrong)}); "
                         "pass another --fixture directory or the matching --shape")


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform()}


# ---------------------------------------------------------------------------------------------------
# Report


def median_record(records: list[dict]) -> dict:
    keys = ["units_per_s", "tokens_per_s", "flops_per_s", "fraction_of_peak", "peak_rss_mb", "units_per_s_train_only"]
    return {k: statistics.median(r[k] for r in records) for k in keys if k in records[0]}


def table(results: dict) -> str:
    """The human-readable table: one line per task and implementation."""
    head = ["task", "impl", "unit/s", "median", "repeats", "peak RSS MB", "GFLOP/s", "% peak", "alignkit/TRL"]
    rows = [head]
    for task, res in results.items():
        for impl in ("alignkit", "trl"):
            if impl not in res:
                continue
            med, reps = res[impl]["median"], res[impl]["repeats"]
            ratio = f"{res['ratio']['units_per_s']:.2f}x" if impl == "alignkit" and "ratio" in res else ""
            rows.append([task, impl, f"{reps[0]['unit']}/s", f"{med['units_per_s']:.1f}",
                         ", ".join(f"{r['units_per_s']:.1f}" for r in reps), f"{med['peak_rss_mb']:.0f}",
                         f"{med['flops_per_s'] / 1e9:.2f}", f"{100 * med['fraction_of_peak']:.1f}", ratio])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(cfg: BenchConfig) -> dict:
    """Build the fixture if needed, measure the matmul peak, run every task (alternating alignkit and the
    peer), print the table and write OUTPUT/bench.json and OUTPUT/bench.txt."""
    from alignkit.config import to_dict

    jobs = jobs_of(cfg.shape)
    for t in ("sft", "dpo"):
        size = getattr(cfg, f"{t}_batch_size")
        if size is not None and size < 1:
            raise SystemExit(f"error: --{t}-batch-size must be >= 1, got {size}")
        jobs = {**jobs, t: {**jobs[t], "batch": size or jobs[t]["batch"]}}
    counts = {t: (getattr(cfg, f"{t}_warmup") or jobs[t]["steps"][0], getattr(cfg, f"{t}_steps") or jobs[t]["steps"][1])
              for t in cfg.tasks}
    for t, (w, s) in counts.items():
        if w < 1 or s < 1:
            raise SystemExit(f"error: --{t}-warmup and --{t}-steps must be >= 1 (got {w} and {s}): the first step "
                             "carries one-off costs and the measurement starts at the end of a warm-up step")
    if cfg.repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1, got {cfg.repeats}")
    peer = peer_check(cfg.peer_python) if cfg.peer == "trl" else None
    default_fixture = "runs/bench-fixture" + ("" if cfg.shape == "tiny" else f"-{cfg.shape}")
    fx, out = Path(cfg.fixture or default_fixture).resolve(), Path(cfg.output).resolve()
    if not (fx / "model").is_dir():
        from alignkit.bench.fixture import make_fixture, make_shaped

        print(f"building the benchmark fixture ({cfg.shape}) in {fx}", flush=True)
        make_fixture(fx) if cfg.shape == "tiny" else make_shaped(fx, cfg.shape)
    else:
        check_fixture_shape(fx, cfg.shape)
    out.mkdir(parents=True, exist_ok=True)

    peak = matmul_peak(cfg.matmul_size)
    print(f"fp32 matmul peak ({cfg.matmul_size}x{cfg.matmul_size}, {peak['threads']} threads): "
          f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    fm = flop_model(fx / "model")
    peer_script = Path(__file__).with_name("trl_peer.py")

    def one(task: str, impl: str, r: int) -> dict:
        warmup, steps = counts[task]
        name = f"{task}/{impl} repeat {r + 1}"
        run_dir = out / "runs" / f"{task}-{impl}-{r + 1}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a stale metrics.jsonl must not be read as this run's
        if impl == "alignkit":
            argv = alignkit_argv(task, fx, warmup + steps, run_dir, jobs[task], cfg.compile, cfg.gradient_checkpointing)
            proc = run_process(name, argv, run_dir)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            step_rows = alignkit_steps(rows)
            ref = next((row["ref_seconds"] for row in rows if row.get("final")), 0.0) if task == "dpo" else None
            if not cfg.keep_weights:
                drop_weights(run_dir)
        else:
            job = {**jobs[task], "gradient_checkpointing": cfg.gradient_checkpointing}
            argv = [peer["python"], str(peer_script), task, str(fx), str(warmup + steps), str(run_dir), json.dumps(job)]
            proc = run_process(name, argv, run_dir)
            lines = [line for line in proc["stdout"].splitlines() if line.startswith('{"task"')]
            if not lines:
                raise SystemExit(f"error: bench run {name}: no result line on stdout (see {run_dir / 'stdout.txt'})")
            step_rows, ref = peer_steps(json.loads(lines[-1])), None
        if len(step_rows) != warmup + steps:
            raise SystemExit(f"error: bench run {name}: expected {warmup + steps} logged steps, got {len(step_rows)} "
                             f"(see {run_dir})")
        rec = {"run": str(run_dir), **measure_run(task, impl, step_rows, warmup, proc, fm, peak["flops_per_s"], jobs[task],
                                                   ref)}
        print(f"{name}: {rec['units_per_s']:.1f} {rec['unit']}/s, peak RSS {rec['peak_rss_mb']:.0f} MB, "
              f"{rec['wall_seconds']:.0f} s", flush=True)
        return rec

    impls = ["alignkit"] + (["trl"] if peer else [])
    results = {}
    for task in cfg.tasks:
        runs = {impl: [] for impl in impls}
        for r in range(cfg.repeats):
            # Alternate which implementation goes first, so a drift in machine load does not favour one.
            for impl in impls if r % 2 == 0 else impls[::-1]:
                runs[impl].append(one(task, impl, r))
        results[task] = {impl: {"repeats": recs, "median": median_record(recs)} for impl, recs in runs.items()}
        if peer:
            pairs = list(zip(runs["alignkit"], runs["trl"]))  # same repeat index: run back to back
            results[task]["ratio"] = {k: statistics.median(a[k] / t[k] for a, t in pairs)
                                      for k in ("units_per_s", "peak_rss_mb", "flops_per_s")}

    text = table(results)
    print("\n" + text, flush=True)
    report = {"machine": machine_info(), "matmul_peak": peak, "flop_model": fm, "peer": peer,
              "config": to_dict(cfg), "fixture": str(fx), "results": results}
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.txt").write_text(text + "\n")
    print(f"\nwrote {out / 'bench.json'}", flush=True)
    return report
