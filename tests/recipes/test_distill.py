"""alignkit distill: the student moves toward the teacher (forward KL, JSD with on-policy steps), reverse KL
with a teacher of padded embeddings, grad-accum equivalence, and one-line errors."""

import json
import os
import signal

import pytest
import torch

from alignkit import cli as alignkit_cli
from alignkit.cli import run as cli
from alignkit.data import load_sft
from alignkit.models import init_model, load_causal_lm, load_tokenizer, save_model
from alignkit.recipes import distill
from alignkit.recipes.distill import is_on_policy, prompt_of, tokenizer_difference
from alignkit.tokenizer import train_tokenizer
from helpers import read_metrics


def rows(out):
    return [r for r in read_metrics(out) if not r.get("final")]


@pytest.fixture(scope="module")
def teacher(tiny_model, assets, tmp_path_factory):
    """The tiny model after a little SFT: a different model of the same tokenizer as the fresh student."""
    out = tmp_path_factory.mktemp("distill") / "teacher"
    cli(["sft", "--model", str(tiny_model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
         "--max-steps", "30", "--batch-size", "8", "--max-length", "64", "--lr", "3e-3", "--no-progress"])
    return out


def distill_args(student, teacher, assets, out, *extra):
    return ["distill", "--model", str(student), "--teacher", str(teacher), "--data", str(assets / "instructions.jsonl"),
            "--output", str(out), "--max-length", "64", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
            "--no-progress", *extra]


@torch.no_grad()
def held_out_kl(student, teacher, assets, n=32):
    """Mean forward KL(teacher || student) per trained token on the last n examples of the data."""
    tok = load_tokenizer(student)
    examples, _ = load_sft([str(assets / "instructions.jsonl")], tok, 64)
    s, t = load_causal_lm(student), load_causal_lm(teacher)
    total = count = 0.0
    for ex in examples[-n:]:
        ids = torch.tensor([ex.input_ids])
        mask = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
        ls, lt = s(ids).logits[0, :-1].log_softmax(-1), t(ids).logits[0, :-1].log_softmax(-1)
        total += (lt.exp() * (lt - ls)).sum(-1)[mask].sum().item()
        count += mask.sum().item()
    return total / count


def test_forward_kl_moves_the_student_toward_the_teacher(tiny_model, teacher, assets, tmp_path):
    out = tmp_path / "kd"
    final = cli(distill_args(tiny_model, teacher, assets, out, "--max-steps", "12"))
    rs = rows(out)
    assert len(rs) == 12 and all(r["on_policy"] == 0 for r in rs)
    # At temperature 1 the forward-KL loss is the logged KL itself.
    assert all(r["loss"] == pytest.approx(r["kl_teacher_student"], rel=1e-5) for r in rs)
    assert sum(r["kl_teacher_student"] for r in rs[-3:]) / 3 < 0.7 * rs[0]["kl_teacher_student"]
    before, after = held_out_kl(tiny_model, teacher, assets), held_out_kl(out, teacher, assets)
    assert after < 0.5 * before, (before, after)
    assert final["on_policy_steps"] == 0 and final["examples"] == 420 and final["dropped"] == 0
    assert "# alignkit distill" in (out / "config.yaml").read_text()


def test_jsd_with_half_on_policy_steps_moves_the_student_toward_the_teacher(tiny_model, teacher, assets, tmp_path):
    out = tmp_path / "gkd"
    final = cli(distill_args(tiny_model, teacher, assets, out, "--max-steps", "12", "--loss", "jsd", "--beta", "0.5",
                             "--on-policy-fraction", "0.5", "--max-new-tokens", "12", "--seed", "3"))
    rs = rows(out)
    coins = [int(is_on_policy(3, step, 0.5)) for step in range(12)]
    assert [r["on_policy"] for r in rs] == coins and 0 < sum(coins) < 12
    assert final["on_policy_steps"] == sum(coins)
    # On-policy steps train on the samples: at most --max-new-tokens labels per sequence.
    assert all(r["label_tokens"] <= 8 * 12 for r, c in zip(rs, coins) if c)
    assert all(0 < r["loss"] <= 0.6932 for r in rs)  # the JSD at beta 1/2 is at most ln 2 per token
    before, after = held_out_kl(tiny_model, teacher, assets), held_out_kl(out, teacher, assets)
    assert after < 0.5 * before, (before, after)


def test_reverse_kl_runs_with_a_teacher_of_padded_embeddings(tiny_model, assets, tmp_path):
    """A teacher with 8 embedding rows more than the tokenizer has tokens: both distributions are taken over
    the tokenizer's ids (without the slice the shapes would not match)."""
    tok = load_tokenizer(tiny_model)
    padded = tmp_path / "padded"
    model = init_model("llama", "tiny", tok, seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    model.resize_token_embeddings(len(tok) + 8)
    save_model(model, tok, padded)
    assert load_causal_lm(padded).config.vocab_size == len(tok) + 8
    out = tmp_path / "rkl"
    cli(distill_args(tiny_model, padded, assets, out, "--max-steps", "3", "--loss", "reverse_kl", "--temperature", "2",
                     "--on-policy-fraction", "1", "--max-new-tokens", "6"))
    rs = rows(out)
    assert [r["on_policy"] for r in rs] == [1, 1, 1]
    assert all(0 < r["loss"] < 10 and 0 < r["kl_teacher_student"] < 10 for r in rs)


def test_grad_accum_matches_the_big_batch(tiny_model, teacher, assets, tmp_path):
    args = ("--max-steps", "4", "--no-group-by-length", "--loss", "jsd", "--beta", "0.3")
    cli(distill_args(tiny_model, teacher, assets, tmp_path / "a", *args))
    cli(distill_args(tiny_model, teacher, assets, tmp_path / "b", *args, "--batch-size", "4", "--grad-accum", "2"))
    a, b = [r["loss"] for r in rows(tmp_path / "a")], [r["loss"] for r in rows(tmp_path / "b")]
    assert len(a) == 4 and a == pytest.approx(b, abs=1e-5)
    assert a[0] - a[-1] > 0.01  # it trains, so equal trajectories mean something


def test_a_stopped_and_resumed_on_policy_run_follows_the_uninterrupted_one(tiny_model, teacher, assets, tmp_path,
                                                                            monkeypatch):
    """SIGTERM during step 3 checkpoints at its end; --resume flips the same coins and draws the same samples."""
    args = ("--max-steps", "6", "--batch-size", "4", "--loss", "jsd", "--on-policy-fraction", "0.5",
            "--max-new-tokens", "6")
    assert [int(is_on_policy(0, step, 0.5)) for step in range(6)] == [0, 1, 0, 1, 1, 0]  # on-policy on both sides
    cli(distill_args(tiny_model, teacher, assets, tmp_path / "ref", *args))
    real_step = distill.optimizer_step

    def sigterm_at_step_3(run, model, optimizer, loss, step, detail=""):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, model, optimizer, loss, step, detail)

    out = tmp_path / "stopped"
    monkeypatch.setattr(distill, "optimizer_step", sigterm_at_step_3)
    with pytest.raises(SystemExit) as stop:
        cli(distill_args(tiny_model, teacher, assets, out, *args))
    assert stop.value.code == 0 and len(rows(out)) == 3
    monkeypatch.undo()
    cli(distill_args(tiny_model, teacher, assets, out, *args, "--resume"))
    ref, resumed = rows(tmp_path / "ref"), rows(out)
    assert [r["on_policy"] for r in resumed] == [r["on_policy"] for r in ref]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in ref], abs=1e-6)


