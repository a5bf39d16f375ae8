"""alignkit dpo: the intended effect on a toy problem, the reference pass, padding, and the
grad-accumulation / DDP / resume / LoRA invariants."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import run as cli
from alignkit.data import load_preference
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.recipes.dpo import pair_logps, reference_logps
from helpers import read_metrics, toy_preferences, run_cli, run_torchrun


@pytest.fixture(scope="module")
def pairs(assets, tmp_path_factory):
    return toy_preferences(assets, tmp_path_factory.mktemp("dpo") / "pairs.jsonl", slice(0, 320))


def dpo_args(model, data, out, *extra):
    return ["dpo", "--model", str(model), "--data", str(data), "--output", str(out), "--max-length", "64",
            "--lr", "3e-3", "--warmup-steps", "2", "--no-progress", *extra]


def rows(out):
    return [r for r in read_metrics(out) if not r.get("final")]


def traj(out):
    return [r["loss"] for r in rows(out)]


def test_sigmoid_dpo_starts_at_log2_then_raises_margin_and_chosen_probability(tiny_model, pairs, tmp_path):
    out = tmp_path / "dpo"
    final = cli(dpo_args(tiny_model, pairs, out, "--max-steps", "24", "--batch-size", "8"))
    r = rows(out)
    # Step 1: the precomputed reference log-probs equal the policy's, so every implicit reward is 0.
    assert r[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert r[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert sum(x["reward_margin"] for x in r[-5:]) / 5 > 0.5
    assert sum(x["reward_accuracy"] for x in r[-5:]) / 5 > 0.9
    assert final["pairs"] == 24 * 8 and final["tokens"] > 0 and final["pairs_per_s"] > 0
    assert {"chosen_logps", "rejected_logps", "chosen_length", "rejected_length", "pairs_per_s", "lr",
            "grad_norm"} <= r[0].keys()
    # The policy itself now puts more probability on the chosen answers (per token), less on rejected.
    tok = load_tokenizer(tiny_model)
    examples = load_preference([str(pairs)], tok, 64)[0][:64]
    with torch.no_grad():
        before = pair_logps(load_causal_lm(tiny_model).eval(), examples, tok.pad_token_id, "cpu")
        after = pair_logps(load_causal_lm(out).eval(), examples, tok.pad_token_id, "cpu")
    per_token = lambda logps, n: (logps / n).mean().item()  # noqa: E731
    assert per_token(after[0], after[2]) > per_token(before[0], before[2]) + 0.3
    assert per_token(after[1], after[3]) < per_token(before[1], before[3])


@pytest.mark.parametrize("loss", ["robust", "hinge", "ipo", "ln_dpo", "simpo"])
def test_other_losses_run_and_raise_the_margin(tiny_model, pairs, tmp_path, loss):
    extra = ["--label-smoothing", "0.1"] if loss == "robust" else []
    final = cli(dpo_args(tiny_model, pairs, tmp_path / loss, "--max-steps", "10", "--batch-size", "8",
                         "--loss", loss, *extra))
    r = rows(tmp_path / loss)
    assert all(math.isfinite(x["loss"]) for x in r) and final["pairs"] == 80
    first, last = r[0]["reward_margin"], sum(x["reward_margin"] for x in r[-3:]) / 3
    assert last > first + 0.02, (first, last)  # IPO and SimPO rewards are per token: small numbers
    assert r[-1]["loss"] < r[0]["loss"]


def test_rpo_term_keeps_chosen_answers_more_likely_than_plain_dpo(tiny_model, pairs, tmp_path):
    """--rpo-alpha adds an NLL term on chosen answers: at the same steps chosen log-probs end higher."""
    per_token = {}
    for name, extra in (("plain", []), ("rpo", ["--rpo-alpha", "1.0"])):
        cli(dpo_args(tiny_model, pairs, tmp_path / name, "--max-steps", "12", "--batch-size", "8", *extra))
        last = rows(tmp_path / name)[-4:]
        per_token[name] = sum(r["chosen_logps"] / r["chosen_length"] for r in last) / len(last)
    assert per_token["rpo"] > per_token["plain"] + 0.05, per_token
    with pytest.raises(SystemExit, match="rpo-alpha"):
        cli(dpo_args(tiny_model, pairs, tmp_path / "bad", "--rpo-alpha", "-1"))


def test_completion_logps_ignore_padding_and_other_rows(tiny_model, pairs):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    examples = load_preference([str(pairs)], tok, 64)[0]
    short = min(examples, key=lambda e: len(e.prompt_ids) + len(e.chosen_ids))
    long = max(examples, key=lambda e: len(e.prompt_ids) + len(e.chosen_ids))
    assert len(long.prompt_ids) + len(long.chosen_ids) > len(short.prompt_ids) + len(short.chosen_ids) + 5
    with torch.no_grad():
        alone = pair_logps(model, [short], tok.pad_token_id, "cpu")
        batched = pair_logps(model, [short, long], tok.pad_token_id, "cpu")
    for a, b in zip(alone, batched):
        assert a[0].item() == pytest.approx(b[0].item(), abs=1e-4)
    assert alone[2][0].item() == len(short.chosen_ids)  # length = completion tokens incl. end-of-turn


def test_grad_accum_matches_bigger_batch(tiny_model, pairs, tmp_path):
    cli(dpo_args(tiny_model, pairs, tmp_path / "a", "--max-steps", "6", "--batch-size", "4", "--no-group-by-length"))
    cli(dpo_args(tiny_model, pairs, tmp_path / "b", "--max-steps", "6", "--batch-size", "2", "--grad-accum", "2",
                 "--no-group-by-length"))
    a, b = traj(tmp_path / "a"), traj(tmp_path / "b")
    assert len(a) == 6 and a == pytest.approx(b, abs=1e-5)
    assert a[0] - min(a) > 0.05  # the runs train, so equal trajectories mean something


def test_precomputed_reference_equals_per_batch_reference(tiny_model, pairs, tmp_path):
    cli(dpo_args(tiny_model, pairs, tmp_path / "pre", "--max-steps", "4", "--batch-size", "4"))
    cli(dpo_args(tiny_model, pairs, tmp_path / "live", "--max-steps", "4", "--batch-size", "4", "--no-precompute-ref"))
    assert traj(tmp_path / "pre") == pytest.approx(traj(tmp_path / "live"), abs=1e-5)


def test_two_process_ddp_matches_one_process(tiny_model, pairs, tmp_path):
    args = dpo_args(tiny_model, pairs, tmp_path / "one", "--max-steps", "4", "--batch-size", "2")[1:]
    r = run_cli("dpo", *args, "--grad-accum", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    args = dpo_args(tiny_model, pairs, tmp_path / "two", "--max-steps", "4", "--batch-size", "2")[1:]
    r = run_torchrun("dpo", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = traj(tmp_path / "one"), traj(tmp_path / "two")
    assert len(a) == 4 and a == pytest.approx(b, abs=1e-5)
    assert a[0] - min(a) > 0.01
    assert read_metrics(tmp_path / "two")[-1]["pairs"] == 4 * 4


def test_resume_from_checkpoint_matches_uninterrupted(tiny_model, pairs, tmp_path):
    args = dpo_args(tiny_model, pairs, tmp_path / "ref", "--max-steps", "8", "--batch-size", "4")
    cli(args)
    out = tmp_path / "resumed"
    cli(dpo_args(tiny_model, pairs, out, "--max-steps", "8", "--batch-size", "4", "--save-every", "4"))
    # Pretend the run died after step 4: drop the final checkpoint, resume from step 4.
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    final = cli(dpo_args(tiny_model, pairs, out, "--max-steps", "8", "--batch-size", "4", "--resume"))
    a, b = traj(tmp_path / "ref"), traj(out)
    assert len(b) == 8 and a == pytest.approx(b, abs=1e-5)
    assert final["pairs"] == 8 * 4  # totals carry over the resume


def test_lora_trains_only_adapters_and_its_reference_is_the_base_model(tiny_model, pairs, tmp_path):
    peft = pytest.importorskip("peft")
    tok = load_tokenizer(tiny_model)
    examples = load_preference([str(pairs)], tok, 64)[0][:12]
    base = load_causal_lm(tiny_model)
    lora_model = peft.get_peft_model(load_causal_lm(tiny_model), peft.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # make the adapters matter, as after some training
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    idx = list(range(len(examples)))
    ref_lora = reference_logps(lora_model, examples, idx, tok.pad_token_id, 4, "cpu")
    ref_base = reference_logps(base, examples, idx, tok.pad_token_id, 4, "cpu")
    assert torch.allclose(ref_lora, ref_base, atol=1e-4)
    with torch.no_grad():
        policy = torch.stack(pair_logps(lora_model.eval(), examples, tok.pad_token_id, "cpu")[:2], 1).double()
    assert (policy - ref_base).abs().max() > 0.1  # adapters on: a different model, so the check can fail

    out = tmp_path / "lora"
    cli(dpo_args(tiny_model, pairs, out, "--max-steps", "8", "--batch-size", "8", "--lora-r", "4", "--lr", "1e-2"))
    r = rows(out)
    assert r[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and r[-1]["reward_margin"] > r[0]["reward_margin"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    trained = peft.AutoPeftModelForCausalLM.from_pretrained(out)
    weights = load_file(str(tiny_model / "model.safetensors"))
    for name, p in trained.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, weights[name.replace("base_model.model.", "").replace(".base_layer", "")]), name
