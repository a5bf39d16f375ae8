"""The issue-19 experiments end to end on the smoke preset (about two minutes on 2 cores, so marked slow): each runs
its commands (curate, probe-knowledge, distill, sft, generate) on the world's files and reports every section."""

import json

import pytest

from alignkit.cli import run as cli

EXPERIMENTS = ("unknown-facts", "knowledge-categories", "data-selection", "safety-dose", "distillation")


@pytest.mark.slow
def test_the_sft_data_experiments_run_and_report_on_smoke(tmp_path):
    out = tmp_path / "world"
    argv = ["world", "run", "--preset", "smoke", "--output", str(out), "--no-progress", "--threads", "1"]
    for name in EXPERIMENTS:
        argv += ["--experiment", name]
    cli(argv)
    sections = json.loads((out / "seed-0" / "results.json").read_text())["experiments"]
    assert set(EXPERIMENTS) <= set(sections)
    assert set(sections["unknown-facts"]["fit"]) == {"absent_0", "absent_25", "absent_50", "absent_100"}
    assert all(len(f["epoch"]) >= 1 for f in sections["unknown-facts"]["fit"].values())
    probe = sections["knowledge-categories"]["probe_cloze"]
    assert sum(probe["questions"].values()) == 320  # every fact of the tiny world's 80 people
    curation = sections["data-selection"]["curation"]
    assert curation["recall_by_kind"]["garbled"] == 1.0 and curation["recall_by_kind"]["duplicate"] == 1.0
    assert all(sections["data-selection"]["selected"][s]["k"] == 200 for s in ("random", "longest", "diverse"))
    assert {"lookalikes_300", "no_lookalikes_0"} <= set(sections["safety-dose"])
    assert {"teacher", "seq_kd", "token_kd", "gkd"} <= set(sections["distillation"])
    report = (out / "seed-0" / "report.md").read_text()
    assert all(f"## {name}" in report for name in EXPERIMENTS)
