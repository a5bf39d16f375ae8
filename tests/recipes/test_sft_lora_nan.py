"""LoRA on sft/pretrain trains only adapters; a NaN loss stops the run (or is skipped) before the weights are touched."""

import peft  # the optional extra alignkit[peft]; installed by .[dev]
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignkit.cli import run as cli
from alignkit.recipes import sft
from helpers import read_metrics


def test_lora_sft_changes_only_adapters_and_merges(tiny_model, assets, tmp_path):
    base = load_file(str(tiny_model / "model.safetensors"))
    out = tmp_path / "lora"
    cli(["sft", "--model", str(tiny_model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
         "--max-steps", "8", "--batch-size", "8", "--max-length", "64", "--lr", "1e-2", "--lora-r", "4",
         "--no-progress"])
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(out)
    for name, p in model.named_parameters():
        if "lora_" not in name:  # every base weight is bit-identical to the input model's
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), name
    ls = [r["loss"] for r in read_metrics(out) if not r.get("final")]
    assert ls[-1] < ls[0]

    merged = tmp_path / "merged"
    cli(["sft", "--model", str(tiny_model), "--data", str(assets / "instructions.jsonl"), "--output", str(merged),
         "--max-steps", "8", "--batch-size", "8", "--max-length", "64", "--lr", "1e-2", "--lora-r", "4",
         "--merge-lora", "--no-progress"])
    full = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_nan_loss_stops_before_saving(tiny_model, assets, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = sft.next_token_logps

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        logps, mask = real(*args, **kwargs)
        return (logps * float("nan") if calls["n"] == 3 else logps), mask

    monkeypatch.setattr(sft, "next_token_logps", poisoned)
    args = ["sft", "--model", str(tiny_model), "--data", str(assets / "instructions.jsonl"), "--max-steps", "5",
            "--batch-size", "4", "--max-length", "64", "--no-progress"]
    with pytest.raises(SystemExit, match="at step 3"):
        cli([*args, "--output", str(tmp_path / "stop")])
    assert not (tmp_path / "stop" / "model.safetensors").exists()

    calls["n"] = 0
    final = cli([*args, "--output", str(tmp_path / "skip"), "--skip-nonfinite"])
    assert final["skipped_nonfinite_steps"] == 1
    weights = load_file(str(tmp_path / "skip" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
