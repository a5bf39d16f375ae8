"""Invariants of --fsdp (FSDP2): 2 processes on CPU (gloo) follow the loss trajectory of 1 process with
--grad-accum 2 and end at its weights (sft, pretrain, dpo, kto, reward, distill, grpo, LoRA SFT and GRPO; with
--grad-accum 2 each, 1 process with 4), and ppo's that of 2 DDP processes; process 1 builds the model on the
meta device and gets its shards from process 0; a resumed sharded run equals an uninterrupted one; the saved
model is a consolidated save_pretrained directory."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import (make_reward_model, one_multiprocess_run, read_metrics, run_cli, run_torchrun, toy_preferences,
                     torchrun_cmd)

TIMING = ("elapsed", "seconds")


def trajectory(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING and not k.endswith("_per_s")}
            for r in read_metrics(out) if not r.get("final")]


def losses(out) -> list[float]:
    return [r["loss"] for r in trajectory(out)]


def weights(out) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("*.safetensors"))
    assert files, f"no weights in {out}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    r = run_torchrun(*args, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def data(tiny_model, assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}]} for i in range(8)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rw.py").write_text("def low_ids(prompts, completions, completion_ids, **kw):\n"
                                "    return [sum(t < 128 for t in ids) / max(1, len(ids)) for ids in completion_ids]\n")
    return {"sft": assets / "instructions.jsonl", "corpus": assets / "corpus.jsonl",
            "pairs": toy_preferences(assets, root / "pairs.jsonl", slice(0, 32)), "prompts": root / "prompts.jsonl",
            "reward": f"{root / 'rw.py'}:low_ids", "rm": make_reward_model(tiny_model, root / "rm"),
            "teacher": lambda: teacher(tiny_model, assets, root)}


def teacher(tiny_model, assets, root):
    """A distillation teacher: the tiny model after a little SFT (built on first use)."""
    out = root / "teacher"
    if not (out / "config.json").is_file():
        r = run_cli("sft", "--model", str(tiny_model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
                    "--max-steps", "20", "--batch-size", "8", "--max-length", "64", "--lr", "3e-3", "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def args_for(kind, model, data) -> list[str]:
    common = ["--model", str(model), "--max-length", "64", "--no-progress", "--max-steps", "3"]
    if kind == "sft":
        return ["sft", "--data", str(data["sft"]), *common, "--lr", "3e-3", "--batch-size", "4", "--no-group-by-length"]
    if kind in ("lora", "grpo-lora"):  # LoRA SFT, LoRA GRPO
        return [*args_for("sft" if kind == "lora" else "grpo", model, data), "--lora-r", "4", "--lr", "1e-2"]
    if kind == "dpo":
        return ["dpo", "--data", str(data["pairs"]), *common, "--lr", "3e-3", "--batch-size", "2", "--no-group-by-length"]
    if kind in ("reward", "kto"):  # kto splits each pair into a desirable and an undesirable example
        return [kind, "--data", str(data["pairs"]), *common, "--lr", "3e-3",
                "--batch-size", "2" if kind == "reward" else "4", "--no-group-by-length"]
    if kind == "distill":  # off-policy (the default --on-policy-fraction 0): process 1 builds the student on meta
        return ["distill", "--data", str(data["sft"]), "--teacher", str(data["teacher"]()), *common, "--lr", "3e-3",
                "--batch-size", "4", "--no-group-by-length"]
    if kind == "pretrain":
        return ["pretrain", "--data", str(data["corpus"]), *common, "--lr", "3e-3", "--batch-size", "4"]
    if kind == "grpo":
        return ["grpo", "--data", str(data["prompts"]), *common, "--reward", data["reward"], "--batch-size", "2",
                "--group-size", "4", "--max-new-tokens", "8", "--lr", "1e-2", "--mini-batch-size", "8"]
    if kind == "ppo":
        return ["ppo", "--data", str(data["prompts"]), *common, "--reward-model", str(data["rm"]), "--batch-size", "2",
                "--group-size", "2", "--max-new-tokens", "4", "--mini-batch-size", "2", "--ppo-epochs", "2",
                "--lr", "3e-3", "--kl-coef", "0.01"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["sft", "lora", "reward", *(
    pytest.param(k, marks=pytest.mark.slow) for k in ("dpo", "kto", "pretrain", "distill", "grpo", "grpo-lora"))])
def test_two_process_fsdp_matches_one_process(tiny_model, data, tmp_path, kind):
    """1 process with --grad-accum 2 (no sharding) and 2 FSDP processes: same losses, same saved weights
    (the consolidated model, or a LoRA run's adapter directory)."""
    args = args_for(kind, tiny_model, data)
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_cli(*args, "--grad-accum", "2", "--output", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun(*args, "--fsdp", "--output", str(two))
    a, b = losses(one), losses(two)
    assert len(a) == 3 and a == pytest.approx(b, abs=1e-5)
    assert_same_weights(weights(one), weights(two), atol=1e-5)
    if kind.startswith("grpo"):
        ra, rb = [x["reward_mean"] for x in trajectory(one)], [x["reward_mean"] for x in trajectory(two)]
        assert ra == pytest.approx(rb, abs=1e-6)  # the generation copy sampled what the unsharded policy did
        assert ra[0] != ra[-1]  # the policy moved between rollouts, so equal rewards mean it was refreshed
    if kind.endswith("lora"):
        assert (two / "adapter_config.json").is_file() and not (two / "config.json").exists()
    else:
        auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
        trained = auto.from_pretrained(two).state_dict()
        start = auto.from_pretrained(tiny_model).state_dict()
        saved = {k.split(":", 1)[1]: v for k, v in weights(one).items()}
        assert all(torch.allclose(trained[k], saved[k], atol=1e-5) for k in saved)
        # it trained (a reward model's score head is new, so it moved from any start)
        assert any(not torch.allclose(trained[k], start[k], atol=1e-4) for k in saved if not k.startswith("score."))


@pytest.mark.parametrize("kind", ["causal", *(pytest.param(k, marks=pytest.mark.slow) for k in ("lora", "reward"))])
def test_only_process_0_reads_the_weights(tiny_model, tmp_path, kind):
    """Under --fsdp on 2 processes the trained model's weights are read by process 0 alone: process 1 builds
    it on the meta device and gets its shards, and its buffers, from process 0 (fsdp_meta_worker.py)."""
    worker = Path(__file__).with_name("fsdp_meta_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with one_multiprocess_run():
        r = subprocess.run([*torchrun_cmd(2), str(worker), str(tiny_model), kind, str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 ok" in r.stdout and "rank 1 ok" in r.stdout


def test_fsdp_grad_accum_matches_one_process(tiny_model, data, tmp_path):
    """2 FSDP processes with --grad-accum 2 (the first micro-batch under set_requires_gradient_sync(False), its
    unsharded gradients kept for the second's reduce-scatter) follow 1 process with --grad-accum 4."""
    args = args_for("sft", tiny_model, data)
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_cli(*args, "--grad-accum", "4", "--output", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun(*args, "--fsdp", "--grad-accum", "2", "--output", str(two))
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    assert_same_weights(weights(one), weights(two), atol=1e-5)


@pytest.mark.parametrize("value", ["model", *(pytest.param(v, marks=pytest.mark.slow) for v in ("head", "lora"))])
def test_two_process_fsdp_ppo_matches_ddp(tiny_model, data, tmp_path, value):
    """ppo samples per process with its own seed and whitens per process, so its single-process twin is not
    --grad-accum 2 but the same 2 processes under DDP: same metrics rows, same policy and value function."""
    args = [*args_for("ppo", tiny_model, data), *{"head": ["--value-head"], "lora": ["--lora-r", "4"]}.get(value, [])]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun(*args, "--output", str(ddp))
    torchrun(*args, "--fsdp", "--output", str(fsdp))
    a, b = trajectory(ddp), trajectory(fsdp)
    assert len(a) == 3 and a[0]["approx_kl_per_update"][0] == 0.0
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), ra["step"]
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), (ra["step"], k)
    assert a[0]["reward_mean"] != a[-1]["reward_mean"]  # the policy moved, and the generation copy followed it
    assert_same_weights(weights(ddp), weights(fsdp), atol=1e-5)
    value_dir = "" if value == "head" else "value_model"
    assert_same_weights(weights(ddp / value_dir), weights(fsdp / value_dir), atol=1e-5)
    if value != "lora":  # a LoRA run saves its adapters (compared above), not a model to load
        start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
        trained = AutoModelForCausalLM.from_pretrained(fsdp).state_dict()
        assert any(not torch.allclose(trained[k], start[k], atol=1e-4) for k in start)


@pytest.mark.parametrize("kind", ["sft", pytest.param("ppo", marks=pytest.mark.slow)])
def test_fsdp_resume_matches_uninterrupted(tiny_model, data, tmp_path, kind):
    """A 2-process FSDP run resumed from its sharded step-2 checkpoint ends as the uninterrupted run:
    every metrics row and the final weights (ppo: its value function too, and its adaptive KL state)."""
    args = [*args_for(kind, tiny_model, data), "--max-steps", "4", "--save-every", "2", "--fsdp",
            *(["--target-kl", "0.01"] if kind == "ppo" else [])]
    out = tmp_path / "run"
    torchrun(*args, "--output", str(out))
    ref_rows, ref_weights = trajectory(out), weights(out)
    ckpt = out / "checkpoints" / "step-00000002"
    assert (ckpt / "dcp").is_dir() and (ckpt / "model.safetensors").is_file()
    if kind == "ppo":
        assert (ckpt / "value" / "model.safetensors").is_file()
        ref_value = weights(out / "value_model")
        shutil.rmtree(out / "value_model")
    # The state a SIGKILL during step 4 leaves: checkpoint 2, rows up to step 3, no final weights.
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(out)
                                               if not r.get("final") and r["step"] <= 3))
    at_two = weights(ckpt)
    torchrun(*args, "--output", str(out), "--resume")
    rows = trajectory(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for ra, rb in zip(rows, ref_rows):
        assert ra.keys() == rb.keys() and all(ra[k] == pytest.approx(rb[k], abs=1e-6) for k in ra), ra["step"]
    assert_same_weights(weights(out), ref_weights, atol=1e-6)
    assert any(not torch.allclose(at_two[k], ref_weights[k], atol=1e-4) for k in at_two)  # steps 3-4 moved them
    if kind == "ppo":
        assert_same_weights(weights(out / "value_model"), ref_value, atol=1e-6)
        assert len({r["kl_coef"] for r in rows}) > 1  # the adaptive coefficient moved, and resumed where it was


def test_one_process_fsdp_mesh_and_merged_lora(tiny_model, data, tmp_path):
    """--fsdp without torchrun trains on a 1-process mesh, like the unsharded run; --merge-lora writes the
    merged full weights from the sharded adapters."""
    args = [*args_for("lora", tiny_model, data), "--merge-lora"]
    r = run_cli(*args, "--output", str(tmp_path / "plain"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(*args, "--fsdp", "--output", str(tmp_path / "fsdp"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "fsdp"), abs=1e-5)
    assert not (tmp_path / "fsdp" / "adapter_config.json").exists()
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "fsdp"), atol=1e-5)
