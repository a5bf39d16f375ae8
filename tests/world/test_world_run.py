"""The world pipeline end to end at the smoke budget: every stage runs as a generic command, every
results.json key of the contract is there, and the report is written. (The tiny preset's effects are
measured by the slow test below and reported in the resolution note.)"""

import json

import pytest

from alignkit.cli import run as cli

STAGE_KEYS = {"base": {"qa_accuracy", "eos_rate"},
              "sft": {"qa_accuracy_seen", "qa_accuracy_unseen_multi", "qa_accuracy_unseen_single", "arith_accuracy",
                      "eos_rate", "harmful_refusal", "benign_overrefusal", "gold_reward"},
              "reward_model": {"heldout_accuracy", "gold_label_accuracy", "ece"},
              "dpo": {"gold_reward", "win_rate_vs_sft", "mean_length"},
              "simpo": {"gold_reward", "win_rate_vs_sft", "mean_length"},
              "ln_dpo": {"gold_reward", "win_rate_vs_sft", "mean_length"},
              "ppo": {"gold_reward", "win_rate_vs_sft", "mean_length", "kl"},
              "grpo": {"arith_accuracy", "gold_reward"},
              "overoptimization": {"kl", "proxy_reward", "gold_reward", "mean_length"}}


def check_results(out, preset):
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == preset and results["seconds"] > 0
    for stage, keys in STAGE_KEYS.items():
        assert keys <= set(results[stage]), (stage, keys - set(results[stage]))
    for stage in ("base", "sft", "dpo", "ppo", "grpo"):
        for k, v in results[stage].items():
            if k not in ("mean_length", "gold_reward", "kl"):
                assert 0.0 <= v <= 1.0, (stage, k, v)
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert "<img" in (out / "report.html").read_text()
    return results


def test_world_run_smoke(tmp_path):
    out = tmp_path / "world"
    cli(["world", "run", "--preset", "smoke", "--output", str(out), "--no-progress"])
    results = check_results(out, "smoke")
    assert len(results["overoptimization"]["kl"]) == 3  # n = 1, 2, 4
    assert all(f"alignkit {c}" in " ".join(results["commands"]) for c in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo"))


@pytest.mark.slow
def test_world_run_tiny(tmp_path):
    """The tiny preset within its 10-minute budget, with the seeds' first phenomena (issue 5)."""
    out = tmp_path / "world"
    cli(["world", "run", "--preset", "tiny", "--output", str(out), "--no-progress"])
    r = check_results(out, "tiny")
    assert r["seconds"] < 600
    assert r["base"]["qa_accuracy"] <= 0.2 and r["base"]["eos_rate"] < r["sft"]["eos_rate"]
    assert r["sft"]["eos_rate"] >= 0.95 and r["sft"]["harmful_refusal"] >= 0.9
    assert r["reward_model"]["heldout_accuracy"] > 0.6
