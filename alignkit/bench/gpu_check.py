"""The GPU check behind scripts/gpu_check.sh: every training command for a few steps on a real-shaped random model
(`alignkit.bench.fixture.make_shaped`, default qwen2.5-0.5b) in bf16 autocast on CUDA: each on one GPU, SFT with
--gradient-checkpointing, SFT and GRPO under DDP (when more than one GPU is visible), SFT, DPO and GRPO under
--fsdp over all visible GPUs, and GRPO with --rollout-engine vllm when vllm is importable. Prints a table (pass/fail,
tokens/s, MFU, peak GPU memory) and exits 1 if any run failed.

Each run is a subprocess (`python -m alignkit.bench.gpu_check child MEMFILE -- COMMAND ARGS...`, under torchrun for
the multi-GPU runs) that runs the command in-process and then writes its rank's
`torch.cuda.max_memory_allocated()` (memory held through torch's allocator: weights, optimizer, activations,
and vLLM's KV cache, which vLLM allocates through torch) next to the run. tokens/s is the last step's
`tokens_per_s` in the run's metrics.jsonl (all processes together).

MFU = achieved FLOP/s / (GPUs x the GPU's dense bf16 peak), with the training FLOPs per token estimated as
6N (forward + backward; N = the model's parameters without the input embedding), 8N where a frozen model of the
same size runs a forward too (DPO, KTO: the reference; distill: the teacher). Rollout generation FLOPs (PPO,
GRPO) and the attention term are not counted, so those MFU figures are lower bounds.

Time: designed for < 8 minutes on one H100. Estimated, not measured (no GPU was at hand when it was written):
about 20 s per run (interpreter + CUDA start-up ~8 s, loading a 0.5B model ~3 s, 4 steps of at most 2 x 512
tokens ~3 s, saving ~2 GB of fp32 weights ~5 s) x 12 runs on one GPU, plus ~60 s to build the fixture and ~60 s
for vLLM's start-up (weights load + CUDA graph capture): about 6 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity), by a substring of the device name.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("A10G", 125.0), ("RTX 4090", 165.0))
NO_GPU = "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False on this machine); nothing to check."
STEPS = 4


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a device named `name`, or None when it is not in PEAK_TFLOPS."""
    return next((v for key, v in PEAK_TFLOPS if key.lower() in name.lower()), None)


def flops_per_token(command: str, n_params: int) -> float:
    return (8 if command in ("dpo", "kto", "distill") else 6) * n_params


def write_text_data(fixture: Path) -> Path:
    """text.jsonl for pretrain: the SFT conversations as plain text."""
    path = fixture / "text.jsonl"
    rows = [json.loads(line) for line in (fixture / "sft.jsonl").read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps({"text": "\n".join(m["content"] for m in r["messages"])}) + "\n" for r in rows))
    return path


def runs(fx: Path, out: Path, n_gpus: int, has_vllm: bool) -> list[tuple[str, int, list[str]]]:
    """(label, processes, alignkit argv) of every run; a ppo run's reward model is the reward run's output."""
    model = str(fx / "model")
    common = ["--model", model, "--device", "cuda", "--autocast", "bf16", "--max-steps", str(STEPS),
              "--warmup-steps", "0", "--no-progress", "--overwrite"]
    args = {
        "pretrain": ["--data", str(fx / "text.jsonl"), "--batch-size", "2", "--max-length", "512"],
        "sft": ["--data", str(fx / "sft.jsonl"), "--batch-size", "2", "--max-length", "512"],
        "reward": ["--data", str(fx / "pref.jsonl"), "--batch-size", "2", "--max-length", "512"],
        "dpo": ["--data", str(fx / "pref.jsonl"), "--batch-size", "2", "--max-length", "512"],
        "kto": ["--data", str(fx / "pref.jsonl"), "--batch-size", "2", "--max-length", "512"],
        "distill": ["--data", str(fx / "sft.jsonl"), "--teacher", model, "--batch-size", "2", "--max-length", "512"],
        "ppo": ["--data", str(fx / "prompts.jsonl"), "--reward-model", str(out / "reward"), "--batch-size", "2",
                "--group-size", "2", "--max-new-tokens", "32", "--max-length", "256", "--ppo-epochs", "1"],
        "grpo": ["--data", str(fx / "prompts.jsonl"), "--reward", "alignkit.rewards:numeric_match", "--batch-size", "1",
                 "--group-size", "4", "--max-new-tokens", "32", "--max-length", "256"],
    }
    plan = [(cmd, 1, [cmd, *common, *a, "--output", str(out / cmd)]) for cmd, a in args.items()]
    plan.append(("sft +grad-ckpt", 1, ["sft", *common, *args["sft"], "--gradient-checkpointing",
                                       "--output", str(out / "sft-ckpt")]))
    if n_gpus > 1:
        plan += [(f"{cmd} ddp x{n_gpus}", n_gpus, [cmd, *common, *args[cmd], "--output", str(out / f"{cmd}-ddp")])
                 for cmd in ("sft", "grpo")]
    plan += [(f"{cmd} fsdp x{n_gpus}", n_gpus, [cmd, *common, *args[cmd], "--fsdp", "--output", str(out / f"{cmd}-fsdp")])
             for cmd in ("sft", "dpo", "grpo", "ppo")]
    if has_vllm:
        plan.append(("grpo vllm", 1, ["grpo", *common, *args["grpo"], "--rollout-engine", "vllm",
                                      "--vllm-gpu-memory-utilization", "0.3", "--tis-cap", "2",
                                      "--output", str(out / "grpo-vllm")]))
    return plan


