"""The training-free experiment's pieces and the figures every world evaluation gained: per-baseline verdicts,
the length-controlled win rate, diversity and the garbled rate, and their aggregate over seeds."""

from __future__ import annotations

import json

import pytest

from alignkit.world.experiments import EXPERIMENTS, training_free
from alignkit.world.evaluate import compare, set_metrics
from alignkit.world.stats import aggregate


def row(i, distance, gold, text, ended=True):
    return {"set": "qa_seen", "distance": distance, "frame": "f0", "prompt": f"q{i}", "text": text, "ended": ended,
            "tokens": len(text.split()), "correct": gold, "refusal": False, "idk": False, "gold": gold,
            "garbled": not ended}


def test_compare_writes_a_verdict_per_baseline_and_the_length_controlled_rate():
    mine = [row(0, "near", 1.0, "a b c"), row(1, "near", 0.0, "a"), row(2, "near", 0.5, "x y"), row(3, "far", 1.0, "z")]
    sft = [row(0, "near", 0.0, "a"), row(1, "near", 1.0, "a b c d"), row(2, "near", 0.5, "p q"), row(3, "far", 0.0, "w")]
    base = [row(i, r["distance"], 1.0, "w") for i, r in enumerate(mine)]
    metrics = {"near": {}, "far": {}}
    compare(mine, sft, "sft", metrics, first=True)
    compare(mine, base, "base", metrics, first=False)
    assert [r["win_vs_sft"] for r in mine] == [1.0, 0.0, 0.5, 1.0] == [r["win"] for r in mine]
    assert [r["win_vs_base"] for r in mine] == [0.5, 0.0, 0.0, 0.5]
    assert metrics["near"]["win_rate_vs_sft"] == 0.5 and metrics["far"]["win_rate_vs_sft"] == 1.0
    assert metrics["near"]["win_rate_vs_base"] == pytest.approx(1 / 6)
    # one far prompt: no length difference to regress on, so the LC rate is the raw one
    assert metrics["far"]["lc_win_rate_vs_sft"] == pytest.approx(1.0, abs=0.05)
    assert 0.0 < metrics["near"]["lc_win_rate_vs_sft"] < 1.0
    with pytest.raises(ValueError, match="same prompts"):
        compare(mine, sft[::-1], "sft", metrics, first=True)


def test_set_metrics_are_the_eval_metrics_of_the_answer_texts():
    rows = [row(0, "near", 1.0, "the cat sat"), row(1, "near", 1.0, "the cat ran")]
    got = set_metrics(rows)
    assert got["distinct_1"] == pytest.approx(4 / 6) and got["distinct_2"] == pytest.approx(3 / 4)
    assert 0.0 < got["self_bleu"] < 1.0 and set_metrics([]) == {}


def test_aggregate_reads_each_baselines_verdict_column(tmp_path):
    for seed, wins in ((0, (1.0, 0.0)), (1, (1.0, 1.0))):
        d = tmp_path / f"seed-{seed}"
        (d / "rows" / "training-free").mkdir(parents=True)
        rows = [row(i, "near", 1.0, "a") | {"win": w, "win_vs_sft": w, "win_vs_base": 1.0 - w} for i, w in enumerate(wins)]
        (d / "rows" / "training-free" / "rules.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        section = {"rules": {"near": {"win_rate_vs_sft": sum(wins) / 2, "win_rate_vs_base": 1 - sum(wins) / 2,
                                      "garbled_rate": 0.0, "lc_win_rate_vs_sft": 0.5 + seed / 4},
                             "far": {}}}
        (d / "results.json").write_text(json.dumps({"preset": "tiny", "seed": seed,
                                                    "experiments": {"training-free": section}}))
    near = aggregate(tmp_path)["experiments"]["training-free"]["rules"]["near"]
    assert near["win_rate_vs_sft"]["per_seed"] == [0.5, 1.0] and near["win_rate_vs_sft"]["method"] == "bootstrap"
    assert near["win_rate_vs_base"]["per_seed"] == [0.5, 0.0]
    assert near["garbled_rate"]["method"] == "bootstrap"  # a per-row metric
    assert near["lc_win_rate_vs_sft"]["method"] == "t" and near["lc_win_rate_vs_sft"]["per_seed"] == [0.5, 0.75]


def test_variants_ask_for_the_rules_and_prefixes_they_name(tmp_path):
    demos = tmp_path / "d.jsonl"
    assert "training-free" in EXPERIMENTS
    eos = training_free.options("eos_boost", ["Ġthe"], demos)
    assert eos.eos_boost == training_free.EOS_BOOST and eos.logit_bias == ("<|endoftext|>=-inf",)
    assert eos.repetition_penalty == 1.0 and eos.demonstrations is None
    rules = training_free.options("rules", ["Ġthe", "Ġis"], demos)
    assert rules.logit_bias[:2] == (f"Ġthe={training_free.BIAS}", f"Ġis={training_free.BIAS}")
    assert rules.repetition_penalty == training_free.REPETITION_PENALTY
    plain = training_free.options("urial_plain", [], demos)
    assert plain.context_format == "plain" and plain.demonstrations == str(demos) and plain.eos_boost == 0.0
    both = training_free.options("urial_chat_rules", ["Ġthe"], demos)
    assert both.context_format == "chat" and both.eos_boost == training_free.EOS_BOOST
    assert set(training_free.VARIANTS) == {"eos_boost", "rules", "urial_chat", "urial_plain", "urial_chat_rules"}


@pytest.mark.slow
def test_training_free_smoke_run(tmp_path):
    """The whole experiment on the smoke preset: every variant evaluated against SFT and the base model."""
    from alignkit.cli import run as cli

    cli(["world", "run", "--preset", "smoke", "--seeds", "0", "--experiment", "training-free", "--output",
         str(tmp_path), "--no-progress"])
    section = json.loads((tmp_path / "seed-0" / "results.json").read_text())["experiments"]["training-free"]
    for name in training_free.VARIANTS:
        for key in ("win_rate_vs_sft", "win_rate_vs_base", "lc_win_rate_vs_sft", "eos_rate", "garbled_rate"):
            assert key in section[name]["far"], (name, key)
    assert len(section["shift"]["bias_tokens"]) <= training_free.BIAS_TOKENS  # smoke SFT may shift none
    assert "| rules |" in (tmp_path / "report.md").read_text()
