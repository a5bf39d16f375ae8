"""The world pipeline end to end at the smoke budget: every stage runs as a generic command, every
results.json key of the contract is there, and the report is written. (The tiny preset's budget and the
phenomena every seed shows are asserted by the slow test below; docs/world.md judges the rest over seeds.)"""

import json
import re
import subprocess
import sys

import pytest

from alignkit.cli import run as cli

METRICS = {"qa_accuracy", "qa_accuracy_seen", "qa_accuracy_unseen_multi", "qa_accuracy_unseen_single", "arith_accuracy",
           "eos_rate", "harmful_refusal", "benign_overrefusal", "idk_on_unknown", "gold_reward", "mean_length"}
CALIBRATION = {f"{family}_{k}" for family in ("fact", "arith") for k in ("option_accuracy", "option_confidence",
                                                                         "calibration_ece")}
POLICIES = ("base", "sft", "dpo", "ppo", "grpo")
SECTION_KEYS = {"reward_model": {"heldout_accuracy", "gold_label_accuracy", "annotator_gold_agreement", "ece",
                                 "gold_label_accuracy_knowable", "annotator_gold_agreement_knowable"},
                "ppo": {"near", "far", "kl"},
                "overoptimization": {"n", "kl", "proxy_reward", "gold_reward", "mean_length"}}


def check_results(out, preset):
    seed_dir = out / "seed-0"
    results = json.loads((seed_dir / "results.json").read_text())
    assert set(results) == {"preset", "seed", "experiments"} and results["preset"] == preset
    ladder = results["experiments"]["ladder"]
    for key, keys in SECTION_KEYS.items():
        assert keys <= set(ladder[key]), (key, keys - set(ladder[key]))
    for stage in POLICIES:
        for distance in ("near", "far"):
            metrics = ladder[stage][distance]
            assert METRICS | CALIBRATION <= set(metrics), (stage, distance, METRICS | CALIBRATION - set(metrics))
            if stage not in ("base", "sft"):
                assert "win_rate_vs_sft" in metrics, (stage, distance)
            for k, v in metrics.items():
                if k not in ("mean_length", "gold_reward"):
                    assert 0.0 <= v <= 1.0, (stage, distance, k, v)
        rows = [json.loads(line) for line in (seed_dir / "rows" / "ladder" / f"{stage}.jsonl").read_text().splitlines()]
        assert {r["distance"] for r in rows} == {"near", "far"}
        assert ("win" in rows[0]) == (stage not in ("base", "sft"))
    shift = ladder["token_shift"]
    assert set(shift) == {"sft", "dpo", "ppo", "grpo"} and set(shift["sft"]) == {"vs_base"}
    assert set(shift["dpo"]) == {"vs_base", "vs_sft"}
    for stage, comparisons in shift.items():
        for s in comparisons.values():
            assert s["unshifted"] + s["marginal"] + s["shifted"] == pytest.approx(1.0), stage
    timings = json.loads((seed_dir / "timings.json").read_text())
    assert timings["seconds"] > 0 and {"pretrain", "sft", "dpo", "ppo", "grpo"} <= set(timings["timings"])
    assert (seed_dir / "report.md").is_file()
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    aggregate = json.loads((out / "results.json").read_text())
    assert aggregate["seeds"] == [0] and "ladder" in aggregate["experiments"]
    report = (seed_dir / "report.md").read_text()
    assert "## Calibration and token shift" in report or "### Calibration and token shift" in report
    table = report.split("Calibration and token shift")[1].split("\n\n")[2].splitlines()
    assert len({len(re.findall(r"(?<!\\)\|", line)) for line in table}) == 1, table  # e.g. <|im_end|> escaped
    assert "<img" in (out / "report.html").read_text()
    return ladder, timings


@pytest.mark.xdist_group("smoke_ladder")
def test_world_run_smoke(smoke_ladder, tmp_path):
    out, calls = smoke_ladder  # `world run --preset smoke`, run once for the session (conftest.py)
    assert calls == ("world", "train-tokenizer", "init-model", "pretrain", "sft", "reward", "dpo", "ppo", "grpo")
    ladder, timings = check_results(out, "smoke")
    assert len(ladder["overoptimization"]["kl"]) == 3  # n = 1, 2, 4
    assert all(f"alignkit {c}" in " ".join(timings["commands"]) for c in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo"))
    # `alignkit world eval` on one stage's model gives the run's figures for that stage (the world as a tutorial)
    cache = out / "seed-0" / "cache"
    (dpo,), (sft,), (data,) = (list(cache.glob(f"{name}-*")) for name in ("dpo", "sft", "data"))
    cli(["world", "eval", "--model", str(dpo), "--world", str(data), "--baseline", str(sft), "--output",
         str(tmp_path / "dpo.json")])
    alone = json.loads((tmp_path / "dpo.json").read_text())
    for distance in ("near", "far"):
        for k, v in ladder["dpo"][distance].items():
            assert alone[distance][k.replace("_vs_sft", "_vs_baseline")] == pytest.approx(v, abs=1e-6), k
    assert alone["token_shift_vs_baseline"] == ladder["token_shift"]["dpo"]["vs_sft"]


@pytest.mark.slow
def test_world_run_tiny(tmp_path):
    """The tiny preset within its 10-minute budget, as a user would run it (a fresh process, the default
    thread count), with the phenomena every seed shows. The criteria that hold or fail only on average are
    judged over 3 seeds with intervals (docs/world.md), never on one seed here."""
    out = tmp_path / "world"
    r = subprocess.run([sys.executable, "-m", "alignkit.cli", "world", "run", "--preset", "tiny", "--output", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ladder, timings = check_results(out, "tiny")
    assert timings["seconds"] < 600
    for distance in ("near", "far"):
        base, sft = ladder["base"][distance], ladder["sft"][distance]
        # pretraining alone does not make an assistant; SFT does, and answers what pretraining taught
        assert base["qa_accuracy"] <= 0.2 and base["eos_rate"] < 0.5, distance
        assert sft["eos_rate"] >= 0.95, distance
        assert sft["qa_accuracy_seen"] > sft["qa_accuracy_unseen_multi"] + 0.5, distance
    # best-of-n against the proxy RM raises the proxy reward at every n (the gold curve is judged over seeds)
    proxy = ladder["overoptimization"]["proxy_reward"]
    assert all(b > a for a, b in zip(proxy, proxy[1:]))
    # the base model never closes a turn, so every end-of-turn token of SFT's answers is shifted (Lin et al. 2023)
    assert ladder["token_shift"]["sft"]["vs_base"]["shifted_at_end"] == 1.0
