"""Invariant: a run resumed from any of its checkpoints is bit-identical to the uninterrupted run (every
logged metric and the saved weights), including the recipes whose reference log-probs are precomputed
before training (DPO, KTO) and so are recomputed by the resumed process."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

from alignkit.cli import run as cli
from helpers import read_metrics, toy_preferences

# Wall-clock figures differ between any two runs.
TIMING = {"tokens_per_s", "elapsed", "pairs_per_s", "seconds", "ref_seconds"}
STEPS = 14


def deterministic(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def resume_from(full, step: int, dest, args: list[str]) -> None:
    """Copy of the full run's output as it stood when its step-`step` checkpoint was the latest, then resumed."""
    shutil.copytree(full, dest)
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) != step:
            shutil.rmtree(ckpt)
    (dest / "model.safetensors").unlink()
    cli([*args, "--output", str(dest), "--resume"])


@pytest.fixture(scope="module")
def pairs(assets, tmp_path_factory):
    return toy_preferences(assets, tmp_path_factory.mktemp("pairs") / "pairs.jsonl", slice(0, 96))


@pytest.mark.parametrize("recipe,extra", [("dpo", ()), ("dpo", ("--no-group-by-length",)),
                                          ("kto", ("--no-group-by-length",)), ("reward", ()), ("sft", ())])
def test_resume_at_any_step_is_bit_identical(tiny_model, pairs, assets, tmp_path, recipe, extra):
    data = assets / "instructions.jsonl" if recipe == "sft" else pairs
    args = [recipe, "--model", str(tiny_model), "--data", str(data), "--max-length", "64", "--lr", "3e-3",
            "--warmup-steps", "2", "--batch-size", "4", "--max-steps", str(STEPS), "--no-progress", *extra]
    full = tmp_path / "full"
    cli([*args, "--output", str(full), "--save-every", "1", "--save-total-limit", str(STEPS)])
    expected, weights = deterministic(full), load_file(str(full / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    moved = max((weights[k] - w).abs().max().item() for k, w in base.items() if k in weights)
    assert moved > 1e-3  # the run trains, so equality means something
    for step in (3, 7, 12):
        resumed = tmp_path / f"from-{step}"
        resume_from(full, step, resumed, args)
        assert deterministic(resumed) == expected, f"{recipe} resumed at step {step}"
        got = load_file(str(resumed / "model.safetensors"))
        assert all(got[k].equal(w) for k, w in weights.items()), f"{recipe} resumed at step {step}: weights differ"
