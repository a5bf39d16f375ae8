"""Reliability of one --output: a second run on it is refused while the first runs, and under DDP a
signal to one process stops every process at the same step with one checkpoint and exit status 0."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import children, kill_all, one_multiprocess_run, read_metrics, run_cli, torchrun_cmd

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sft_args(model, assets, out, *extra):
    return ["sft", "--model", str(model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
            "--max-length", "64", "--batch-size", "4", "--lr", "3e-3", "--no-progress", "--log-every", "1", *extra]


def wait_for_rows(out, proc, rows=1, timeout=180):
    t = time.time()
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < rows:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t < timeout, "timed out waiting for metrics rows"
        time.sleep(0.05)


def steps(out):
    return [r["step"] for r in read_metrics(out) if not r.get("final")]


def test_a_second_run_on_a_busy_output_is_refused(tiny_model, assets, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *sft_args(tiny_model, assets, out, "--max-steps",
                                                                               "100000")],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(out, first)
        for flag in ("--resume", "--overwrite"):  # neither may take over an output that is in use
            second = run_cli(*sft_args(tiny_model, assets, out, "--max-steps", "3"), flag, timeout=300)
            assert second.returncode == 1, second.stderr[-3000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "in use by another alignkit run" in lines[0] and str(out) in lines[0]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and "continue with --resume" in err
    logged = steps(out)
    assert logged == list(range(1, len(logged) + 1))  # one run's rows, none interleaved
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{len(logged):08d}"]


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of the launcher)."""
    for pid in children(launcher_pid):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def test_signal_to_one_ddp_process_stops_both_at_the_same_step(tiny_model, assets, tmp_path):
    out = tmp_path / "ddp"
    with one_multiprocess_run():
        signal_one_ddp_process(tiny_model, assets, out)


def signal_one_ddp_process(tiny_model, assets, out):
    launcher = subprocess.Popen([*torchrun_cmd(), "-m", "alignkit.cli", *sft_args(tiny_model, assets, out,
                                                                                  "--max-steps", "100000")],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        wait_for_rows(out, launcher, rows=2)
        workers = [worker_pid(launcher.pid, rank) for rank in (0, 1)]
        assert None not in workers
        os.kill(workers[1], signal.SIGTERM)  # only the second process sees the signal
        _, err = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:  # hung: the workers run in their own process groups
            kill_all([pid for pid in [*workers, launcher.pid] if pid], signal.SIGKILL)
    assert launcher.returncode == 0, err[-3000:]
    logged = steps(out)
    stops = re.findall(r"stopped at step (\d+); continue with --resume", err)
    assert stops == [str(logged[-1])] * 2  # both processes stopped, at the step that was checkpointed
    assert logged == list(range(1, len(logged) + 1))
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{logged[-1]:08d}"]
    assert not (out / "model.safetensors").exists()  # stopped, not finished