def test_the_prompt_of_an_example_is_the_context_of_its_last_response(tiny_model):
    tok = load_tokenizer(tiny_model)
    path = tiny_model.parent / "two_turns.jsonl"
    turns = [("user", "Hi?"), ("assistant", "Hello."), ("user", "Sky?"), ("assistant", "Blue.")]
    path.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    (ex,), _ = load_sft([str(path)], tok, 128)
    prompt = prompt_of(ex)
    assert tok.decode(prompt).endswith("Sky?<|im_end|>\n<|im_start|>assistant\n")
    assert "Hello." in tok.decode(prompt) and "Blue." not in tok.decode(prompt)


def test_tokenizers_differ_by_their_special_tokens_too(tiny_model):
    student, teacher = load_tokenizer(tiny_model), load_tokenizer(tiny_model)
    assert tokenizer_difference(student, teacher) is None
    teacher.pad_token = "<|im_end|>"
    assert tokenizer_difference(student, teacher) == "pad_token is '<|pad|>' in --model's, '<|im_end|>' in --teacher's"


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    """A tiny model of another tokenizer (trained on other text)."""
    tok = train_tokenizer([f"numbers {i} and {i * 7} and more words" for i in range(200)], vocab_size=300)
    out = tmp_path_factory.mktemp("other") / "model"
    save_model(init_model("llama", "tiny", tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128), tok, out)
    return out


@pytest.mark.parametrize("case", ["other_tokenizer", "fraction", "missing_teacher", "no_teacher", "temperature",
                                  "beta", "negative_beta"])
def test_bad_input_is_a_one_line_error(case, tiny_model, other_tokenizer_model, assets, tmp_path, capsys):
    out = tmp_path / "o"
    teacher, extra, expected = {
        "other_tokenizer": (other_tokenizer_model, (), [f"--teacher {other_tokenizer_model} and --model {tiny_model} "
                                                        "have different tokenizers: ", "token id", "--model's"]),
        "fraction": (tiny_model, ("--on-policy-fraction", "1.5"), ["--on-policy-fraction must be between 0 and 1"]),
        "missing_teacher": (tmp_path / "nope", (), ["--teacher: ", str(tmp_path / "nope"), "does not exist"]),
        "no_teacher": ("", (), ["--teacher is required"]),
        "temperature": (tiny_model, ("--temperature", "0"), ["--temperature must be > 0"]),
        "beta": (tiny_model, ("--loss", "jsd", "--beta", "1.5"), ["--beta must be between 0 and 1"]),
        "negative_beta": (tiny_model, ("--loss", "jsd", "--beta", "-0.5"), ["--beta must be >= 0"]),
    }[case]
    assert alignkit_cli.main(distill_args(tiny_model, teacher, assets, out, "--max-steps", "1", *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(e in err for e in expected), err
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()
