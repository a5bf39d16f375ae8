"""The speed paths change nothing but speed (docs/performance.md): length-grouped batches, and the
reward model's prompt-grouped batches that score each distinct answer once, give the same loss and
gradient as plain padded batches over the same global batch, padding never changes a
sequence's log-probs, and --compile gives the eager trajectory."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.cli import run as cli
from alignkit.logprobs import completion_logps, next_token_logps, option_logps, pack_completions
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.train.batching import collate
from helpers import ranked_preferences, read_metrics, toy_preferences


def step_rows(out):
    return [r for r in read_metrics(out) if not r.get("final")]


def sixteen_sft(assets, path):
    """16 conversations of varied length: one global batch of 4 micro-batches x 4."""
    rows = [json.loads(line) for line in (assets / "instructions.jsonl").read_text().splitlines()][:16]
    for i, r in enumerate(rows):  # stretch some answers so lengths differ a lot within the batch
        r["messages"][-1]["content"] += " Indeed." * (i % 5) * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_losses(model, data, out, steps: int, *flags: str) -> list[float]:
    """Per-step losses of a short SFT run on `data` with extra command-line `flags`."""
    cli(["sft", "--model", str(model), "--data", str(data), "--output", str(out), "--batch-size", "4",
         "--max-steps", str(steps), "--max-length", "256", "--no-progress", "--lr", "1e-3", *flags])
    return [r["loss"] for r in step_rows(out)]


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_length_grouped_batches_equal_plain_padded_batches(tiny_model, assets, tmp_path, command):
    data = sixteen_sft(assets, tmp_path / "d.jsonl") if command == "sft" else \
        toy_preferences(assets, tmp_path / "d.jsonl", rows=slice(0, 16))
    got = {}
    for grouping in ("--group-by-length", "--no-group-by-length"):
        out = tmp_path / grouping
        cli([command, "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--batch-size", "4",
             "--grad-accum", "4", "--max-steps", "2", "--max-length", "256", "--no-progress", "--lr", "1e-3",
             grouping])
        got[grouping] = step_rows(out)
    a, b = got["--group-by-length"], got["--no-group-by-length"]
    for ra, rb in zip(a, b):  # step 2 also checks the update of step 1
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5, rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], abs=1e-5, rel=1e-5)


def test_prompt_grouped_reward_batches_equal_plain_batches(tiny_model, assets, tmp_path):
    """--group-by-prompt scores 3 rows per ranking where batches of pairs score up to 6; the loss is the same."""
    data = ranked_preferences(assets, tmp_path / "d.jsonl")
    got = {}
    for grouping, batch_size in (("--group-by-prompt", "1"), ("--no-group-by-length", "3")):  # 1 prompt = 3 pairs
        out = tmp_path / grouping
        cli(["reward", "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--batch-size",
             batch_size, "--grad-accum", "4", "--max-steps", "2", "--max-length", "256", "--no-progress", "--lr",
             "1e-3", grouping])
        got[grouping] = step_rows(out)
    for ra, rb in zip(got["--group-by-prompt"], got["--no-group-by-length"]):
        assert ra["tokens"] < rb["tokens"]  # tokens the model read: each answer once, not once per pair
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5, rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], abs=1e-5, rel=1e-5)


def test_padding_does_not_change_log_probs(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    short, long = tok.encode("Ada has a dog."), tok.encode("Dana Jessop lives in a small town by the sea.")
    with torch.no_grad():
        alone = next_token_logps(model, **collate([short], [[1] * len(short)], tok.pad_token_id, "cpu"))[0]
        padded = next_token_logps(model, **collate([short, long], [[1] * len(short), [1] * len(long)],
                                                   tok.pad_token_id, "cpu"))[0]
        torch.testing.assert_close(padded[0, :len(short) - 1], alone[0], atol=1e-5, rtol=1e-5)
        # DPO's summed completion log-probs, alone vs in a padded batch
        p, c = tok.encode("Q: pet?"), tok.encode(" A rabbit.")
        one = completion_logps(model, pack_completions([p], [c], tok.pad_token_id))[0]
        many = completion_logps(model, pack_completions([p, long], [c, short], tok.pad_token_id))[0]
        torch.testing.assert_close(many[:1], one, atol=1e-5, rtol=1e-5)


def test_shared_prompt_option_logps_equal_whole_sequences(tiny_model):
    """option_logps runs each prompt once and continues its KV cache with every option (prompts of several
    lengths, left-padded; options of several lengths, right-padded, some tokens masked out): the sums are
    those of scoring each prompt + option as one sequence."""
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    prompts = [tok.encode("Q: which pet does Ada have?"), tok.encode("Q: pet?")]
    options = [[tok.encode(" A dog."), tok.encode(" A very small rabbit."), tok.encode(" None.")],
               [tok.encode(" A cat."), tok.encode(" Two fish in a bowl.")]]
    masks = [[[1] * len(o) for o in os] for os in options]
    masks[0][1][0] = 0  # the first token of one option does not count
    got = option_logps(model, prompts, options, tok.pad_token_id, masks, batch_size=2)
    with torch.no_grad():
        for p, os, ms, sums in zip(prompts, options, masks, got):
            batch = collate([p + o for o in os], [[0] * len(p) + m for m in ms], tok.pad_token_id, "cpu")
            logps, mask = next_token_logps(model, **batch)
            torch.testing.assert_close(torch.tensor(sums), (logps * mask).sum(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-empty options"):
        option_logps(model, prompts, [options[0], [[]]], tok.pad_token_id)


@pytest.mark.slow  # torch.compile's first compilation alone is most of a minute on 2 cores
def test_compile_follows_the_eager_trajectory(tiny_model, assets, tmp_path):
    data = sixteen_sft(assets, tmp_path / "d.jsonl")
    got = {flag: sft_losses(tiny_model, data, tmp_path / flag, 4, flag) for flag in ("--compile", "--no-compile")}
    # Fused kernels round differently; over 4 steps the losses agree to float32 noise.
    assert got["--compile"] == pytest.approx(got["--no-compile"], abs=1e-4, rel=1e-4)


def test_autocast_bf16_tracks_float32_and_keeps_float32_weights(tiny_model, assets, tmp_path):
    from safetensors import safe_open

    data = sixteen_sft(assets, tmp_path / "d.jsonl")
    got = {flag: sft_losses(tiny_model, data, tmp_path / flag, 6, "--autocast", flag) for flag in ("bf16", "none")}
    # bfloat16 keeps 8 bits of mantissa: the losses agree to ~1%, and they are not bit-equal (autocast ran)
    assert got["bf16"] == pytest.approx(got["none"], rel=2e-2)
    assert got["bf16"] != got["none"]
    assert got["bf16"][-1] < got["bf16"][0]
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
