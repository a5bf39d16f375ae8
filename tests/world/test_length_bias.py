"""The `length-bias` experiment on the smoke preset, run as a user would after the ladder: it reuses the ladder's
cached base and SFT models (no tokenizer, init, pretrain or SFT command runs again, and the ladder's stage
directories are untouched; only the preference files of its two annotator pools are built), writes its section
(every method at both biases, the paired effects, the reward models' length slopes) and per-prompt rows beside
the ladder's, and its section aggregates and renders. The `dpo-family` experiment's wiring is checked on a
stand-in context (it trains nothing the ladder and length-bias runs do not)."""

import json
import math
import shutil

import pytest

from alignkit.cli import run as cli
from alignkit.world import stages
from alignkit.world.experiments import EXPERIMENTS, length_bias
from alignkit.world.report import write_report
from alignkit.world.stats import aggregate


# slow: the suite is at its 10-minute budget on a 2-core machine; `python -m pytest -m slow` runs it
@pytest.mark.slow
@pytest.mark.xdist_group("smoke_ladder")
def test_length_bias_reuses_the_ladders_base_and_sft(smoke_ladder, tmp_path, monkeypatch):
    assert EXPERIMENTS[length_bias.NAME] is length_bias and length_bias.NAME == "length-bias"
    ladder_world, ladder_calls = smoke_ladder  # the smoke ladder's run, shared with test_world_run.py (conftest.py)
    assert ladder_calls[:5] == ("world", "train-tokenizer", "init-model", "pretrain", "sft")
    world = tmp_path / "world"
    shutil.copytree(ladder_world, world)  # a moved world directory keeps its cache; the shared run stays as it was
    calls = []

    def counting(argv):
        calls.append(argv[0])
        return cli(argv)

    monkeypatch.setattr(stages, "alignkit", counting)
    flags = ["--preset", "smoke", "--output", str(world), "--no-progress", "--threads", "1", "--no-aggregate"]
    out = world / "seed-0"
    shared = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*")}
    cli(["world", "run", "--experiment", "length-bias", *flags])

    assert not {"train-tokenizer", "init-model", "pretrain", "sft"} & set(calls), calls
    assert calls.count("world") == 2  # the worlds of the two annotator pools; the ladder's is reused
    assert {p: p.stat().st_mtime_ns for p in shared} == shared  # the shared stages' files untouched
    assert calls.count("reward") == 2 and calls.count("dpo") == 6 and calls.count("ppo") == 2
    commands = json.loads((out / "timings.json").read_text())["commands"]
    assert any(c.startswith("alignkit sft ") and c.endswith("(cached)") for c in commands)
    results = json.loads((out / "results.json").read_text())
    assert set(results["experiments"]) == {"ladder", "length-bias"}  # the first experiment's section is kept
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


class StandInContext:
    """What dpo_family.run asks of a world Context, recording the stages it asks to train."""

    def __init__(self, tmp_path):
        self.root, self.trained, self.budget = tmp_path, [], stages.PRESETS["smoke"]

    def data(self):
        return self.root / "data"

    def sft(self):
        return self.root / "sft"

    at_once = 1

    def stages_at_once(self, specs, at_once):
        self.trained += [(label, command[command.index("--loss") + 1], command[command.index("--model") + 1])
                         for label, (command, _) in specs.items()]
        return {label: self.root / label for label in specs}

    def evaluate(self, experiment, label, model, data, baseline=None):
        assert experiment == "dpo-family" and (baseline == "sft") == (label != "sft")
        metrics = {"win_rate_vs_sft": 0.5} if baseline else {}
        return {d: {**metrics, "mean_length": 10.0} for d in ("near", "far")}

    def time(self, label, fn, *args):
        return {"shifted": 0.1, "shifted_at_end": 0.0}

    def sets(self, data):
        return {}

    def answers(self, model, data):
        return {}


def test_dpo_family_trains_dpo_simpo_and_ln_dpo_from_sft_and_reports_them(tmp_path):
    from alignkit.world.experiments import dpo_family

    assert EXPERIMENTS["dpo-family"] is dpo_family
    ctx = StandInContext(tmp_path)
    section = dpo_family.run(ctx)
    sft = str(tmp_path / "sft")
    assert ctx.trained == [("dpo", "sigmoid", sft), ("simpo", "simpo", sft), ("ln_dpo", "ln_dpo", sft)]
    assert set(section) == {"sft", "dpo", "simpo", "ln_dpo", "token_shift"}
    assert set(section["token_shift"]) == {"dpo", "simpo", "ln_dpo"}
    md = dpo_family.report(section)
    assert all(f"| {m} |" in md for m in ("sft", "dpo", "simpo", "ln_dpo")) and "shifted vs SFT" in md
