"""alignkit ppo: reward rises on a toy reward model; the plumbing that silently breaks RLHF (ratio == 1
and KL == 0 before any update, masks, adaptive KL, resume, value variants, LoRA) is checked directly."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignkit.cli import run as cli
from alignkit.logprobs import completion_logps, pack_completions
from alignkit.losses import gae
from alignkit.recipes.ppo import (ActorCritic, adaptive_kl_coef, completion_token_logps, kl_shaped_rewards,
                                  pack_rollout, token_scores)
from helpers import PerturbedEngine, make_reward_model, read_metrics, run_torchrun


@pytest.fixture(scope="module")
def toy(tiny_model, assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    prompts = root / "prompts.jsonl"
    lines = (assets / "instructions.jsonl").read_text().splitlines()[:64]
    prompts.write_text("".join(json.dumps({"prompt": json.loads(l)["messages"][:1]}) + "\n" for l in lines))
    return {"model": tiny_model, "rm": make_reward_model(tiny_model, root / "rm"), "prompts": prompts}


def ppo(toy, out, *extra):
    return cli(["ppo", "--model", str(toy["model"]), "--reward-model", str(toy["rm"]), "--data", str(toy["prompts"]),
                "--output", str(out), "--max-new-tokens", "3", "--kl-coef", "0.01", "--no-progress", *extra])


def steps(out):
    return [r for r in read_metrics(out) if not r.get("final")]


def assert_no_drift_before_first_update(rows):
    """Old log-probs come from the policy that is about to be updated: the first update of every step sees
    ratio == 1 exactly; and the policy equals the reference at step 1, so the KL is exactly 0."""
    assert rows[0]["kl"] == 0.0
    for r in rows:
        assert r["approx_kl_per_update"][0] == 0.0 and r["clip_frac_per_update"][0] == 0.0, r
    assert max(r["approx_kl_per_update"][-1] for r in rows) > 0  # later updates do move the policy


def test_ppo_raises_reward_with_value_model_from_rm(toy, tmp_path):
    out = tmp_path / "run"
    final = ppo(toy, out, "--max-steps", "15", "--batch-size", "8", "--group-size", "8", "--mini-batch-size", "32",
                "--lr", "3e-3")
    rows = steps(out)
    rewards = [r["reward_mean"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.8, rewards  # per-token score std is 1
    assert_no_drift_before_first_update(rows)
    assert all(len(r["approx_kl_per_update"]) == 4 * 2 for r in rows)  # 4 epochs x 2 mini-batches
    assert rows[-1]["kl"] > 0.1 and rows[-1]["entropy"] < rows[0]["entropy"]
    assert {"reward_with_penalty", "kl_coef", "clip_frac", "approx_kl", "value_loss", "policy_loss", "completion_length",
            "clipped_ratio", "completions_per_s", "lr"} <= rows[0].keys()
    assert final["completions"] == 15 * 64 and final["tokens"] > 15 * 64 * 4 * 3
    # Outputs: the policy as an HF causal LM, the value model (initialised from the RM) as its own directory.
    AutoModelForCausalLM.from_pretrained(out)
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    rm = AutoModelForSequenceClassification.from_pretrained(toy["rm"])
    assert not torch.equal(value.score.weight, rm.score.weight)  # trained, and the RM left untouched


def value_weights(out):
    if (out / "value_head.safetensors").is_file():
        return load_file(str(out / "value_head.safetensors"))["weight"]
    return AutoModelForSequenceClassification.from_pretrained(out / "value_model").score.weight.detach()


@pytest.mark.parametrize("value", ["head", "model"])
def test_resume_reproduces_trajectory_with_value_state_and_adaptive_kl(toy, tmp_path, value):
    out = tmp_path / "run"
    variant = ["--value-head"] if value == "head" else ["--value-model", str(toy["model"])]  # fresh score head
    args = ["--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--group-size", "2", "--lr", "3e-3",
            "--target-kl", "10", "--kl-horizon", "40", "--ppo-epochs", "2", *variant]
    whole = ppo(toy, out, *args)
    uninterrupted, trained_values = steps(out), value_weights(out)
    if value == "head":
        assert trained_values.abs().sum() > 0  # zero-initialised, trained jointly with the policy
    assert_no_drift_before_first_update(uninterrupted)
    # KL (~0.01) far below the target: kl_coef falls by the clipped 20% x (8 completions / horizon 40).
    coefs = [r["kl_coef"] for r in uninterrupted]
    assert coefs == pytest.approx([0.01 * 0.96**k for k in range(4)])
    # Lose the last checkpoint (as if killed after step 2), resume: same samples, same updates, same kl_coef.
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # value state lives inside it
    final = ppo(toy, out, *args, "--resume")
    assert (final["completions"], final["tokens"]) == (whole["completions"], whole["tokens"])  # whole-run totals
    resumed = steps(out)
    keys = ["reward_mean", "kl", "kl_coef", "value_loss", "policy_loss", "entropy", "completion_length"]
    assert len(resumed) == 4
    assert [r[k] for r in resumed for k in keys] == pytest.approx([r[k] for r in uninterrupted for k in keys], abs=1e-6)
    assert torch.allclose(value_weights(out), trained_values, atol=1e-6)


def test_adaptive_kl_controller_direction():
    assert adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=100, n=10) == pytest.approx(0.1 * 1.02)  # +20% clip
    assert adaptive_kl_coef(0.1, kl=6.6, target=6.0, horizon=100, n=10) == pytest.approx(0.1 * 1.01)
    assert adaptive_kl_coef(0.1, kl=0.0, target=6.0, horizon=100, n=10) == pytest.approx(0.1 * 0.98)  # -20% clip
    assert adaptive_kl_coef(0.1, kl=6.0, target=6.0, horizon=100, n=10) == pytest.approx(0.1)


def test_lora_reference_is_the_base_and_only_adapters_train(toy, tmp_path):
    out = tmp_path / "lora"
    ppo(toy, out, "--max-steps", "3", "--batch-size", "4", "--group-size", "2", "--lr", "1e-2", "--lora-r", "4",
        "--value-head", "--ppo-epochs", "2", "--temperature", "0.7")
    rows = steps(out)
    # Adapters start at B = 0: policy == base == reference. Old, reference and new log-probs all use
    # logits / temperature (the sampler's distribution), else the first ratio would not be 1.
    assert_no_drift_before_first_update(rows)
    assert rows[-1]["kl"] != 0.0
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # only adapter weights are saved (the base is frozen)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert load_file(str(out / "value_head.safetensors"))["weight"].abs().sum() > 0


def test_padding_and_neighbours_do_not_change_logps_values_scores_or_advantages(toy):
    """A rollout's log-probs, values, RM score and GAE advantages are the same whether it is alone in its
    batch or next to a longer neighbour (longer prompt and completion), and whatever the layout width."""
    from alignkit.models import load_causal_lm

    tok = AutoTokenizer.from_pretrained(toy["model"])
    policy = load_causal_lm(toy["model"]).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(toy["rm"]).eval()
    head = torch.nn.Linear(policy.config.hidden_size, 1)  # random: values vary with the hidden state
    prompt, completion = [5, 6, 7, 8], [40, 41, tok.convert_tokens_to_ids("<|im_end|>")]
    other = ([9, 10, 11, 12, 13, 14, 15], [50, 51, 52, 53, 54, 55])
    for critic in (ActorCritic(policy, value_head=head), ActorCritic(policy, value_model=rm)):
        with torch.no_grad():
            alone = pack_rollout([prompt], [completion], 3, tok.pad_token_id, "cpu")
            mixed = pack_rollout([prompt, other[0]], [completion, other[1]], 6, tok.pad_token_id, "cpu")
            (la, _, va), (lm, _, vm) = critic(alone), critic(mixed)
            sa = token_scores(rm, alone["input_ids"], alone["attention_mask"])[0, alone["last"][0]]
            sm = token_scores(rm, mixed["input_ids"], mixed["attention_mask"])[0, mixed["last"][0]]
        logps_a, logps_m = la[0], lm[0, :3]
        assert torch.allclose(logps_a, logps_m, atol=1e-5) and torch.allclose(va[0], vm[0, :3], atol=1e-5)
        # ... and they are the log-probs of the right tokens: those of the project's shifting helper.
        _, _, shifted = completion_logps(policy, pack_completions([prompt], [completion], tok.pad_token_id))
        assert torch.allclose(logps_a, shifted[0, len(prompt) - 1:], atol=1e-6)
        assert torch.allclose(sa, sm, atol=1e-5)
        # The score sits on the last completion token; padding (and what a neighbour leaves there) is inert.
        mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        kl = torch.randn(2, 6)
        rewards = kl_shaped_rewards(torch.tensor([sm, 2.0]), kl, mask, 0.1)
        assert torch.equal(rewards[0, 3:], torch.zeros(3)) and rewards[0, 2] == pytest.approx(sm - 0.1 * kl[0, 2])
        garbage = torch.where(mask, vm, 1e6)  # values beyond the mask must not leak into advantages
        adv_m, ret_m = gae(rewards, garbage, mask, 1.0, 0.95)
        adv_a, ret_a = gae(kl_shaped_rewards(sa[None], kl[:1, :3], mask[:1, :3], 0.1), va, mask[:1, :3], 1.0, 0.95)
        assert torch.allclose(adv_a[0], adv_m[0, :3], atol=1e-5) and torch.equal(adv_m[0, 3:], torch.zeros(3))
    # The reference forward (completion_token_logps) is the policy forward without the value function.
    ref_logps = completion_token_logps(policy, mixed, 1.0)[0]
    assert torch.equal(ref_logps.detach(), lm)


def test_two_process_ddp_runs(toy, tmp_path):
    """torchrun smoke run: each rank samples its own prompts; metrics and totals are global (ranks sample
    with different seeds and whiten per process, so there is no single-process trajectory to compare)."""
    out = tmp_path / "ddp"
    r = run_torchrun("ppo", "--model", str(toy["model"]), "--reward-model", str(toy["rm"]),
                        "--data", str(toy["prompts"]), "--output", str(out), "--max-steps", "2", "--batch-size", "4",
                        "--group-size", "2", "--mini-batch-size", "4", "--grad-accum", "2", "--max-new-tokens", "3",
                        "--lr", "3e-3", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = steps(out)
    assert_no_drift_before_first_update(rows)  # approx_kl >= 0, so a global 0 means 0 on both ranks
    assert len(rows[0]["approx_kl_per_update"]) == 4 * 2  # 8 completions per rank in mini-batches of 4
    assert read_metrics(out)[-1]["completions"] == 2 * 2 * 8


def test_bad_reward_models_are_reported(toy, tmp_path):
    with pytest.raises(SystemExit, match="not a reward model"):
        cli(["ppo", "--model", str(toy["model"]), "--reward-model", str(toy["model"]), "--data", str(toy["prompts"]),
             "--output", str(tmp_path / "a"), "--no-progress"])
    nan_rm = make_reward_model(toy["model"], tmp_path / "nan_rm", nan=True)
    with pytest.raises(SystemExit, match=r"(?s)reward model score nan for prompt .*completion"):
        cli(["ppo", "--model", str(toy["model"]), "--reward-model", str(nan_rm), "--data", str(toy["prompts"]),
             "--output", str(tmp_path / "b"), "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "3",
             "--no-progress"])


def test_value_model_from_a_causal_lm_is_said_once_without_a_load_report(toy, tmp_path, capfd):
    """A value model may start from a causal LM (its score head is new, as expected): one plain line says so,
    and transformers' LOAD REPORT listing score.weight as MISSING does not appear."""
    ppo(toy, tmp_path / "run", "--max-steps", "1", "--batch-size", "2", "--ppo-epochs", "1",
        "--value-model", str(toy["model"]))
    out = capfd.readouterr()
    assert out.out.count("score head is new") == 1
    assert "LOAD REPORT" not in out.out + out.err and "MISSING" not in out.out + out.err


