"""alignkit self-reward: an iteration changes the model and the next starts from it, a judge's preference is
learned over iterations, the policy judges itself by default, and a killed run continues where it stopped."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import read_metrics, run_torchrun

from alignkit.cli import main as cli_main
from alignkit.cli import run as cli
from alignkit.data import load_preference
from alignkit.models import load_causal_lm, load_tokenizer

WORDS = """
def words(prompts, completions, **kw):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(t.split())) for t in texts]
"""


@pytest.fixture()
def toy(tmp_path):
    chat = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}], "topic": f"item {i}"}
            for i in range(4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (tmp_path / "rw.py").write_text(WORDS)
    return tmp_path


def sr_args(model, toy, out, iterations=2, *extra):
    return ["self-reward", "--model", str(model), "--data", str(toy / "prompts.jsonl"), "--output", str(out),
            "--iterations", str(iterations), "--group-size", "4", "--batch-size", "2", "--max-new-tokens", "8",
            "--max-length", "64", "--keep-truncated", "--no-progress", "--dpo.max-steps", "2", "--dpo.lr", "1e-3",
            "--dpo.warmup-steps", "0", "--dpo.batch-size", "4", "--dpo.max-length", "64", *extra]


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(model_dir):
    return {k: v.clone() for k, v in load_causal_lm(str(model_dir), "float32").state_dict().items()}


def test_self_judged_iterations_chain(tiny_model, toy):
    """Default judge = the policy itself; iteration 1 trains the model, iteration 2 samples from and is
    referenced to iteration 1's model; OUTPUT/model is the last model; a rerun does nothing."""
    out = toy / "out"
    final = cli(sr_args(tiny_model, toy, out))
    start, w1, w2 = weights(tiny_model), weights(out / "iter-1" / "dpo"), weights(out / "iter-2" / "dpo")
    assert any(not torch.equal(start[k], w1[k]) for k in start), "iteration 1 left the model unchanged"
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "iteration 2 left the model unchanged"
    final_w = weights(out / "model")
    assert all(torch.equal(final_w[k], w2[k]) for k in w2)
    assert load_tokenizer(str(out / "model")) is not None and not (out / "model" / "metrics.jsonl").exists()

    import yaml
    dpo2 = yaml.safe_load((out / "iter-2" / "dpo" / "config.yaml").read_text())
    assert dpo2["model"] == str(out / "iter-1" / "dpo") and dpo2["ref_model"] is None  # ref = iteration start
    assert dpo2["lr"] == 1e-3 and dpo2["max_steps"] == 2  # the --dpo.* flags reached the DPO run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 2] and rows[-1]["final"] and final["iterations"] == 2
    assert rows[0]["start_model"] == str(tiny_model) and rows[1]["start_model"] == str(out / "iter-1" / "dpo")
    assert final["judge"] == "self"
    for r in rows[:2]:  # the policy's own pointwise judgement: scores in [1, 5], label mass recorded
        assert 1 <= r["score_worst"] <= r["score_mean"] <= r["score_best"] <= 5 and 0 < r["label_mass"] <= 1
        assert r["pairs"] + r["ties"] + r["no_pair"] == 4 and r["dpo_loss"] is not None

    samples = lines(out / "iter-1" / "samples.jsonl")
    assert len(samples) == 4 and all(len(s["completions"]) == len(s["scores"]) == len(s["ended"]) == 4
                                     for s in samples)
    assert [s["topic"] for s in samples] == [f"item {i}" for i in range(4)]  # extra columns kept
    pairs = lines(out / "iter-2" / "pairs.jsonl")
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    tok = load_tokenizer(str(tiny_model))
    examples, _ = load_preference([str(out / "iter-2" / "pairs.jsonl")], tok, 64)
    assert len(examples) == len(pairs)

    # iteration 2 sampled from iteration 1's model: the original model with iteration 2's seeds samples otherwise
    from alignkit.config import parse
    from alignkit.data import load_prompts
    from alignkit.judge import load_judge
    from alignkit.recipes.self_reward import SelfRewardConfig, sample_and_judge
    from alignkit.train.dist import Dist

    cfg = parse(SelfRewardConfig, sr_args(tiny_model, toy, out)[1:])
    prompts, _ = load_prompts([str(toy / "prompts.jsonl")], tok, 56)
    model = load_causal_lm(str(tiny_model), "float32").eval()
    again = sample_and_judge(cfg, 2, model, tok, load_judge(cfg, model=model, tokenizer=tok), prompts,
                             [[0, 1], [2, 3]], [0, 1])
    assert [r["completions"] for r in again] != [s["completions"] for s in lines(out / "iter-2" / "samples.jsonl")]
    assert Dist().world_size == 1

    # OUTPUT/config.yaml is reusable with --config (the DPO options under dpo:)
    again_cfg = parse(SelfRewardConfig, ["--config", str(out / "config.yaml")])
    assert again_cfg.dpo == cfg.dpo and again_cfg.iterations == cfg.iterations == 2

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    final2 = cli(sr_args(tiny_model, toy, out))
    assert final2 == final  # done: the final row, nothing redone
    launch = ("config.yaml", ".files.json")  # each launch records its settings and input hashes
    assert {p: p.stat().st_mtime_ns for p in before if p.name not in launch} == \
        {p: t for p, t in before.items() if p.name not in launch}

    final3 = cli(sr_args(tiny_model, toy, out, 3))  # a larger --iterations adds iterations to the finished run
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 3] and final3["iterations"] == 3
    assert read_metrics(out)[:2] == rows[:2] and read_metrics(out)[2]["start_model"] == str(out / "iter-2" / "dpo")
    assert all(torch.equal(v, weights(out / "iter-3" / "dpo")[k]) for k, v in weights(out / "model").items())


