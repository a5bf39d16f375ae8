"""alignkit bench: throughput after warm-up from per-step rows, failures name the run, and a tiny end-to-end
run (fixture built on the fly, every task, no peer) writes a plausible bench.json."""

import json
import sys

import pytest

from alignkit.bench.cli import alignkit_steps, drop_weights, peer_steps, run_process, throughput
from helpers import run_cli


def test_throughput_after_warmup():
    # Step 1 is slow (warm-up); steps 2-4 take 1 s each with 100, 200 and 300 tokens.
    rows = [{"step": s, "loss": 1.0, "tokens_per_s": tps, "elapsed": e}
            for s, tps, e in [(1, 10.0, 5.0), (2, 100.0, 6.0), (3, 200.0, 7.0), (4, 300.0, 8.0)]]
    rows.append({"step": 4, "final": True, "seconds": 8.1})
    steps = alignkit_steps(rows)
    assert [round(t) for _, t in steps] == [50, 100, 200, 300]
    m = throughput(steps, warmup=2)
    assert m["steps"] == 2 and m["seconds"] == pytest.approx(2.0) and m["units"] == pytest.approx(500)
    assert m["units_per_s"] == pytest.approx(250.0)
    # fixed units per step (pairs, completions), plus an amortised one-off pass of 2 s
    m = throughput(steps, warmup=1, per_step=8, extra_seconds=2.0)
    assert m["units"] == 24 and m["units_per_s"] == pytest.approx(24 / 5)
    # an exact per-step count wins over the rate-based estimate
    assert alignkit_steps([{**rows[0], "tokens": 42}])[0][1] == 42
    # the peer reports cumulative token counts
    assert peer_steps({"step_end": [1.0, 2.0, 4.0], "num_tokens": [10, 30, 60]}) == [(1.0, 10), (2.0, 20), (4.0, 30)]
    with pytest.raises(ValueError, match="warm-up"):
        throughput(steps, warmup=4)


def test_failed_run_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"(?s)sft/alignkit repeat 2 failed.*exit status 3.*boom"):
        run_process("sft/alignkit repeat 2", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); "
                                              "sys.exit(3)"], tmp_path / "run")


def test_drop_weights_keeps_logs_metrics_and_config(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    for name in ("stdout.txt", "stderr.txt", "metrics.jsonl", "config.yaml", "model.safetensors", "tokenizer.json"):
        (run / name).write_text("x")
    drop_weights(run)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl", "stderr.txt", "stdout.txt"]


@pytest.mark.parametrize("flag", ["--sft-batch-size", "--dpo-batch-size"])
def test_batch_size_below_one_is_refused(tmp_path, flag):
    r = run_cli("bench", "--fixture", str(tmp_path / "fx"), "--output", str(tmp_path / "out"), flag, "0")
    assert r.returncode != 0 and f"{flag} must be >= 1, got 0" in r.stderr
    assert not (tmp_path / "fx").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow  # 69 s of a suite at its 10-minute budget; `python -m pytest -m slow` runs it
def test_bench_end_to_end(tmp_path):
    out = tmp_path / "bench"
    r = run_cli("bench", "--fixture", str(tmp_path / "fx"), "--output", str(out), "--repeats", "1", "--no-compile",
                "--matmul-size", "1024", "--sft-warmup", "1", "--sft-steps", "2", "--dpo-warmup", "1",
                "--dpo-steps", "2", "--grpo-warmup", "1", "--grpo-steps", "1", "--sft-batch-size", "4", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\nbatch_size: 4\n" in (out / "runs" / "sft-alignkit-1" / "config.yaml").read_text()
    assert not list((out / "runs").glob("*/*.safetensors")) and not list((out / "runs").glob("*/checkpoints"))
    assert "building the benchmark fixture" in r.stdout
    report = json.loads((out / "bench.json").read_text())
    assert report["matmul_peak"]["flops_per_s"] > 0 and report["machine"]["torch"]
    for task, unit in [("sft", "tokens"), ("dpo", "pairs"), ("grpo", "completions")]:
        med = report["results"][task]["alignkit"]["median"]
        assert report["results"][task]["alignkit"]["repeats"][0]["unit"] == unit
        assert med["units_per_s"] > 0 and med["peak_rss_mb"] > 50, (task, med)
        assert 0 < med["fraction_of_peak"] < 1.5, (task, med)
        assert task in (out / "bench.txt").read_text()
    assert report["results"]["dpo"]["alignkit"]["median"]["units_per_s_train_only"] >= \
        report["results"]["dpo"]["alignkit"]["median"]["units_per_s"]


def test_real_shapes_have_their_published_sizes():
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.bench.fixture import shaped_config

    for shape, total, vocab in [("qwen2.5-0.5b", 494_032_768, 151_936), ("llama-3.2-1b", 1_235_814_400, 128_256)]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(shaped_config(shape))
        emb = model.get_input_embeddings().weight
        assert sum(p.numel() for p in model.parameters()) == total and emb.shape[0] == vocab
        assert model.get_output_embeddings().weight is emb  # tied, as published
    with pytest.raises(SystemExit, match="--shape gpt-9: unknown"):
        shaped_config("gpt-9")


def test_shaped_fixture_and_the_jobs_both_sides_run(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.bench.cli import alignkit_argv, check_fixture_shape, jobs_of, units
    from alignkit.bench.fixture import make_shaped

    # the qwen2.5-0.5b shape with its depth and width cut down: same files, same tokenizer, seconds to build
    info = make_shaped(tmp_path / "fx", "qwen2.5-0.5b", num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=4096)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fx" / "model")
    assert AutoConfig.from_pretrained(tmp_path / "fx" / "model").model_type == "qwen2"
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    for name in ("sft.jsonl", "pref.jsonl", "prompts.jsonl"):
        assert len((tmp_path / "fx" / name).read_text().splitlines()) == 64
    with pytest.raises(SystemExit, match="not the qwen2.5-0.5b shape .*hidden_size 64"):
        check_fixture_shape(tmp_path / "fx", "qwen2.5-0.5b")
    job = jobs_of("qwen2.5-0.5b")
    argv = alignkit_argv("grpo", tmp_path / "fx", 4, tmp_path / "out", job["grpo"], compile=False,
                         gradient_checkpointing=True)
    assert argv[argv.index("--batch-size") + 1] == "1" and argv[argv.index("--group-size") + 1] == "4"
    assert argv[argv.index("--max-new-tokens") + 1] == "32" and "--gradient-checkpointing" in argv
    assert units("dpo", job["dpo"]) == ("pairs", 2, 4) and units("sft", job["sft"]) == ("tokens", None, 2)
    assert units("grpo", jobs_of("tiny")["grpo"]) == ("completions", 16, 16)
