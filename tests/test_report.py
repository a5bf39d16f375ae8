"""alignkit report: opens what it wrote (valid, non-blank PNGs per logged number; the html lists the runs)."""

from __future__ import annotations

import json
import re

import matplotlib.image
import pytest

from alignkit.cli import main, run as cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sft(model, assets, out, lr):
    cli(["sft", "--model", str(model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
         "--max-steps", "6", "--batch-size", "4", "--max-length", "48", "--lr", lr, "--no-progress"])


def assert_real_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.01, f"{path} is a blank image"


def test_report_of_two_runs_overlays_them(tiny_model, assets, tmp_path):
    a, b = tmp_path / "lr-low", tmp_path / "lr-high"
    sft(tiny_model, assets, a, "1e-3")
    sft(tiny_model, assets, b, "3e-3")
    out = tmp_path / "cmp"
    cli(["report", str(a), str(b), "--output", str(out)])
    page = (out / "report.html").read_text()
    for name in ("loss", "lr", "grad_norm"):
        assert_real_png(out / "report" / f"{name}.png")
    srcs = re.findall(r"src='([^']+)'", page)
    assert {"report/loss.png", "report/lr.png", "report/grad_norm.png"} <= set(srcs)
    assert all((out / s).is_file() for s in srcs)
    assert "lr-low" in page and "lr-high" in page and "alignkit sft" in page
    assert re.search(r"<td>lr</td><td>0.001</td><td>0.003</td>", page)  # the config difference between the runs
    assert "Final row" in page and "examples" in page


def test_report_plots_every_number_a_recipe_logs(tmp_path):
    run = tmp_path / "grpo"
    run.mkdir()
    keys = ("loss", "reward/mean", "reward/std", "kl", "entropy", "clip_fraction", "response_length")
    rows = [{"step": s, **{k: (s * (i + 1)) % 7 + 0.1 * s for i, k in enumerate(keys)}} for s in range(1, 21)]
    rows.append({"step": 20, "final": True, "seconds": 3.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli(["report", str(run)])  # one run: the report goes into the run directory
    page = (run / "report.html").read_text()
    for key in keys:
        name = key.replace("/", "_") + ".png"
        assert_real_png(run / "report" / name)
        assert f"report/{name}" in page


@pytest.mark.parametrize("case", ["missing", "empty", "several-without-output"])
def test_report_user_errors_are_one_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    args = ["report", str(run)] + ([str(run)] if case == "several-without-output" else [])
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert ("--output" in err) if case == "several-without-output" else (str(run / "metrics.jsonl") in err)
    assert not (run / "report.html").exists()
