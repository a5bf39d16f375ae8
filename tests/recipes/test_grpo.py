"""alignkit grpo on a toy problem: the reward goes up, and the plumbing holds (first ratio == 1, loss ==
-mean advantage, zero-variance groups give no update, KL == 0 at step 1, padding/EOS masking, errors
name the sample, resume and 2-process DDP reproduce the trajectory)."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import run as cli
from alignkit.losses import group_advantages
from alignkit.models import load_tokenizer, stop_token_ids
from helpers import PerturbedEngine, read_metrics, run_cli, run_torchrun

G = 8


@pytest.fixture()
def toy(tmp_path):
    """16 chat prompts, and reward modules in files: `low_ids` (fraction of completion tokens with id < 128:
    dense, easy to learn), `recorded` (the same, also logging rewards and completion ids), `constant`,
    `fragile` (raises on the prompt that says boom)."""
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}], "answer": str(i)} for i in range(16)]
    rows[5]["prompt"][0]["content"] = "boom"
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "rewards.log"
    (tmp_path / "rw.py").write_text(f"""
import json
def low_ids(prompts, completions, completion_ids, **kw):
    return [sum(t < 128 for t in ids) / max(1, len(ids)) for ids in completion_ids]
def recorded(prompts, completions, completion_ids, **kw):
    r = low_ids(prompts, completions, completion_ids)
    with open({str(log)!r}, "a") as f:
        f.write(json.dumps({{"rewards": r, "ids": completion_ids}}) + "\\n")
    return r
def constant(prompts, completions, **kw):
    return [1.0] * len(completions)
def fragile(prompts, completions, **kw):
    return [1 / 0 if p[0]["content"] == "boom" else 1.0 for p in prompts]
