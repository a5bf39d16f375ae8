"""Invariants for the recipes the trajectory tests leave out: reward, KTO and LoRA runs resume onto the
uninterrupted trajectory (every metrics row, the final weights), and KTO, LoRA and pretraining with chat
--mid-data under 2-process DDP match 1 process with --grad-accum 2. Every run goes through the CLI, so
the recipes' insides are free to change."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import run as cli
from helpers import read_metrics, shuffled_answer_pairs, toy_preferences, run_torchrun

# Wall-clock fields differ between any two runs; everything else in a row is the trajectory.
TIMING = ("elapsed", "seconds")


def trajectory(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING and not k.endswith("_per_s")}
            for r in read_metrics(out) if not r.get("final")]


def weights(out) -> dict[str, torch.Tensor]:
    """The saved result: full weights, or the adapter of a LoRA run (plus any trained head)."""
    files = sorted(out.glob("*.safetensors"))
    assert files, f"no weights in {out}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def assert_same_rows(a: list[dict], b: list[dict], abs_tol: float):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), ra["step"]
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=abs_tol), (ra["step"], k)


def unpaired(assets, path, rows):
    """Desirable = the right answer, undesirable = its words shuffled, one of the two per prompt."""
    rng = random.Random(0)
    with path.open("w") as f:
        for prompt, good, bad in shuffled_answer_pairs(assets, rows):
            label = rng.random() < 0.5
            f.write(json.dumps({"prompt": prompt, "completion": good if label else bad, "label": label}) + "\n")
    return path


def chat_mid_data(assets, path):
    """The first instruction conversations, as chat --mid-data for pretraining."""
    path.write_text("".join((assets / "instructions.jsonl").read_text().splitlines(keepends=True)[:64]))
    return path


@pytest.fixture(scope="module")
def data(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("more")
    return {"pairs": toy_preferences(assets, root / "pairs.jsonl", slice(0, 64)),
            "unpaired": unpaired(assets, root / "unpaired.jsonl", slice(0, 64)),
            "sft": assets / "instructions.jsonl", "corpus": assets / "corpus.jsonl",
            "chat": chat_mid_data(assets, root / "chat.jsonl")}


def args_for(kind, model, data):
    common = ["--model", str(model), "--max-length", "64", "--lr", "3e-3", "--warmup-steps", "2", "--no-progress"]
    if kind == "reward":
        return ["reward", "--data", str(data["pairs"]), *common]
    if kind == "kto":
        return ["kto", "--data", str(data["unpaired"]), *common]
    if kind == "lora":  # LoRA SFT: the checkpoint holds adapters only, the base comes from --model again
        return ["sft", "--data", str(data["sft"]), *common, "--lora-r", "4", "--lr", "1e-2"]
    if kind == "lora_reward":  # adapters plus the new scalar head, which peft saves with them
        return [*args_for("reward", model, data), "--lora-r", "4", "--lr", "1e-2"]
    if kind == "mid_chat":  # pretraining whose decay stage mixes padded conversations into full text blocks
        return ["pretrain", "--data", str(data["corpus"]), *common, "--schedule", "wsd", "--decay-fraction", "0.5",
                "--mid-data", str(data["chat"]), "--mid-ratio", "0.5"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["reward", "kto", "lora", "lora_reward"])
def test_resume_after_a_crash_matches_uninterrupted(tiny_model, data, tmp_path, kind):
    args = [*args_for(kind, tiny_model, data), "--max-steps", "8", "--batch-size", "4", "--save-every", "4"]
    out = tmp_path / "run"
    cli([*args, "--output", str(out)])
    ref_rows, ref_weights = trajectory(out), weights(out)
    ref_final = read_metrics(out)[-1]
    assert len(ref_rows) == 8
    # Make it the state a SIGKILL during step 7 leaves: checkpoint 4, rows up to step 6, no step-8
    # checkpoint and no final weights.
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(out)
                                               if not r.get("final") and r["step"] <= 6))
    at_four = weights(out / "checkpoints" / "step-00000004")

    final = cli([*args, "--output", str(out), "--resume"])
    assert_same_rows(trajectory(out), ref_rows, abs_tol=1e-6)
    resumed = weights(out)
    assert resumed.keys() == ref_weights.keys()
    for k in ref_weights:
        assert torch.allclose(resumed[k], ref_weights[k], atol=1e-6), k
    # The comparison can fail: the 4 resumed steps moved the weights.
    assert any(not torch.allclose(at_four[k], ref_weights[k], atol=1e-4) for k in at_four if k in ref_weights)
    # Totals are the whole run's, not the resumed process's share.
    counts = [k for k in ("tokens", "pairs", "examples") if k in ref_final]
    assert counts and all(final[k] == ref_final[k] for k in counts)


@pytest.mark.parametrize("kind", ["mid_chat", *(pytest.param(k, marks=pytest.mark.slow) for k in ("kto", "lora"))])
def test_two_process_ddp_matches_one_process(tiny_model, data, tmp_path, kind):
    args = [*args_for(kind, tiny_model, data), "--max-steps", "4", "--batch-size", "4"]
    if kind != "mid_chat":
        args.append("--no-group-by-length")
    cli([*args, "--grad-accum", "2", "--output", str(tmp_path / "one")])
    r = run_torchrun(*args, "--output", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = trajectory(tmp_path / "one"), trajectory(tmp_path / "two")
    a, b = [x["loss"] for x in one], [x["loss"] for x in two]
    assert len(a) == 4 and a == pytest.approx(b, abs=1e-5)
    assert a[0] - min(a) > 0.005  # the runs train, so equal trajectories mean something
    if kind == "kto":  # the KL reference point is taken over the whole global batch, however it is split
        ka, kb = [x["kl"] for x in one], [x["kl"] for x in two]
        assert ka == pytest.approx(kb, abs=1e-5) and max(abs(k) for k in ka) > 1e-4
    if kind == "mid_chat":  # both fed the same conversations in the decay stage
        assert [x["mid_label_tokens"] for x in one] == [x["mid_label_tokens"] for x in two]
        assert [x["mid_rows"] for x in one] == [0, 0, 4, 4]
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
