"""The `dpo-family` and `length-bias` experiments on the smoke preset, run as a user would after the ladder: they
reuse the ladder's cached base and SFT models (no tokenizer, init, pretrain or SFT command runs again, and the
ladder's stage directories are untouched; length-bias builds only the preference files of its two annotator
pools). Each writes its section (length-bias: every method at both biases, the paired effects, the reward
models' length slopes) and per-prompt rows beside the ladder's, and its section aggregates and renders."""

import json
import math

from alignkit.cli import run as cli
from alignkit.world import stages
from alignkit.world.experiments import EXPERIMENTS, dpo_family, length_bias
from alignkit.world.report import write_report
from alignkit.world.stats import aggregate


def test_second_experiments_reuse_the_ladders_base_and_sft(tmp_path, monkeypatch):
    assert EXPERIMENTS[length_bias.NAME] is length_bias and length_bias.NAME == "length-bias"
    calls = []

    def counting(argv):
        calls.append(argv[0])
        return cli(argv)

    monkeypatch.setattr(stages, "alignkit", counting)
    world = tmp_path / "world"
    flags = ["--preset", "smoke", "--output", str(world), "--no-progress", "--threads", "1", "--no-aggregate"]
    cli(["world", "run", "--stages", "sft", *flags])
    assert calls == ["world", "train-tokenizer", "init-model", "pretrain", "sft"]
    out = world / "seed-0"
    calls.clear()
    cli(["world", "run", "--experiment", "dpo-family", *flags])
    assert calls == ["dpo", "dpo", "dpo"]  # DPO, SimPO, LN-DPO from the cached SFT model
    family = json.loads((out / "results.json").read_text())["experiments"]["dpo-family"]
    for method in dpo_family.METHODS:
        assert "win_rate_vs_sft" in family[method]["far"] and "shifted" in family["token_shift"][method]["vs_sft"]
    assert "| simpo |" in dpo_family.report(family)
    shared = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*")}
    calls.clear()
    cli(["world", "run", "--experiment", "length-bias", *flags])

    assert not {"train-tokenizer", "init-model", "pretrain", "sft"} & set(calls), calls
    assert calls.count("world") == 2  # the worlds of the two annotator pools; the ladder's is reused
    assert {p: p.stat().st_mtime_ns for p in shared} == shared  # the shared stages' files untouched
    assert calls.count("reward") == 2 and calls.count("dpo") == 6 and calls.count("ppo") == 2
    commands = json.loads((out / "timings.json").read_text())["commands"]
    assert any(c.startswith("alignkit sft ") and c.endswith("(cached)") for c in commands)
    results = json.loads((out / "results.json").read_text())
    assert set(results["experiments"]) == {"ladder", "dpo-family", "length-bias"}  # earlier sections are kept
    section = results["experiments"]["length-bias"]
    strong = f"{length_bias.STRONG:g}"
    for method in length_bias.METHODS:
        for bias in ("0", strong):
            evaluation = section[f"{method}_bias{bias}"]
            assert {"mean_length", "gold_reward", "win_rate_vs_sft"} <= set(evaluation["near"]) & set(evaluation["far"])
            assert (out / "rows" / "length-bias" / f"{method}_bias{bias}.jsonl").is_file()
        effect = section["effect"][method]
        assert effect["pair"] == [f"{method}_bias{strong}", f"{method}_bias0"]
        assert set(effect["near"]) == set(effect["far"]) == {"mean_length_change", "gold_reward_change"}
        assert not math.isnan(effect["near"]["mean_length_change"])
    for bias in ("0", strong):
        rm = section["reward_model"][f"bias{bias}"]
        assert {"heldout_accuracy", "annotator_gold_agreement", "gold_label_accuracy"} <= set(rm)
        assert rm["length_slope"]["answers"] > 0 and not math.isnan(rm["length_slope"]["score_per_word"])

    agg = aggregate(world)["experiments"]["length-bias"]
    assert agg["effect"]["dpo"]["near"]["mean_length_change"]["method"] == "bootstrap"
    write_report(world, aggregate(world))
    md = (world / "report.md").read_text()
    assert "| DPO |" in md and "| best-of-n |" in md and "score per word" in md
