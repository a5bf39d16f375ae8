"""CLI smoke runs with the effect asserted: loss falls, outputs load with from_pretrained."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.cli import run as cli
from helpers import read_metrics


def losses(out):
    return [r["loss"] for r in read_metrics(out) if not r.get("final")]


def test_pretrain_loss_falls_and_saves_hf_model(tiny_model, assets, tmp_path):
    out = tmp_path / "pt"
    cli(["pretrain", "--model", str(tiny_model), "--data", str(assets / "corpus.jsonl"), "--output", str(out),
         "--max-steps", "40", "--batch-size", "8", "--max-length", "64", "--lr", "3e-3", "--no-progress"])
    ls = losses(out)
    assert len(ls) == 40
    assert sum(ls[-5:]) / 5 < 0.6 * ls[0], ls  # random init starts near ln(V) = 6.2
    rows = read_metrics(out)
    assert {"step", "loss", "lr", "tokens_per_s"} <= rows[0].keys()
    assert rows[-1]["final"] is True and rows[-1]["tokens"] == 40 * 8 * 64 and rows[-1]["seconds"] > 0
    # Output is a normal HF directory; the saved weights are the trained ones.
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Ada Brook lives in", return_tensors="pt").input_ids
    ckpt = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-00000040")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ckpt(ids).logits)
    assert (out / "config.yaml").is_file()


def test_wsd_midtraining_mixes_second_source_in_decay(tiny_model, assets, tmp_path):
    mid = tmp_path / "mid.jsonl"
    mid.write_text("".join(json.dumps({"text": f"Note {i}: the quick brown fox."}) + "\n" for i in range(200)))
    out = tmp_path / "wsd"
    cli(["pretrain", "--model", str(tiny_model), "--data", str(assets / "corpus.jsonl"), "--output", str(out),
         "--max-steps", "10", "--batch-size", "4", "--max-length", "32", "--schedule", "wsd",
         "--decay-fraction", "0.3", "--mid-data", str(mid), "--mid-ratio", "0.5", "--warmup-steps", "2",
         "--no-progress"])
    rows = [r for r in read_metrics(out) if not r.get("final")]
    assert [r["mid_fraction"] for r in rows] == [0.0] * 7 + [0.5] * 3
    lrs = [r["lr"] for r in rows]
    assert lrs[2] == lrs[6] == pytest.approx(1e-3)  # stable stage at the default peak
    assert lrs[7] > lrs[8] > lrs[9]  # linear decay


def test_mid_data_requires_wsd(tiny_model, assets, tmp_path):
    with pytest.raises(SystemExit, match="--schedule wsd"):
        cli(["pretrain", "--model", str(tiny_model), "--data", str(assets / "corpus.jsonl"),
             "--mid-data", str(assets / "corpus.jsonl"), "--output", str(tmp_path / "x")])


def test_sft_loss_falls_and_generate_runs(tiny_model, assets, tmp_path):
    out = tmp_path / "sft"
    cli(["sft", "--model", str(tiny_model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
         "--max-steps", "80", "--batch-size", "8", "--max-length", "64", "--lr", "3e-3", "--no-progress"])
    ls = losses(out)
    assert sum(ls[-5:]) / 5 < 0.5 * ls[0], ls  # from a random init, on assistant tokens only
    final = read_metrics(out)[-1]
    assert final["final"] and final["tokens"] > 0 and final["dropped"] == 0
    rows = cli(["generate", "--model", str(out), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "8"])
    assert len(rows) == 1 and isinstance(rows[0]["completion"], str)


def test_missing_model_dir_is_a_clear_error(assets, tmp_path):
    with pytest.raises((SystemExit, OSError)) as e:
        cli(["sft", "--model", str(tmp_path / "nope"), "--data", str(assets / "instructions.jsonl"),
             "--output", str(tmp_path / "o")])
    assert "nope" in str(e.value)
