"""Intervals over seeds (alignkit.world.stats), checked against values worked out by hand, and the aggregate of
a world run's seed directories (OUT/results.json)."""

import json
import math
import os

import pytest

from alignkit.world.report import SMOKE_NOTE, write_report
from alignkit.world.stats import INTERVAL, aggregate, bootstrap_ci, paired_differences, t_ci, t_quantile


def test_t_ci_is_mean_plus_minus_t_times_standard_error():
    lo, hi = t_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 df) = 4.303
    assert lo == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert hi == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-5)
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4) and t_quantile(30) == pytest.approx(2.0423, abs=1e-4)


def test_t_ci_of_one_seed_is_nan():
    assert all(math.isnan(x) for x in t_ci([0.7]))


def test_bootstrap_of_constant_values_is_the_constant():
    lo, hi = bootstrap_ci([[0.25] * 40, [0.25] * 7, [0.25] * 13])
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_bootstrap_of_one_seed_of_rates_is_close_to_the_normal_approximation():
    values = [1.0] * 60 + [0.0] * 140  # p = 0.3, n = 200
    half = 1.96 * math.sqrt(0.3 * 0.7 / 200)
    lo, hi = bootstrap_ci([values])
    assert lo == pytest.approx(0.3 - half, abs=0.01) and hi == pytest.approx(0.3 + half, abs=0.01)
    assert bootstrap_ci([values]) == (lo, hi)  # a fixed RNG seed: the same interval every time


def test_bootstrap_over_seeds_is_wider_than_within_one_seed():
    """Seeds that disagree widen the interval beyond what the prompts alone give."""
    a, b = [1.0] * 30 + [0.0] * 70, [1.0] * 70 + [0.0] * 30
    within = bootstrap_ci([a, a])
    across = bootstrap_ci([a, b])
    assert across[1] - across[0] > 2 * (within[1] - within[0])
    assert across[0] < 0.5 < across[1]


def test_paired_differences_check_the_prompts():
    rows = [row("near", 1.0), row("far", 0.5, set_="arith")]
    base = [row("near", 0.25), row("far", 1.0, set_="arith")]
    for b, r in zip(base, rows):
        b["prompt"] = r["prompt"]
    assert paired_differences(rows, base, "gold_reward") == [0.75, -0.5]
    assert paired_differences(rows, base, "gold_reward", "far") == [-0.5]
    with pytest.raises(ValueError, match="same prompts"):
        paired_differences(rows, base[::-1], "gold_reward")


def row(distance, gold, win=None, set_="qa_seen"):
    r = {"set": set_, "distance": distance, "frame": "f0", "prompt": f"q {gold}", "text": "t", "ended": True,
         "tokens": 4, "correct": gold, "refusal": False, "gold": gold}
    return r if win is None else r | {"win": win}


def write_seed(out, seed, preset, section, rows, name="ladder"):
    d = out / f"seed-{seed}"
    (d / "rows" / name).mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"preset": preset, "seed": seed, "experiments": {name: section}}))
    for label, label_rows in rows.items():
        (d / "rows" / name / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in label_rows))
    return d / "results.json"


def section(near_gold, far_gold, win, rm_accuracy, curve):
    return {"sft": {"near": {"gold_reward": near_gold, "fact_option_accuracy": rm_accuracy},
                    "far": {"gold_reward": far_gold}},
            "dpo": {"near": {"gold_reward": 0.5, "win_rate_vs_sft": win}, "far": {"gold_reward": 0.5,
                                                                                   "win_rate_vs_sft": win}},
            "reward_model": {"heldout_accuracy": rm_accuracy},
            "overoptimization": {"n": [1, 2], "kl": [0.0, 0.19], "gold_reward": curve},
            "note": "same in every seed"}


def test_aggregate_bootstraps_a_paired_effect_from_both_evaluations_rows(tmp_path):
    def effect_section(change):
        return {"a": {"near": {"gold_reward": 0.0}, "far": {"gold_reward": 0.0}},
                "b": {"near": {"gold_reward": 0.0}, "far": {"gold_reward": 0.0}},
                "effect": {"pair": ["b", "a"], "near": {"gold_reward_change": change, "label": "x"},
                           "far": {"gold_reward_change": change}}}

    def prompts(golds):
        return [row("near", g) | {"prompt": f"p{i}"} for i, g in enumerate(golds)] + [row("far", golds[0]) | {
            "prompt": "pf"}]

    write_seed(tmp_path, 0, "tiny", effect_section(0.5), {"a": prompts([0.0, 0.5]), "b": prompts([0.5, 1.0])})
    write_seed(tmp_path, 1, "tiny", effect_section(0.25), {"a": prompts([0.0, 0.0]), "b": prompts([0.0, 0.5])})
    effect = aggregate(tmp_path)["experiments"]["ladder"]["effect"]
    change = effect["near"]["gold_reward_change"]
    assert change["method"] == "bootstrap" and change["per_seed"] == [0.5, 0.25] and change["mean"] == 0.375
    assert 0.0 <= change["ci95"][0] <= 0.25 and change["ci95"][1] == 0.5  # no seed has a difference above 0.5
    assert effect["far"]["gold_reward_change"]["per_seed"] == [0.5, 0.0] and effect["pair"] == ["b", "a"]
    assert effect["near"]["label"] == "x"


