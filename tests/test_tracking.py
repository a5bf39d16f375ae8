"""Progress off a terminal, and --report-to trackers holding the same rows as metrics.jsonl."""

from __future__ import annotations

import io
import json
import re
import shutil
import struct

import pytest

from alignkit.cli import main, run as cli
from alignkit.train.tracking import PlainProgress
from helpers import read_metrics

PLAIN_LINE = re.compile(r"^sft: step (\d+)/12 \((\d+)%\), \d+\.\d s(, eta \d+ s)?(, loss \d+\.\d+)?$")


def sft_args(model, assets, out, *extra):
    return ["sft", "--model", str(model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
            "--max-steps", "12", "--batch-size", "4", "--max-length", "48", "--log-every", "1", *extra]


def test_progress_off_a_terminal_is_plain_lines(tiny_model, assets, tmp_path, capsys):
    """stderr is not a terminal here (as under CI, `| tee`, nohup): no carriage-return bar, a few whole lines."""
    cli(sft_args(tiny_model, assets, tmp_path / "sft"))
    last_loss = logged_losses(tmp_path / "sft")[12]
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("sft: step")]
    assert lines and all(PLAIN_LINE.match(line) for line in lines), captured.err
    steps = [int(PLAIN_LINE.match(line).group(1)) for line in lines]
    assert steps == sorted(steps) and steps[-1] == 12 and len(steps) < 12  # every few steps, and the end
    assert lines[-1].endswith(f", loss {last_loss:.4f}")  # the line's loss is its step's


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


def logged_losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if not r.get("final")}


def test_report_to_tensorboard_holds_the_metrics_rows(tiny_model, assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sft"
    cli(sft_args(tiny_model, assets, out, "--report-to", "tensorboard", "--no-progress"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged == pytest.approx(logged_losses(out), rel=1e-6) and sorted(logged) == list(range(1, 13))
    lr = {e.step: e.value for e in events.Scalars("lr")}
    assert lr == pytest.approx({r["step"]: r["lr"] for r in read_metrics(out) if not r.get("final")}, rel=1e-6)
    assert "final/examples" in events.Tags()["scalars"]


def test_report_to_tensorboard_resume_does_not_repeat_steps(tiny_model, assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sft"
    cli(sft_args(tiny_model, assets, out, "--report-to", "tensorboard", "--no-progress", "--save-every", "6"))
    shutil.rmtree(out / "checkpoints" / "step-00000012")  # as if the run died after step 6
    cli(sft_args(tiny_model, assets, out, "--report-to", "tensorboard", "--no-progress", "--resume"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == list(range(1, 13))  # the first launch's steps 7-12 are purged, not shown twice
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(logged_losses(out), rel=1e-6)


def test_report_to_without_its_package_is_one_line(tiny_model, assets, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert main(sft_args(tiny_model, assets, tmp_path / "sft", "--report-to", "wandb")) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --report-to wandb needs the wandb package: pip install 'alignkit[wandb]'"
    assert not (tmp_path / "sft").exists()


def wandb_history(path) -> list[dict]:
    """The history rows of an offline wandb run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, rows = header, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # the rest of a block too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        chunk, pos = data[pos + header:pos + header + length], pos + header + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_report_to_wandb_offline_holds_the_metrics_rows(tiny_model, assets, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install 'alignkit[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    out = tmp_path / "sft"
    cli(sft_args(tiny_model, assets, out, "--report-to", "wandb", "--no-progress"))
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert {r["_step"]: r["loss"] for r in history} == pytest.approx(logged_losses(out), rel=1e-12)
    assert len(history) == 12


def test_report_to_trackio_holds_the_metrics_rows(tiny_model, assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio", reason="the trackio package is not installed (pip install 'alignkit[trackio]')")
    from trackio.sqlite_storage import SQLiteStorage

    monkeypatch.setattr("trackio.sqlite_storage.TRACKIO_DIR", tmp_path / "trackio")  # if imported earlier
    out = tmp_path / "sft"
    cli(sft_args(tiny_model, assets, out, "--report-to", "trackio", "--no-progress"))
    logs = SQLiteStorage.get_logs("alignkit", "sft")
    assert {r["step"]: r["loss"] for r in logs if "loss" in r} == pytest.approx(logged_losses(out), rel=1e-12)
    assert any("final/examples" in r for r in logs)


def test_a_tracker_that_does_not_start_is_one_line_before_training(tiny_model, assets, tmp_path, monkeypatch,
                                                                    capsys):
    from alignkit.train import tracking

    def refuse(self, *args):
        raise RuntimeError("api_key not configured (no-tty)\nmore detail")

    monkeypatch.setattr(tracking.TensorBoardTracker, "__init__", refuse)
    out = tmp_path / "sft"
    assert main(sft_args(tiny_model, assets, out, "--report-to", "tensorboard")) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --report-to tensorboard: the tracker did not start: api_key not configured (no-tty)"
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_a_graceful_stop_closes_the_tracker_and_resume_continues_it(tiny_model, assets, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alignkit.train import run as run_module, tracking

    class StopAtStep5(run_module.GracefulStop):
        """As if SIGTERM arrived during step 5."""
        steps = 0

        @property
        def requested(self):
            StopAtStep5.steps += 1
            return StopAtStep5.steps >= 5

        @requested.setter
        def requested(self, value):
            pass

    closed = []
    close = tracking.TensorBoardTracker.close
    monkeypatch.setattr(run_module, "GracefulStop", StopAtStep5)
    monkeypatch.setattr(tracking.TensorBoardTracker, "close", lambda self: closed.append(close(self)))
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as stopped:
        cli(sft_args(tiny_model, assets, out, "--report-to", "tensorboard", "--no-progress"))
    assert stopped.value.code == 0 and len(closed) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    cli(sft_args(tiny_model, assets, out, "--report-to", "tensorboard", "--no-progress", "--resume"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(logged_losses(out), rel=1e-6)
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 13))
