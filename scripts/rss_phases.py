"""Peak RSS of an alignkit command in each phase of its run: load, sharding, each step's forward, backward
and optimizer step, the checkpoints and the final save.

Usage: python scripts/rss_phases.py COMMAND ARGS...        (e.g. sft --model M --data D ... [--fsdp])
       torchrun --standalone --nproc-per-node 2 scripts/rss_phases.py sft ... --fsdp

Samples this process's /proc/self/status every 10 ms under a label that hooks move on (module forward
hooks on the causal LM, optimizer step hooks, wrappers around sharding, checkpointing and Run.finish), and
prints "[rank R] label:peak_MB ..." on exit. docs/performance.md's FSDP phase table comes from it.
"""

import atexit
import os
import sys
import threading
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import alignkit.train.checkpoint as checkpoint
import alignkit.train.parallel as parallel
import alignkit.train.run as run_module

label = ["load"]
peaks: dict[str, float] = {}  # label -> peak MB, in the order the labels first appeared
step = [0]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def sample() -> None:
    while True:
        key = label[0]
        peaks[key] = max(peaks.get(key, 0.0), rss_mb())
        time.sleep(0.01)


def labelled(fn, before: str, after: str | None = None):
    """`fn` run under label `before` (appended to the current one if it starts with '+'), then `after`."""
    def wrapper(*args, **kwargs):
        label[0] = label[0] + before[1:] if before.startswith("+") else before
        try:
            return fn(*args, **kwargs)
        finally:
            if after:
                label[0] = after
    return wrapper


def is_causal_lm(module) -> bool:
    return type(module).__name__.endswith("ForCausalLM")


def main() -> int:
    threading.Thread(target=sample, daemon=True).start()
    parallel.wrap = labelled(parallel.wrap, "shard", "after-shard")
    checkpoint.save_sharded_checkpoint = labelled(checkpoint.save_sharded_checkpoint, "+-checkpoint")
    checkpoint.save_checkpoint = labelled(checkpoint.save_checkpoint, "+-checkpoint")
    run_module.Run.finish = labelled(run_module.Run.finish, "final-save")
    torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: label.__setitem__(0, f"s{step[0]}-forward") if is_causal_lm(m) else None)
    torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: label.__setitem__(0, f"s{step[0]}-backward") if is_causal_lm(m) else None)
    register_optimizer_step_pre_hook(lambda o, a, k: label.__setitem__(0, f"s{step[0]}-optimizer"))

    def after_step(o, a, k):
        step[0] += 1
        label[0] = f"s{step[0]}-between"
    register_optimizer_step_post_hook(after_step)

    def report():
        rank = os.environ.get("RANK", "0")
        print(f"[rank {rank}] " + "  ".join(f"{k}:{v:.0f}" for k, v in peaks.items()), file=sys.stderr, flush=True)
    atexit.register(report)
    from alignkit.cli import main as cli
    rc = cli(sys.argv[1:])
    report()
    os._exit(rc or 0)  # skip atexit: reported once


if __name__ == "__main__":
    sys.exit(main())
