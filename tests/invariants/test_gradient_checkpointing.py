"""--gradient-checkpointing (`models.checkpoint_layers`) changes memory, not results: the same loss and
gradients with and without it (also with LoRA, and in eval mode, where the DPO family, KTO and PPO train), the
same CLI loss trajectories; and it does checkpoint (the forward keeps fewer tensors for backward)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from alignkit.cli import run as cli
from alignkit.logprobs import next_token_logps
from alignkit.models import load_causal_lm, load_tokenizer, prepare
from alignkit.train.batching import collate
from helpers import read_metrics, toy_preferences


def sft_loss_and_grads(model, tok):
    seqs = [tok.encode(t) for t in ("Ada has a dog.", "Dana Jessop lives in a small town by the sea.")]
    batch = collate(seqs, [[0, 0] + [1] * (len(s) - 2) for s in seqs], tok.pad_token_id, "cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel()), t)[1], lambda t: t):
        logps, mask = next_token_logps(model, **batch)
        loss = -(logps * mask).sum() / mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.item(), torch.autograd.grad(loss, params), sum(saved)


def lora(model):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("variant", ["train", "eval", "lora"])
def test_same_loss_and_gradients_with_fewer_saved_activations(tiny_model, variant):
    tok = load_tokenizer(tiny_model)
    got = {}
    for on in (False, True):
        torch.manual_seed(0)  # the same LoRA init both times
        model = load_causal_lm(tiny_model)
        model = lora(model) if variant == "lora" else model
        model.train(variant != "eval")
        got[on] = sft_loss_and_grads(prepare(model, SimpleNamespace(gradient_checkpointing=on)), tok)
    (loss_off, grads_off, saved_off), (loss_on, grads_on, saved_on) = got[False], got[True]
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    assert len(grads_on) == len(grads_off) > 0
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert saved_on < 0.7 * saved_off  # the layers' activations are not kept: it did checkpoint


def test_frozen_models_and_no_grad_forwards_are_not_checkpointed(tiny_model, monkeypatch):
    """A frozen reference (nothing to differentiate) and generation (no grad) run the layers as they are."""
    from torch.utils import checkpoint as ckpt

    calls, original = [], ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    tok = load_tokenizer(tiny_model)
    model = prepare(load_causal_lm(tiny_model).requires_grad_(False), SimpleNamespace(gradient_checkpointing=True))
    ids = torch.tensor([tok.encode("Ada has a dog.")])
    model(input_ids=ids, use_cache=False)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not calls
    model.requires_grad_(True)
    model(input_ids=ids, use_cache=False)
    assert len(calls) == model.config.num_hidden_layers


def sixteen_sft(assets, path):
    rows = [json.loads(line) for line in (assets / "instructions.jsonl").read_text().splitlines()][:16]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_cli_loss_trajectory_is_the_same_with_gradient_checkpointing(command, tiny_model, assets, tmp_path):
    data = sixteen_sft(assets, tmp_path / "d.jsonl") if command == "sft" else \
        toy_preferences(assets, tmp_path / "d.jsonl", rows=slice(0, 16))
    got = {}
    for flag in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        out = tmp_path / flag
        cli([command, "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--batch-size", "4",
             "--max-steps", "3", "--max-length", "256", "--no-progress", "--lr", "1e-3", flag])
        got[flag] = [(r["loss"], r["grad_norm"]) for r in read_metrics(out) if not r.get("final")]
        recorded = yaml.safe_load((out / "config.yaml").read_text())["gradient_checkpointing"]
        assert recorded == (flag == "--gradient-checkpointing")
    on, off = got["--gradient-checkpointing"], got["--no-gradient-checkpointing"]
    assert len(on) == len(off) == 3
    for (loss_on, norm_on), (loss_off, norm_off) in zip(on, off):
        assert loss_on == pytest.approx(loss_off, abs=1e-6, rel=1e-6)
        assert norm_on == pytest.approx(norm_off, abs=1e-5, rel=1e-5)
