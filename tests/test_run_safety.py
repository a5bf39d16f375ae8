"""The output directory of a run: never mixed with another run's, resumed only with the same settings
and data, checked before any model loads; failed writes, partial metrics rows and stale temporary
checkpoints end in one line and leave nothing behind."""

import errno
import hashlib
import json
import shutil

import pytest

from alignkit.cli import main
from helpers import read_metrics, run_cli


def sft(model, data, out, *extra):
    return ["sft", "--model", str(model), "--data", str(data), "--output", str(out), "--max-length", "64",
            "--batch-size", "4", "--lr", "3e-3", "--no-progress", *extra]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def data(assets, tmp_path):
    path = tmp_path / "sft.jsonl"
    shutil.copy(assets / "instructions.jsonl", path)
    return path


@pytest.fixture
def finished(tiny_model, data, tmp_path, capsys):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    assert main(sft(tiny_model, data, out, "--max-steps", "4", "--save-every", "2")) == 0
    capsys.readouterr()
    return out


def test_rerun_into_another_runs_output_is_refused_and_changes_nothing(tiny_model, data, finished, capsys):
    before = {p.relative_to(finished): digest(p) for p in finished.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(sft(tiny_model, data, finished, "--max-steps", "2", "--lr", "1e-3")) == 1
    line = one_error_line(capsys)
    assert str(finished) in line and "--resume" in line and "--overwrite" in line
    after = {p.relative_to(finished): digest(p) for p in finished.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_a_model_directory_is_not_an_output(tiny_model, data, capsys):
    before = digest(tiny_model / "model.safetensors")
    assert main(sft(tiny_model, data, tiny_model, "--max-steps", "1")) == 1
    assert "already holds a run or model" in one_error_line(capsys)
    assert digest(tiny_model / "model.safetensors") == before


def test_overwrite_clears_the_previous_runs_checkpoints_metrics_and_model(tiny_model, data, finished, capsys):
    (finished / "notes.txt").write_text("mine")
    (finished / "tensorboard").mkdir()  # the old run's tracker files and report go too
    (finished / "tensorboard" / "events.out.tfevents.old").write_text("stale")
    (finished / "report.html").write_text("stale")
    assert main(sft(tiny_model, data, finished, "--max-steps", "1", "--overwrite")) == 0
    assert not (finished / "tensorboard").exists() and not (finished / "report.html").exists()
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["step-00000001"]
    assert [r["step"] for r in read_metrics(finished)] == [1, 1]  # the step row and the final row
    assert (finished / "model.safetensors").is_file() and (finished / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(tiny_model, data, finished, capsys):
    assert main(sft(tiny_model, data, finished, "--max-steps", "4", "--resume", "--overwrite")) == 1
    one_error_line(capsys)
    assert (finished / "checkpoints" / "step-00000004").is_dir()


@pytest.mark.parametrize("change, expected", [
    (["--lr", "1e-3"], ["lr 0.003 -> 0.001"]),
    (["--batch-size", "2", "--grad-accum", "2"], ["batch_size 4 -> 2", "grad_accum 1 -> 2"]),
    (["--max-length", "48"], ["max_length 64 -> 48"]),
    (["--schedule", "constant", "--warmup-steps", "0"], ["schedule cosine -> constant", "warmup_steps 10 -> 0"]),
    (["--max-steps", "6"], ["max_steps 4 -> 6"]),
    (["--seed", "1"], ["seed 0 -> 1"]),
    (["--lora-r", "4"], ["lora_r 0 -> 4"]),
])
def test_resume_refuses_other_settings_and_lists_them(tiny_model, data, finished, capsys, change, expected):
    shutil.rmtree(finished / "checkpoints" / "step-00000004")
    args = sft(tiny_model, data, finished, "--max-steps", "4", "--save-every", "2", "--resume")
    assert main(args + change) == 1
    line = one_error_line(capsys)
    assert "step-00000002" in line
    for difference in expected:
        assert difference in line
    assert not (finished / "checkpoints" / "step-00000004").exists()


def test_resume_refuses_changed_data_and_another_model(tiny_model, data, finished, tmp_path, capsys):
    shutil.rmtree(finished / "checkpoints" / "step-00000004")
    args = sft(tiny_model, data, finished, "--max-steps", "4", "--save-every", "2", "--resume")
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same file name, same records, other order
    assert main(args) == 1
    assert f"data {data} changed" in one_error_line(capsys)
    data.write_text("\n".join(lines) + "\n")
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    assert main(sft(other, data, finished, "--max-steps", "4", "--save-every", "2", "--resume")) == 1
    assert f"model {tiny_model} -> {other}" in one_error_line(capsys)
    # The same settings and data resume.
    assert main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(finished) if not r.get("final")] == [1, 2, 3, 4]


def test_resume_tolerates_a_partial_last_metrics_row(tiny_model, data, finished, capsys):
    shutil.rmtree(finished / "checkpoints" / "step-00000004")
    rows = (finished / "metrics.jsonl").read_text().splitlines()
    (finished / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n" + rows[3][:17])  # killed mid-write of step 4
    assert main(sft(tiny_model, data, finished, "--max-steps", "4", "--save-every", "2", "--resume")) == 0
    assert "partial last row" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(finished)] == [1, 2, 3, 4, 4]


def test_stale_temporary_checkpoints_are_removed(tiny_model, data, finished, capsys):
    stale = finished / "checkpoints" / ".tmp-step-00000009"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(sft(tiny_model, data, finished, "--max-steps", "4", "--save-every", "2", "--resume")) == 0
    assert not stale.exists()
    assert "half-written" in capsys.readouterr().out


def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(
        tiny_model, data, tmp_path, monkeypatch, capsys):
    from alignkit.train import checkpoint

    real_save_file, calls = checkpoint.save_file, []

    def full_at_second_save(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # a partly written file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_at_second_save)
    out = tmp_path / "full"
    args = sft(tiny_model, data, out, "--max-steps", "6", "--save-every", "2")
    assert main(args) == 1
    line = one_error_line(capsys)
    assert "no space left" in line and "step-00000004" in line and "--resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)  # space freed
    assert main(args + ["--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out and (out / "model.safetensors").is_file()


def test_unwritable_output_fails_before_the_model_loads(tiny_model, data, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    # The model directory does not exist either: the output is checked first.
    assert main(sft(tmp_path / "no-model", data, tmp_path / "a-file" / "out", "--max-steps", "1")) == 1
    line = one_error_line(capsys)
    assert "--output" in line and "a-file" in line


def test_read_only_output_fails_before_the_model_loads(tiny_model, data, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(sft(tmp_path / "no-model", data, ro / "out", "--max-steps", "1")) == 1
        assert "--output" in one_error_line(capsys)
    finally:
        ro.chmod(0o755)


# Flags: every numeric value checked with the flag's name, required flags required; one line, exit 1,
# nothing written to --output.
@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--lr", "-1e-3", "--lr must be > 0"),
    ("--epochs", "0", "--epochs must be > 0"),
    ("--grad-accum", "0", "--grad-accum must be >= 1"),
    ("--max-steps", "0", "--max-steps must be >= 1"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--adam-betas", "0.9 1.5", "--adam-betas must be two numbers in [0, 1)"),
    ("--min-lr-ratio", "2", "--min-lr-ratio must be between 0 and 1"),
])
def test_numeric_flags_are_validated_with_their_name(tiny_model, data, tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    assert main(sft(tiny_model, data, out, flag, *value.split())) == 1
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_invalid_flag_through_the_cli_is_one_line(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    r = run_cli(*sft(tiny_model, data, out, "--batch-size", "0"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: --batch-size must be >= 1 (got 0)"]
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["sft", "--data", "x.jsonl"], "--model is required"),
    (["dpo", "--data", "x.jsonl"], "--model is required"),
    (["generate", "--prompt", "hi"], "--model is required"),
    (["chat"], "--model is required"),
    (["sft", "--model", "m"], "--data is required"),
    (["pretrain", "--model", "m"], "--data is required"),
])
def test_required_flags_are_required(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, "--output", str(out)] if argv[0] != "chat" else argv) == 1
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_device_cuda_without_cuda_is_one_line(tiny_model, data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    r = run_cli(*sft(tiny_model, data, out, "--max-steps", "1", "--device", "cuda"))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "--device cuda: CUDA is not available" in r.stderr
    assert not out.exists()


def test_a_cuda_index_that_does_not_exist_is_a_user_error(monkeypatch):
    import torch

    from alignkit.errors import UserError
    from alignkit.train import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="no CUDA device 3"):
        dist.setup("cuda:3")
    with pytest.raises(UserError, match="--device gpu"):
        dist.setup("gpu")


def test_one_gpu_for_several_processes_is_a_user_error(monkeypatch):
    """Under torchrun, --device cuda:N would put every process of the machine on GPU N (nccl then fails or
    hangs); it is refused before any process group exists."""
    import torch

    from alignkit.errors import UserError
    from alignkit.train import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"--device cuda:1 would put every process .* use --device cuda"):
        dist.setup("cuda:1")
    assert not torch.distributed.is_initialized()


# The command line itself.
def test_world_help_lists_its_commands(capsys):
    assert main(["world", "--help"]) == 0
    out = capsys.readouterr().out
    assert "unknown command" not in out and all(f"  {c} " in out for c in ("build", "eval", "run"))


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"alignkit {version('alignkit')}"


def test_saved_checkpoint_records_its_settings(finished):
    state = json.loads((finished / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["run"]["config"]["lr"] == 3e-3 and state["run"]["config"]["processes"] == 1
    assert any(key.startswith("data=") for key in state["run"]["files"])