def prepared_models(monkeypatch) -> list[str]:
    """Class names of the models that go through `models.prepare` (--autocast, --compile), wherever it is imported."""
    from alignkit import models

    original, seen = models.prepare, []

    def spy(model, cfg):
        seen.append(type(models.unwrap(model)).__name__)
        return original(model, cfg)

    for name, module in list(sys.modules.items()):
        if name.startswith("alignkit") and getattr(module, "prepare", None) is original:
            monkeypatch.setattr(module, "prepare", spy)
    return seen


def test_every_model_is_prepared_policy_reference_reward_and_value(toy, tmp_path, monkeypatch):
    prepared = prepared_models(monkeypatch)
    ppo(toy, tmp_path / "run", "--max-steps", "1", "--batch-size", "2", "--ppo-epochs", "1")
    assert sorted(prepared) == ["LlamaForCausalLM"] * 2 + ["LlamaForSequenceClassification"] * 2


def test_truncated_importance_sampling_with_a_perturbed_engine(toy, tmp_path, monkeypatch):
    """ppo --tis-cap with an engine sampling from a noisy copy of the policy (its log-probs at ppo's
    --temperature): the weights differ from 1, some are capped, and they change the policy loss."""
    import alignkit.recipes.ppo as ppo_recipe

    def build(cfg, model, tokenizer, model_dir, **kw):
        return PerturbedEngine(model_dir, tokenizer, noise=1.0, logps_temperature=cfg.temperature)

    monkeypatch.setattr(ppo_recipe, "build_engine", build)
    common = ("--max-steps", "2", "--batch-size", "4", "--group-size", "2", "--ppo-epochs", "1", "--temperature", "0.8")
    ppo(toy, tmp_path / "tis", *common, "--tis-cap", "1.2")
    ppo(toy, tmp_path / "plain", *common)
    tis, plain = steps(tmp_path / "tis"), steps(tmp_path / "plain")
    # E_engine[p_trainer / p_engine] = 1, so the mean weight moves off 1 only through the cap
    assert all(r["tis_weight_mean"] <= 1.2 for r in tis) and any(r["tis_weight_mean"] < 0.999 for r in tis), tis
    assert all(0 < r["tis_capped_frac"] < 1 for r in tis), tis
    assert tis[0]["reward_mean"] == plain[0]["reward_mean"]  # the same samples
    assert abs(tis[0]["policy_loss"] - plain[0]["policy_loss"]) > 1e-5
    assert "tis_weight_mean" not in plain[0]