""")
    return tmp_path


@pytest.fixture(scope="module")
def stopping_model(tiny_model, tmp_path_factory):
    """The tiny model with its stop-token embeddings scaled up (x16), so that about 40% of 12-token samples
    end with a stop token: completions of varied lengths, some ended, some truncated."""
    from alignkit.models import load_causal_lm, save_model

    model, tok = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    with torch.no_grad():
        model.get_input_embeddings().weight[stop_token_ids(tok)] *= 16
    out = tmp_path_factory.mktemp("stopping") / "model"
    save_model(model, tok, out)
    return out


def grpo_args(model, toy, out, *extra, reward="low_ids"):
    return ["grpo", "--model", str(model), "--data", str(toy / "prompts.jsonl"),
            *(["--output", str(out)] if out else []), "--reward", f"{toy / 'rw.py'}:{reward}", "--batch-size", "2", "--group-size", str(G),
            "--max-new-tokens", "12", "--max-length", "64", "--lr", "3e-2", "--no-progress", *extra]


def steps(out):
    return [r for r in read_metrics(out) if not r.get("final")]


def test_grpo_raises_mean_reward(tiny_model, toy):
    out = toy / "out"
    final = cli(grpo_args(tiny_model, toy, out, "--max-steps", "10"))
    rows = steps(out)
    r = [row["reward_mean"] for row in rows]
    assert len(r) == 10
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.2, r  # random init starts near 128/512 = 0.25; per-step noise ~0.08
    assert {"reward_std", "reward/low_ids", "frac_zero_std", "completion_length", "clipped_ratio", "clip_frac",
            "completions_per_s", "loss", "lr"} <= rows[0].keys() and "kl" not in rows[0]
    assert final["completions"] == 10 * 2 * G and final["tokens"] > 0 and final["completions_per_s"] > 0
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()


@pytest.mark.parametrize("extra", [("--advantage", "rloo"), ("--advantage", "reinforce_pp"),
                                   ("--ratio-level", "sequence", "--clip-eps", "3e-4", "--num-iterations", "2")],
                         ids=["rloo", "reinforce_pp", "gspo"])
def test_the_other_estimators_raise_mean_reward(tiny_model, toy, extra):
    """RLOO's leave-one-out baseline, REINFORCE++'s batch-normalised advantages and GSPO's sequence ratio (with
    its small clip range and two updates per rollout, so the clip is active) learn the toy reward too."""
    out = toy / "out"
    cli(grpo_args(tiny_model, toy, out, "--max-steps", "16", *extra))
    r = [row["reward_mean"] for row in steps(out)]
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.15, r  # per-step noise ~0.08
    if "sequence" in extra:
        assert max(row["clip_frac"] for row in steps(out)) > 0  # the second update's ratios leave [1 -+ 3e-4]


def test_reinforce_pp_normalises_over_the_global_batch(tiny_model, toy, monkeypatch):
    """Under --advantage reinforce_pp the advantages of a step have mean 0 and std 1 over all its completions."""
    import alignkit.recipes.grpo as grpo

    seen = []
    real = grpo.compute_advantages
    monkeypatch.setattr(grpo, "compute_advantages", lambda cfg, run, rewards: seen.append(real(cfg, run, rewards)) or seen[-1])
    cli(grpo_args(tiny_model, toy, toy / "out", "--max-steps", "2", "--advantage", "reinforce_pp"))
    for a in seen:
        assert abs(a.mean().item()) < 1e-5 and abs(a.std().item() - 1) < 1e-3


@pytest.mark.parametrize("agg,extra", [
    ("token_mean", []),
    ("seq_mean_token_mean", ["--num-iterations", "2"]),
    ("seq_mean_token_sum_norm", ["--no-scale-rewards"]),
    ("token_mean", ["--mask-truncated", "--num-iterations", "2"]),
])
def test_first_iteration_ratio_is_one_and_loss_is_minus_mean_advantage(stopping_model, toy, agg, extra):
    """old_logps are the sampling policy's log-probs, so at the first update of every rollout batch the
    ratio is exactly 1 and the surrogate is -mean(advantage) under the chosen aggregation; the loss mask
    covers exactly the generated tokens up to and including the stop token."""
    out = toy / "out"
    cli(grpo_args(stopping_model, toy, out, "--max-steps", "3", "--loss-agg", agg, *extra, reward="recorded"))
    stops = set(stop_token_ids(load_tokenizer(stopping_model)))
    rows = steps(out)
    calls = [json.loads(line) for line in (toy / "rewards.log").read_text().splitlines()]
    assert len(calls) == len(rows) == 3
    for row, call in zip(rows, calls):
        ids = call["ids"]
        assert all(len(c) <= 12 and not (set(c[:-1]) & stops) for c in ids)  # nothing after a stop token
        lengths = torch.tensor([len(c) for c in ids], dtype=torch.float64)
        if "--mask-truncated" in extra:
            lengths *= torch.tensor([float(c[-1] in stops) for c in ids], dtype=torch.float64)
        adv = group_advantages(torch.tensor(call["rewards"]), G, normalize_std="--no-scale-rewards" not in extra).double()
        expected = {"token_mean": -(adv * lengths).sum() / lengths.sum().clamp(min=1),
                    "seq_mean_token_mean": -adv.mean(),
                    "seq_mean_token_sum_norm": -(adv * lengths).sum() / (len(ids) * 12)}[agg]
        assert row["loss"] == pytest.approx(expected.item(), abs=1e-6)
        assert row["completion_length"] == pytest.approx(sum(len(c) for c in ids) / len(ids))
        if "--num-iterations" not in extra:
            assert row["clip_frac"] == 0.0
    ended = [c[-1] in stops for call in calls for c in call["ids"]]
    assert 0 < sum(ended) < len(ended)  # varied lengths, ended and truncated: the formulas differ
    if agg != "seq_mean_token_mean":
        assert any(abs(r["loss"]) > 1e-3 for r in rows)


def test_zero_variance_groups_give_no_update(tiny_model, toy):
    out = toy / "out"
    cli(grpo_args(tiny_model, toy, out, "--max-steps", "2", reward="constant"))
    for row in steps(out):
        assert row["frac_zero_std"] == 1.0 and row["reward_std"] == 0.0
        assert row["loss"] == 0.0 and row["grad_norm"] == 0.0
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_is_zero_at_step_one_then_grows(tiny_model, toy, lora):
    out = toy / "out"
    cli(grpo_args(tiny_model, toy, out, "--max-steps", "3", "--beta", "0.1", *(["--lora-r", "4"] if lora else [])))
    kl = [row["kl"] for row in steps(out)]
    assert abs(kl[0]) < 1e-7 and kl[-1] > 1e-4, kl


def test_padding_does_not_change_the_loss(stopping_model, toy):
    """Micro-batches of 1 completion (no padding) and of all 16 (right-padded, different lengths) give the
    same trajectory: padded positions are out of the loss and the attention."""
    a, b = toy / "a", toy / "b"
    cli(grpo_args(stopping_model, toy, a, "--max-steps", "2", "--group-size", "4", "--mini-batch-size", "1"))
    cli(grpo_args(stopping_model, toy, b, "--max-steps", "2", "--group-size", "4"))
    ra, rb = steps(a), steps(b)
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], abs=1e-5)
    assert [r["reward_mean"] for r in ra] == pytest.approx([r["reward_mean"] for r in rb], abs=1e-6)
    assert any(r["completion_length"] < 12 for r in ra)  # some completions stopped early: rows were padded


def test_reward_error_names_the_sample_or_skips_the_step(tiny_model, toy):
    small = ["--max-steps", "2", "--batch-size", "8", "--group-size", "2"]  # the 16 prompts in 2 steps
    with pytest.raises(SystemExit, match=r"(?s)'fragile' failed on sample \d+ of 16.*ZeroDivisionError.*boom"):
        cli(grpo_args(tiny_model, toy, toy / "err", *small, reward="fragile"))
    final = cli(grpo_args(tiny_model, toy, toy / "skip", *small, "--skip-nonfinite", reward="fragile"))
    assert final["skipped_nonfinite_steps"] == 1


def test_resume_reproduces_uninterrupted_run(tiny_model, toy):
    ref, out = toy / "ref", toy / "resumed"
    whole = cli(grpo_args(tiny_model, toy, ref, "--max-steps", "3", "--group-size", "4"))
    cli(grpo_args(tiny_model, toy, out, "--max-steps", "3", "--group-size", "4", "--save-every", "2"))
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    resumed = cli(grpo_args(tiny_model, toy, out, "--max-steps", "3", "--group-size", "4", "--save-every", "2", "--resume"))
    assert (resumed["completions"], resumed["tokens"]) == (whole["completions"], whole["tokens"])  # whole-run totals
    a, b = steps(ref), steps(out)
    assert len(b) == 3
    for key in ("loss", "reward_mean", "completion_length", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key


def test_two_process_ddp_matches_grad_accum(tiny_model, toy):
    """Each process samples its prompt batch with the seed of that batch's position in the step, so 2
    processes x 1 prompt batch equal 1 process x 2 accumulated prompt batches (same prompts, same samples,
    global denominators)."""
    args = grpo_args(tiny_model, toy, None, "--max-steps", "3", "--mini-batch-size", "16",
                     "--loss-agg", "seq_mean_token_mean", "--lr", "1e-2")
    one, two = toy / "one", toy / "two"
    r = run_cli(*args, "--grad-accum", "2", "--output", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_torchrun(*args, "--output", str(two))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = steps(one), steps(two)
    assert len(a) == 3
    for key in ("loss", "reward_mean", "frac_zero_std", "completion_length", "grad_norm"):
        assert [x[key] for x in a] == pytest.approx([x[key] for x in b], abs=1e-5), key
    assert a[0]["reward_mean"] != a[-1]["reward_mean"]  # the policy moved, so equality means something


def test_causal_lm_is_refused_as_reward_model(tiny_model, toy):
    """A causal LM has no trained score head: scoring with it would reward random numbers (as ppo says)."""
    with pytest.raises(SystemExit, match="--reward-model .* is not a reward model.*alignkit reward"):
        cli(grpo_args(tiny_model, toy, toy / "out", "--max-steps", "1", "--reward-model", str(tiny_model)))


def test_reward_timeout_stops_a_hanging_reward_function(tiny_model, toy):
    (toy / "rw.py").write_text((toy / "rw.py").read_text() + """
