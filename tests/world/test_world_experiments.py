"""The world as experiments sharing cached stages: the cache key, the completion marker, `world list`, and
bit-identical reruns of the smoke preset (a second experiment's reuse of base and SFT: test_length_bias.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.cli import run as cli
from alignkit.world import stages
from alignkit.world.experiments import EXPERIMENTS
from alignkit.world.stages import Context


class Runner:
    """Stands in for `alignkit.cli.run`: records each command and writes a file into its --output."""

    def __init__(self, fail_on: str | None = None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, argv):
        self.calls.append(argv)
        out = Path(argv[argv.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.txt").write_text(" ".join(argv))
        if argv[0] == self.fail_on:
            raise KeyboardInterrupt  # killed halfway through


def test_stage_key_follows_inputs_and_a_killed_stage_is_rebuilt(tmp_path, monkeypatch):
    data = tmp_path / "pref.jsonl"
    data.write_text('{"a": 1}\n')
    runner = Runner(fail_on="dpo")
    monkeypatch.setattr(stages, "alignkit", runner)
    ctx = Context(tmp_path / "seed-0", 0, "smoke")
    with pytest.raises(KeyboardInterrupt):
        ctx.stage("dpo", ["dpo", "--data", str(data)], [data])
    (partial,) = (tmp_path / "seed-0" / "cache").iterdir()
    assert not (partial / ".complete").exists()
    runner.fail_on = None
    again = Context(tmp_path / "seed-0", 0, "smoke")
    out = again.stage("dpo", ["dpo", "--data", str(data)], [data])
    assert out == partial and (out / ".complete").is_file() and len(runner.calls) == 2  # rebuilt, not reused
    assert runner.calls[-1][-4:] == ["--seed", "0", "--overwrite", "--no-progress"]
    # complete: reused, and said so
    third = Context(tmp_path / "seed-0", 0, "smoke")
    assert third.stage("dpo", ["dpo", "--data", str(data)], [data]) == out and len(runner.calls) == 2
    assert third.commands[-1].endswith("(cached)") and "--no-progress" not in third.commands[-1]
    # the same file with other content, another seed or another budget is another stage
    data.write_text('{"a": 2}\n')
    assert third.stage("dpo", ["dpo", "--data", str(data)], [data]) != out
    assert Context(tmp_path / "seed-0", 1, "smoke").key(["dpo"], [data]) != third.key(["dpo"], [data])
    assert Context(tmp_path / "seed-0", 0, "tiny").key(["dpo"], [data]) != third.key(["dpo"], [data])


def test_world_list_says_what_each_experiment_shows(capsys):
    cli(["world", "list"])
    out = capsys.readouterr().out
    for name, module in EXPERIMENTS.items():
        assert name in out and module.SUMMARY in out
        assert set(module.MINUTES) == {"smoke", "tiny", "small"} and module.ESTIMATED <= set(module.MINUTES)
    assert "small ~40 (estimate)" in out


@pytest.mark.parametrize(("flag", "value", "named"), [("--experiment", "nope", "ladder"),
                                                     ("--stages", "sft,simpo", "dpo-family")])
def test_unknown_experiment_or_stage_is_one_line(tmp_path, flag, value, named):
    r = subprocess.run([sys.executable, "-m", "alignkit.cli", "world", "run", "--preset", "smoke", flag, value,
                        "--output", str(tmp_path / "w")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert flag in r.stderr and value.split(",")[-1] in r.stderr and named in r.stderr
    assert not (tmp_path / "w").exists()  # nothing half-written


@pytest.mark.parametrize("stages", ["sft", pytest.param("all", marks=pytest.mark.slow)])
def test_same_seed_rerun_is_bit_identical(tmp_path, stages):
    """Two smoke runs from scratch in fresh processes (at once, one thread each): identical results.json. The
    suite's run stops after SFT (pretraining, SFT and their evaluation); the slow one runs the whole ladder."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "PYTHONHASHSEED")}
    procs = [subprocess.Popen([sys.executable, "-m", "alignkit.cli", "world", "run", "--preset", "smoke", "--output",
                               str(tmp_path / name), "--threads", "1", "--no-progress", "--no-aggregate",
                               "--stages", stages],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for name in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=1800) == 0, p.stderr.read()[-3000:]
    a, b = ((tmp_path / name / "seed-0" / "results.json").read_bytes() for name in ("a", "b"))
    assert a == b
    ladder = json.loads(a)["experiments"]["ladder"]
    assert ladder["sft"]["far"] and (stages == "sft" or ladder["grpo"]["far"])  # what was asked for ran
