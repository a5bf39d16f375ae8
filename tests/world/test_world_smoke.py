"""The smoke preset says what it is: its world is the tiny world under the name smoke, and its report says
plainly at the top that its figures mean nothing."""

import json

import pytest

from alignkit.cli import run as cli
from alignkit.world import stages
from alignkit.world.build import build
from alignkit.world.report import write_report

DATA_FILES = ("corpus.jsonl", "sft.jsonl", "pref.jsonl", "pref_ranked.jsonl", "pref_eval.jsonl", "rl_prompts.jsonl",
              "arith_prompts.jsonl")  # smoke's eval sets are tiny's first rows (tests/world/test_world_data.py)


def test_smoke_world_is_the_tiny_world_named_smoke(tmp_path, capsys):
    cli(["world", "build", "--preset", "smoke", "--output", str(tmp_path / "smoke")])
    assert json.loads(capsys.readouterr().out)["preset"] == "smoke"
    build(tmp_path / "tiny", "tiny", seed=0)
    for name in DATA_FILES:  # the same data, so the smoke run's trajectories are those of before
        assert (tmp_path / "smoke" / name).read_text() == (tmp_path / "tiny" / name).read_text(), name
    for name in ("world.json", "summary.json"):
        smoke, tiny = (json.loads((tmp_path / d / name).read_text()) for d in ("smoke", "tiny"))
        assert smoke.pop("preset") == "smoke" and tiny.pop("preset") == "tiny"
        smoke.pop("eval_sets", None), tiny.pop("eval_sets", None)
        assert smoke == tiny, name


class AfterBuild(Exception):
    pass


def test_world_run_smoke_builds_a_world_named_smoke(tmp_path, monkeypatch, capsys):
    """The build stage of `world run --preset smoke` prints "preset": "smoke" (the rest of the run is cut off)."""
    def only_build(argv):
        if argv[:2] != ["world", "build"]:
            raise AfterBuild
        return cli(argv)

    monkeypatch.setattr(stages, "alignkit", only_build)
    with pytest.raises(AfterBuild):
        cli(["world", "run", "--preset", "smoke", "--output", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert summary["preset"] == "smoke" and summary["people"] == 80


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_only_a_smoke_report_says_its_figures_mean_nothing(tmp_path, preset):
    def evaluation(accuracy, gold):
        return {d: {"qa_accuracy_seen": accuracy, "gold_reward": gold} for d in ("near", "far")}

    results = {"preset": preset, "seed": 0,
               "experiments": {"ladder": {"base": evaluation(0.0, 0.1), "sft": evaluation(1.0, 0.5)}}}
    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text().splitlines()
    page = (tmp_path / "report.html").read_text()
    if preset == "smoke":
        assert md[0].startswith("# alignkit world run (smoke") and "these figures mean nothing" in md[2]
        assert page.index("these figures mean nothing") < page.index("<pre>")
    else:
        assert "mean nothing" not in "\n".join(md) and "mean nothing" not in page