def test_external_judges_pairwise_and_overwrite(tiny_model, toy):
    """A fixed --judge-model judges pairwise (round robin: scores are mean P(better) in [0, 1]); a run with
    other settings replaces the old one only with --overwrite."""
    out = toy / "out"
    final = cli(sr_args(tiny_model, toy, out, 1, "--judge-model", str(tiny_model), "--judge-mode", "pairwise"))
    assert final["judge"] == "llm"
    for s in lines(out / "iter-1" / "samples.jsonl"):
        assert all(0 <= x <= 1 for x in s["scores"]) and abs(sum(s["scores"]) - 2) < 1e-6  # 4 answers, 6 games
    first = (out / "iter-1" / "samples.jsonl").read_text()
    final = cli(sr_args(tiny_model, toy, out, 2, "--reward", f"{toy / 'rw.py'}:words", "--overwrite"))
    assert final["judge"] == "score" and [r["step"] for r in read_metrics(out)] == [1, 2, 2]
    assert (out / "iter-1" / "samples.jsonl").read_text() != first
    assert all(float(x).is_integer() for s in lines(out / "iter-1" / "samples.jsonl") for x in s["scores"])


def test_reward_judge_is_learned(tiny_model, toy):
    """With a judge that prefers longer answers (more words in the same token budget), three iterations
    raise the judged score and the completions' length."""
    out = toy / "out"
    chat = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}]} for i in range(8)]
    (toy / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    final = cli(sr_args(tiny_model, toy, out, 3, "--reward", f"{toy / 'rw.py'}:words", "--group-size", "8",
                        "--dpo.max-steps", "30", "--dpo.lr", "1e-2"))
    rows = [r for r in read_metrics(out) if not r.get("final")]
    assert final["judge"] == "score" and len(rows) == 3
    assert rows[-1]["score_mean"] > rows[0]["score_mean"] + 1.5, [r["score_mean"] for r in rows]
    assert rows[-1]["length_words"] > rows[0]["length_words"] + 1.5, [r["length_words"] for r in rows]
    assert final["score_mean_last"] == rows[-1]["score_mean"] and final["score_mean_first"] == rows[0]["score_mean"]
    assert all(r["label_mass"] == 1 for r in rows)  # a reward function puts all its mass on its score


def test_kill_and_resume(tiny_model, toy, capsys):
    """Killed after iteration 1 completes, the same command continues at iteration 2 and leaves iteration 1
    alone; metrics.jsonl reads as one run; other settings against the run are refused."""
    out = toy / "out"
    args = sr_args(tiny_model, toy, out, 3, "--dpo.max-steps", "6")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    marker = out / "iter-1" / ".complete"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    assert marker.exists(), err
    assert not (out / "iter-3" / ".complete").exists(), "the run finished before it was killed"
    iter1 = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "iter-1").rglob("*") if p.is_file()}

    assert cli_main([*args[:-2], "--dpo.max-steps", "5"]) == 1  # another setting against this run
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "dpo.max_steps 6 -> 5" in err, err

    final = cli(args)  # the same command again, in this process
    assert "continuing at iteration 2" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in iter1} == iter1  # iteration 1 not redone
    assert all((out / f"iter-{k}" / ".complete").exists() for k in (1, 2, 3))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 3] and rows[-1] == final
    assert final["pairs"] == sum(r["pairs"] for r in rows[:3])
    assert rows[2]["start_model"] == str(out / "iter-2" / "dpo")

    assert cli(args) == final and "nothing to do" in capsys.readouterr().out
    assert read_metrics(out) == rows

    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))  # killed before the final row
    shutil.rmtree(out / "model")
    again = cli(args)  # finishes the run: OUTPUT/model and the final row, no iteration redone
    assert {k: v for k, v in again.items() if k != "seconds_this_launch"} == \
        {k: v for k, v in final.items() if k != "seconds_this_launch"}
    assert read_metrics(out) == rows[:3] + [again] and (out / "model" / "config.json").is_file()
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in iter1} == iter1

    with (toy / "prompts.jsonl").open("a") as f:  # the data changed under the run
        f.write(json.dumps({"prompt": "Another prompt"}) + "\n")
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "data " in err and "changed since the run started" in err and err.strip().count("\n") == 0, err


