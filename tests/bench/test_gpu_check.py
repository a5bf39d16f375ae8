"""scripts/gpu_check.sh on a machine without CUDA, and the plan it would run on one (the GPU runs themselves
cannot run here)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.bench import gpu_check
from alignkit.cli import COMMANDS
from alignkit.config import TrainConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env={**os.environ, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "gpu_check: needs a CUDA GPU" in res.stdout
    assert not (tmp_path / "out").exists()  # nothing built or run
    direct = subprocess.run([sys.executable, "-m", "alignkit.bench.gpu_check"], capture_output=True, text=True,
                            timeout=120)
    assert direct.returncode == 0 and gpu_check.NO_GPU in direct.stdout


def test_plan_covers_every_training_command(tmp_path):
    training = {name for name, (module, cls, _, _) in COMMANDS.items()
                if issubclass(getattr(importlib.import_module(module), cls), TrainConfig)}
    plan = gpu_check.runs(tmp_path / "fx", tmp_path / "runs", n_gpus=2, has_vllm=True)
    labels = [label for label, _, _ in plan]
    assert training == {label for label, procs, _ in plan if procs == 1 and " " not in label}
    assert {"sft ddp x2", "grpo ddp x2", "sft fsdp x2", "dpo fsdp x2", "grpo fsdp x2", "ppo fsdp x2", "grpo vllm",
            "sft +grad-ckpt"} <= set(labels)
    assert all("--autocast" in argv and argv[argv.index("--device") + 1] == "cuda" for _, _, argv in plan)
    assert labels.index("reward") < labels.index("ppo")  # ppo scores with the reward run's model
    one_gpu = [label for label, _, _ in gpu_check.runs(tmp_path / "fx", tmp_path / "runs", n_gpus=1, has_vllm=False)]
    assert not any("ddp" in label or "vllm" in label for label in one_gpu) and "sft fsdp x1" in one_gpu


def test_peak_table_and_mfu():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert gpu_check.peak_tflops("Tesla T4") is None
    rows = [{"run": "dpo", "ok": True, "gpus": 1, "seconds": 10.0, "tokens_per_s": 1e4, "peak_gib": 3.0},
            {"run": "sft fsdp x2", "ok": False, "gpus": 2, "seconds": 5.0, "tokens_per_s": None, "peak_gib": None}]
    out = gpu_check.table(rows, n_params=100_000_000, peak=989.0)
    assert "FAIL" in out and "pass" in out
    assert f"{100 * 1e4 * 8 * 1e8 / 989e12:6.1f}%" in out  # DPO counts the reference forward: 8N per token
