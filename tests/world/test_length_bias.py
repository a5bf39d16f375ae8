"""The `length-bias` experiment on the smoke preset: it runs from the cached SFT model (no second pretrain or SFT
command), writes its section (every method at both biases, the paired effects, the reward models' length
slopes) and per-prompt rows, and its section aggregates and renders."""

import json
import math

from alignkit.world import stages
from alignkit.world.experiments import EXPERIMENTS, length_bias
from alignkit.world.report import write_report
from alignkit.world.stats import aggregate


def test_length_bias_runs_from_the_cached_sft_model(tmp_path, monkeypatch):
    assert EXPERIMENTS[length_bias.NAME] is length_bias and length_bias.NAME == "length-bias"
    out = tmp_path / "seed-0"
    first = stages.Context(out, seed=0, preset="smoke")
    first.sft()
    trained = []

    def counting(argv):
        trained.append(argv[0])
        return run(argv)

    run = stages.alignkit
    monkeypatch.setattr(stages, "alignkit", counting)
    ctx = stages.Context(out, seed=0, preset="smoke")  # a later `world run --experiment length-bias`
    section = length_bias.run(ctx)

    assert "pretrain" not in trained and "sft" not in trained
    assert trained.count("reward") == 2 and trained.count("dpo") == 6 and trained.count("ppo") == 2
    assert any(c.startswith("alignkit sft ") and c.endswith("(cached)") for c in ctx.commands)
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

    (out / "results.json").write_text(json.dumps({"preset": "smoke", "seed": 0, "experiments": {"length-bias": section}}))
    agg = aggregate(tmp_path)["experiments"]["length-bias"]
    assert agg["effect"]["dpo"]["near"]["mean_length_change"]["method"] == "bootstrap"
    write_report(tmp_path, aggregate(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "| DPO |" in md and "| best-of-n |" in md and "score per word" in md
