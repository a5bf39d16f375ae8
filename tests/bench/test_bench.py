"""alignkit bench: throughput after warm-up from per-step rows, failures name the run, and a tiny end-to-end
run (fixture built on the fly, every task, no peer) writes a plausible bench.json."""

import json
import sys

import pytest

from alignkit.bench.cli import alignkit_steps, peer_steps, run_process, throughput
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


@pytest.mark.slow  # 69 s of a suite at its 10-minute budget; `python -m pytest -m slow` runs it
def test_bench_end_to_end(tmp_path):
    out = tmp_path / "bench"
    r = run_cli("bench", "--fixture", str(tmp_path / "fx"), "--output", str(out), "--repeats", "1", "--no-compile",
                "--matmul-size", "1024", "--sft-warmup", "1", "--sft-steps", "2", "--dpo-warmup", "1",
                "--dpo-steps", "2", "--grpo-warmup", "1", "--grpo-steps", "1", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
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