@pytest.mark.parametrize("flags, message", [
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--dpo.lr", "-1"], "--dpo.lr must be > 0"),
])
def test_bad_flags_are_one_line_errors(tiny_model, toy, capsys, flags, message):
    out = toy / "out"
    assert cli_main(sr_args(tiny_model, toy, out, 2, *flags)) == 1
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
    assert not (out / "iter-1").exists()


def test_yaml_config_sets_dpo_options(tmp_path):
    from alignkit.config import parse
    from alignkit.recipes.self_reward import SelfRewardConfig

    (tmp_path / "c.yaml").write_text("iterations: 2\ndpo:\n  lr: 0.01\n  loss: ipo\n  adam_betas: [0.8, 0.9]\n")
    cfg = parse(SelfRewardConfig, ["--config", str(tmp_path / "c.yaml"), "--dpo.beta", "0.3"])
    assert (cfg.iterations, cfg.dpo.lr, cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.adam_betas) == (2, 0.01, "ipo", 0.3,
                                                                                           (0.8, 0.9))
    (tmp_path / "bad.yaml").write_text("dpo:\n  lrr: 0.01\n")
    with pytest.raises(SystemExit, match="unknown key.*dpo.lrr"):
        parse(SelfRewardConfig, ["--config", str(tmp_path / "bad.yaml")])


@pytest.mark.slow
def test_torchrun_two_processes_sample_as_one(tiny_model, toy):
    """Under torchrun, prompt batches are sampled and judged across 2 processes with the same seeds as one
    process, and the DPO step runs in the same process group (the loop goes on to iteration 2)."""
    one, two = toy / "one", toy / "two"
    cli(sr_args(tiny_model, toy, one, 1, "--dpo.batch-size", "2"))
    done = run_torchrun(*sr_args(tiny_model, toy, two, 2, "--dpo.batch-size", "2"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (two / "iter-1" / "samples.jsonl").read_text() == (one / "iter-1" / "samples.jsonl").read_text()
    assert (two / "iter-1" / "pairs.jsonl").read_text() == (one / "iter-1" / "pairs.jsonl").read_text()
    assert [r["step"] for r in read_metrics(two)] == [1, 2, 2] and (two / "model" / "config.json").is_file()
    assert not list((two / "iter-1").glob(".shard-*"))