def last_tokens_per_s(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if not r.get("final") and r.get("tokens_per_s")]
    return rates[-1] if rates else None


def launch(label: str, procs: int, argv: list[str], logs: Path) -> dict:
    """Run one command (torchrun over `procs` GPUs when > 1); its result row."""
    run_dir = Path(argv[argv.index("--output") + 1])
    mem = logs / f"{label.replace(' ', '_')}.mem"
    child = ["-m", "alignkit.bench.gpu_check", "child", str(mem), "--", *argv]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *child]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, *child]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    t0 = time.perf_counter()
    with (logs / f"{label.replace(' ', '_')}.log").open("w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    peaks = [float(p.read_text()) for p in logs.glob(mem.name + ".*")]
    return {"run": label, "ok": rc == 0, "gpus": procs, "seconds": time.perf_counter() - t0,
            "tokens_per_s": last_tokens_per_s(run_dir) if rc == 0 else None,
            "peak_gib": max(peaks) / 2**30 if peaks else None, "log": str(logs / f"{label.replace(' ', '_')}.log")}


def table(rows: list[dict], n_params: int, peak: float | None) -> str:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [f"{'run':<20} {'result':<6} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'s':>6}"]
    for r in rows:
        cmd = r["run"].split()[0]
        mfu = None
        if r["tokens_per_s"] and peak:
            mfu = r["tokens_per_s"] * flops_per_token(cmd, n_params) / (peak * 1e12 * r["gpus"])
        lines.append(f"{r['run']:<20} {'pass' if r['ok'] else 'FAIL':<6} {fmt(r['tokens_per_s'], '10.0f')} "
                     f"{fmt(None if mfu is None else 100 * mfu, '6.1f') + ('%' if mfu is not None else ' ')} "
                     f"{fmt(r['peak_gib'], '9.2f')} {r['seconds']:6.0f}")
    return "\n".join(lines)


def child(mem: str, argv: list[str]) -> int:
    """Run `alignkit ARGV` in this process, then write this rank's peak allocated CUDA memory to MEM.RANK."""
    import torch

    from alignkit.cli import main as alignkit_main

    code = 1
    try:
        code = alignkit_main(argv)
    finally:  # also when the command raised: a failed run's memory is reported too
        if torch.cuda.is_available():
            Path(f"{mem}.{os.environ.get('RANK', '0')}").write_text(str(torch.cuda.max_memory_allocated()))
    return code


def main(argv: list[str]) -> int:
    if argv[:1] == ["child"]:
        return child(argv[1], argv[argv.index("--") + 1:])
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    shape = os.environ.get("GPU_CHECK_SHAPE", "qwen2.5-0.5b")
    out = Path(argv[0] if argv else os.environ.get("GPU_CHECK_OUT", "runs/gpu-check"))
    shutil.rmtree(out / "runs", ignore_errors=True)
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    from alignkit.bench.fixture import make_shaped

    fx = out / "fixture"
    if not (fx / "model" / "config.json").is_file():
        make_shaped(fx, shape)
    write_text_data(fx)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(fx / "model")
    d, L, V, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    n_params = L * (2 * d * d + 2 * d * kv + 3 * d * inter) + V * d  # layers + the LM head (tied or not)
    n_gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name)
    has_vllm = importlib.util.find_spec("vllm") is not None
    print(f"gpu_check: {n_gpus} x {name} (dense bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}), "
          f"shape {shape} ({n_params / 1e6:.0f}M parameters without the input embedding), "
          f"vllm {'found' if has_vllm else 'not installed: its run is skipped'}", flush=True)
    rows = []
    for label, procs, args in runs(fx, out / "runs", n_gpus, has_vllm):
        rows.append(launch(label, procs, args, logs))
        r = rows[-1]
        print(f"  {label}: {'pass' if r['ok'] else 'FAIL (see ' + r['log'] + ')'} in {r['seconds']:.0f} s", flush=True)
    print(table(rows, n_params, peak))
    (out / "gpu_check.json").write_text(json.dumps({"gpu": name, "gpus": n_gpus, "peak_tflops": peak, "shape": shape,
                                                    "params": n_params, "runs": rows}, indent=1))
    failed = [r["run"] for r in rows if not r["ok"]]
    if failed:
        print(f"gpu_check: {len(failed)} of {len(rows)} runs failed: {', '.join(failed)}")
        return 1
    print(f"gpu_check: all {len(rows)} runs passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