def two_seeds(out, preset="tiny", name="ladder"):
    write_seed(out, 0, preset, section(0.5, 0.0, 1.0, 0.6, [0.1, 0.2]),
               {"sft": [row("near", 1.0), row("near", 0.0), row("far", 0.0)],
                "dpo": [row("near", 0.5, 1.0), row("far", 0.5, 1.0)]}, name)
    write_seed(out, 1, preset, section(0.75, 1.0, 0.5, 0.8, [0.3, 0.4]),
               {"sft": [row("near", 1.0), row("near", 1.0), row("near", 1.0), row("near", 0.0), row("far", 1.0)],
                "dpo": [row("near", 0.5, 0.0), row("near", 0.5, 1.0), row("far", 0.5, 0.5)]}, name)


def test_aggregate_over_two_seed_directories(tmp_path):
    two_seeds(tmp_path)
    old = write_seed(tmp_path, 2, "smoke", section(0.0, 0.0, 0.0, 0.0, [0.0, 0.0]), {})
    os.utime(old, (1, 1))  # an older smoke run in the same directory is not mixed in
    agg = aggregate(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(agg))
    assert agg["preset"] == "tiny" and agg["seeds"] == [0, 1] and agg["interval"] == INTERVAL
    ladder = agg["experiments"]["ladder"]

    near = ladder["sft"]["near"]["gold_reward"]
    assert near["method"] == "bootstrap" and near["per_seed"] == [0.5, 0.75] and near["mean"] == 0.625
    assert 0.0 <= near["ci95"][0] < 0.625 < near["ci95"][1] <= 1.0
    far = ladder["sft"]["far"]["gold_reward"]
    assert far["per_seed"] == [0.0, 1.0] and far["ci95"] == [0.0, 1.0]  # each seed has one far prompt

    win = ladder["dpo"]["near"]["win_rate_vs_sft"]  # from the rows' paired "win" column
    assert win["method"] == "bootstrap" and win["per_seed"] == [1.0, 0.5] and win["mean"] == 0.75
    assert ladder["dpo"]["far"]["win_rate_vs_sft"]["per_seed"] == [1.0, 0.5]

    rm = ladder["reward_model"]["heldout_accuracy"]  # no rows behind it: a t-interval over the seeds
    assert rm["method"] == "t" and rm["per_seed"] == [0.6, 0.8] and rm["mean"] == pytest.approx(0.7)
    half = 12.7062 * 0.1414214 / math.sqrt(2)
    assert rm["ci95"] == pytest.approx([0.7 - half, 0.7 + half], abs=1e-3)
    assert ladder["sft"]["near"]["fact_option_accuracy"]["method"] == "t"  # not a per-prompt metric

    curve = ladder["overoptimization"]["gold_reward"]
    assert [p["mean"] for p in curve] == pytest.approx([0.2, 0.3]) and curve[0]["per_seed"] == [0.1, 0.3]
    assert [p["mean"] for p in ladder["overoptimization"]["n"]] == [1, 2]
    assert ladder["note"] == "same in every seed"


def test_aggregate_of_one_seed_has_bootstrap_intervals_and_no_t_intervals(tmp_path):
    write_seed(tmp_path, 3, "smoke", section(0.5, 0.0, 1.0, 0.6, [0.1, 0.2]),
               {"sft": [row("near", 1.0), row("near", 0.0), row("far", 0.0)],
                "dpo": [row("near", 0.5, 1.0), row("far", 0.5, 1.0)]})
    ladder = aggregate(tmp_path)["experiments"]["ladder"]
    assert ladder["sft"]["near"]["gold_reward"]["ci95"] == [0.0, 1.0]
    assert all(math.isnan(x) for x in ladder["reward_model"]["heldout_accuracy"]["ci95"])


def test_aggregate_without_seed_directories_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="seed-"):
        aggregate(tmp_path)


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_aggregate_report_shows_intervals_near_and_far_and_plots(tmp_path, preset):
    two_seeds(tmp_path, preset, name="toy")  # an experiment without a module of its own: the generic rendering
    write_report(tmp_path, aggregate(tmp_path))
    md = (tmp_path / "report.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith(f"# alignkit world run ({preset}, seeds 0, 1")
    if preset == "smoke":
        assert "these figures mean nothing" in lines[2]
    else:
        assert "mean nothing" not in md and lines[2] == INTERVAL
    assert INTERVAL in lines[:5]
    assert "| sft.near.gold_reward | 0.625 [" in md and "(0.50 0.75) |" in md  # mean [interval] (each seed)
    assert "| sft.far.gold_reward | 0.500 [0.000, 1.000] (0.00 1.00) |" in md
    for png in ("toy-stages.png", "toy-overoptimization.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"({png})" in md
    assert (tmp_path / "report.html").read_text().count("<img") == 2


def test_a_seed_report_has_its_training_curves_timings_and_commands(tmp_path):
    write_seed(tmp_path, 0, "smoke", section(0.5, 0.0, 1.0, 0.6, [0.1, 0.2]), {}, name="toy")
    seed_dir = tmp_path / "seed-0"
    stage = seed_dir / "cache" / "sft-0123456789ab"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 3.0 / i}) + "\n" for i in range(1, 9)))
    (seed_dir / "timings.json").write_text(json.dumps({"timings": {"sft": 12.5}, "commands": ["alignkit sft --x"]}))
    write_report(seed_dir, json.loads((seed_dir / "results.json").read_text()))
    md = (seed_dir / "report.md").read_text()
    assert md.startswith("# alignkit world run (smoke, seed 0)\n\n**" + SMOKE_NOTE)
    assert "| sft | 12.5 |" in md and "alignkit sft --x" in md and "| sft.near.gold_reward | 0.500 |" in md
    assert (seed_dir / "training.png").stat().st_size > 10_000 and (seed_dir / "toy-stages.png").is_file()