import time
def hangs(prompts, completions, **kw):
    if any(p[0]["content"] == "boom" for p in prompts):
        time.sleep(10 ** 6)
    return [0.0] * len(prompts)
""")
    with pytest.raises(SystemExit, match=r"(?s)'hangs' did not return within 0.5 s.*on sample \d+ of 16.*boom"):
        cli(grpo_args(tiny_model, toy, toy / "out", "--max-steps", "2", "--batch-size", "8", "--group-size", "2",
                      "--reward-timeout", "0.5", reward="hangs"))  # the 16 prompts in 2 steps


def test_reward_model_is_prepared_as_the_policy(tiny_model, toy, monkeypatch):
    """--autocast/--compile apply to every model grpo trains or scores with: policy, reference, reward model."""
    from transformers import AutoModelForSequenceClassification

    from alignkit import models

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.save_pretrained(toy / "rm")
    load_tokenizer(tiny_model).save_pretrained(toy / "rm")
    original, prepared = models.prepare, []

    def spy(model, cfg):
        prepared.append(type(models.unwrap(model)).__name__)
        return original(model, cfg)

    for name, module in list(sys.modules.items()):
        if name.startswith("alignkit") and getattr(module, "prepare", None) is original:
            monkeypatch.setattr(module, "prepare", spy)
    cli(grpo_args(tiny_model, toy, toy / "out", "--max-steps", "1", "--beta", "0.1", "--reward-model", str(toy / "rm")))
    assert sorted(prepared) == ["LlamaForCausalLM"] * 2 + ["LlamaForSequenceClassification"]


def test_truncated_importance_sampling_with_a_perturbed_engine(tiny_model, toy, monkeypatch):
    """With an engine whose log-probs differ from the trainer's, --tis-cap weights the loss: the logged mean
    weight differs from 1, some tokens are capped, and the reward still rises."""
    import alignkit.recipes.grpo as grpo

    engines = []

    def build(cfg, model, tokenizer, model_dir, **kw):
        engines.append(PerturbedEngine(model_dir, tokenizer, noise=0.3))
        return engines[-1]

    monkeypatch.setattr(grpo, "build_engine", build)
    out = toy / "out"
    cli(grpo_args(tiny_model, toy, out, "--max-steps", "10", "--tis-cap", "1.5"))
    rows = steps(out)
    w, capped = [r["tis_weight_mean"] for r in rows], [r["tis_capped_frac"] for r in rows]
    assert all(abs(x - 1) > 1e-3 for x in w) and all(x <= 1.5 for x in w), w
    assert sum(capped) > 0 and all(c < 1 for c in capped), capped
    assert engines[0].seen and all(s.logps is not None for s in engines[0].seen)
    r = [row["reward_mean"] for row in rows]
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.2, r
    # the same first rollout (same engine noise, same seeds) without TIS: the weights are what changed the loss
    cli(grpo_args(tiny_model, toy, toy / "plain", "--max-steps", "1"))
    assert engines[1].seen[0].completion_ids == engines[0].seen[0].completion_ids
    assert abs(steps(toy / "plain")[0]["loss"] - rows[0]["loss"]) > 1e-4


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_trainer_logps_are_of_the_sampled_distribution(tiny_model, toy, monkeypatch, temperature):
    """At --temperature T the trainer scores completions under softmax(logits / T), what the engine sampled
    from: an engine that is the policy itself (no noise) and returns its log-probs at T gives every TIS
    weight 1 (log-probs of the raw logits give weights that differ from 1 at T = 0.5)."""
    import alignkit.recipes.grpo as grpo

    monkeypatch.setattr(grpo, "build_engine", lambda cfg, model, tokenizer, model_dir, **kw: PerturbedEngine(
        model_dir, tokenizer, noise=0.0, logps_temperature=cfg.temperature))
    out = toy / f"t{temperature}"
    cli(grpo_args(tiny_model, toy, out, "--max-steps", "2", "--tis-cap", "10", "--temperature", str(temperature)))
    for row in steps(out):
        assert row["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) and row["tis_capped_frac"] == 0, row


def test_tis_cap_needs_an_engine_with_its_own_logps(tiny_model, toy):
    res = run_cli(*grpo_args(tiny_model, toy, toy / "out", "--max-steps", "1", "--tis-cap", "2"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--tis-cap 2.0: --rollout-engine local" in res.stderr and "returns no log-probs" in res.stderr


def test_vllm_engine_without_cuda_is_one_clear_line(tiny_model, toy):
    res = run_cli(*grpo_args(tiny_model, toy, toy / "out", "--max-steps", "1", "--rollout-engine", "vllm"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--rollout-engine vllm: needs CUDA and vllm (pip install 'alignkit[vllm]'); this machine has" in res.stderr
    assert not (toy / "out" / "metrics.jsonl").exists()
