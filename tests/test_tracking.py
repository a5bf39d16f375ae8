"""Progress off a terminal, and --report-to trackers holding the same rows as metrics.jsonl."""

from __future__ import annotations

import io
import re

from alignkit.train.tracking import PlainProgress
from helpers import run_cli

PLAIN_LINE = re.compile(r"^sft: step (\d+)/12 \((\d+)%\), \d+\.\d s(, eta \d+ s)?(, loss \d+\.\d+)?$")


def sft_args(model, assets, out, *extra):
    return ["sft", "--model", str(model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
            "--max-steps", "12", "--batch-size", "4", "--max-length", "48", "--log-every", "1", *extra]


def test_progress_off_a_terminal_is_plain_lines(tiny_model, assets, tmp_path):
    """stderr is a pipe here (as under CI, `| tee`, nohup): no carriage-return bar, a few whole lines."""
    result = run_cli(*sft_args(tiny_model, assets, tmp_path / "sft"))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\r" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("sft: step")]
    assert lines and all(PLAIN_LINE.match(line) for line in lines), result.stderr
    steps = [int(PLAIN_LINE.match(line).group(1)) for line in lines]
    assert steps == sorted(steps) and steps[-1] == 12 and len(steps) < 12  # every few steps, and the end


def test_plain_progress_prints_every_n_steps_and_at_the_end():
    out = io.StringIO()
    bar = PlainProgress(total=7, initial=0, desc="x", every=3, seconds=1e9, file=out)
    for _ in range(7):
        bar.update(1)
    bar.close()
    steps = [int(re.match(r"x: step (\d+)/7", line).group(1)) for line in out.getvalue().splitlines()]
    assert steps == [3, 6, 7]


def test_plain_progress_prints_when_seconds_pass():
    out = io.StringIO()
    bar = PlainProgress(total=100, initial=40, desc="x", every=1000, seconds=0.0, file=out)
    bar.update(1)
    bar.set_postfix(loss="1.2345")
    bar.update(1)
    bar.close()  # nothing new since the last line: no repeat
    assert out.getvalue().splitlines()[0].startswith("x: step 41/100 (41%)")
    assert out.getvalue().splitlines()[1].endswith(", loss 1.2345") and len(out.getvalue().splitlines()) == 2
