"""CLI smoke runs with the effect asserted: loss falls, outputs load with from_pretrained."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.cli import run as cli
from alignkit.data import load_sft
from alignkit.models import load_tokenizer
from alignkit.recipes.pretrain import mid_rows
from helpers import a, read_metrics, s, spans, u


def losses(out):
    return [r["loss"] for r in read_metrics(out) if not r.get("final")]


def test_pretrain_loss_falls_and_saves_hf_model(tiny_model, assets, tmp_path):
    out = tmp_path / "pt"
    cli(["pretrain", "--model", str(tiny_model), "--data", str(assets / "corpus.jsonl"), "--output", str(out),
         "--max-steps", "40", "--batch-size", "8", "--max-length", "64", "--lr", "3e-3", "--no-progress"])
    ls = losses(out)
    assert len(ls) == 40
    assert sum(ls[-5:]) / 5 < 0.6 * ls[0], ls  # random init starts near ln(V) = 6.2
    rows = read_metrics(out)
    assert {"step", "loss", "lr", "tokens_per_s"} <= rows[0].keys()
    assert rows[-1]["final"] is True and rows[-1]["tokens"] == 40 * 8 * 64 and rows[-1]["seconds"] > 0
    # Output is a normal HF directory; the saved weights are the trained ones.
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Ada Brook lives in", return_tensors="pt").input_ids
    ckpt = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-00000040")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ckpt(ids).logits)
    assert (out / "config.yaml").is_file()


def pretrain_args(model, assets, out, *extra):
    return ["pretrain", "--model", str(model), "--data", str(assets / "corpus.jsonl"), "--output", str(out),
            "--no-progress", *extra]


def fed_rows(out):
    return [r for r in read_metrics(out) if not r.get("final")]


def test_wsd_midtraining_mixes_second_source_in_decay(tiny_model, assets, tmp_path):
    mid = tmp_path / "mid.jsonl"
    mid.write_text("".join(json.dumps({"text": f"Note {i}: the quick brown fox."}) + "\n" for i in range(200)))
    out = tmp_path / "wsd"
    cli(pretrain_args(tiny_model, assets, out, "--max-steps", "10", "--batch-size", "4", "--max-length", "32",
                      "--schedule", "wsd", "--decay-fraction", "0.3", "--mid-data", str(mid), "--mid-ratio", "0.5",
                      "--warmup-steps", "2"))
    rows = fed_rows(out)
    # Counted from the rows fed to the model: 2 of the 4 blocks of each decay step are mid blocks, each
    # a full block of 31 next-token labels.
    assert [r["mid_rows"] for r in rows] == [0] * 7 + [2] * 3
    assert [r["mid_fraction"] for r in rows] == [0.0] * 7 + [0.5] * 3
    assert [r["mid_label_tokens"] for r in rows] == [31 * r["mid_rows"] for r in rows]
    assert all(r["label_tokens"] == 4 * 31 for r in rows)
    lrs = [r["lr"] for r in rows]
    assert lrs[2] == lrs[6] == pytest.approx(1e-3)  # stable stage at the default peak
    assert lrs[7] > lrs[8] > lrs[9]  # linear decay


def chat_mid_data(path, n=200, answer="The sky is blue."):
    """Conversations whose assistant turns are all the same answer, so every one has as many trained tokens."""
    path.write_text("".join(json.dumps({"messages": [u(f"Question {i}: what colour is the sky?"), a(answer)]}) + "\n"
                            for i in range(n)))
    return path


def test_chat_mid_rows_train_on_assistant_tokens_only(tiny_model, assets, tmp_path):
    tok = load_tokenizer(tiny_model)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [s("Be brief."), u("Hi?"), a("Hello."), u("Sky?"), a("Blue.")]}) + "\n"
                    + json.dumps({"instruction": "Add 2 and 3.", "output": "5."}) + "\n")
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": "one two three four five six seven"}) + "\n" for _ in range(60)))
    rows, tail, stats = mid_rows([str(text), str(chat)], tok, 128, strict=False)
    blocks, chats = rows[:-2], rows[-2:]
    assert blocks and all(len(b.input_ids) == 128 and all(b.loss_mask) for b in blocks)
    # One row per conversation, not packed with the text: it starts with its own first token.
    assert [spans(tok, c) for c in chats] == [["Hello.<|im_end|>", "Blue.<|im_end|>"], ["5.<|im_end|>"]]
    assert all(tok.decode(c.input_ids).startswith("<|im_start|>") for c in chats)
    assert stats.kept == 2 and stats.truncated == 0


def test_chat_mid_data_trains_in_the_decay_stage(tiny_model, assets, tmp_path):
    tok = load_tokenizer(tiny_model)
    chat = chat_mid_data(tmp_path / "chat.jsonl")
    example = load_sft([str(chat)], tok, 64)[0][0]
    answer_labels = sum(example.loss_mask[1:])  # the same for every conversation of the file
    out = tmp_path / "mid"
    final = cli(pretrain_args(tiny_model, assets, out, "--max-steps", "24", "--batch-size", "8", "--max-length", "64",
                              "--lr", "3e-3", "--schedule", "wsd", "--decay-fraction", "0.5", "--mid-data", str(chat),
                              "--mid-ratio", "0.5", "--warmup-steps", "2"))
    rows = fed_rows(out)
    assert [r["mid_rows"] for r in rows] == [0] * 12 + [4] * 12
    # What the model was fed: 4 full text blocks plus 4 conversations trained on their assistant tokens only.
    assert all(r["mid_label_tokens"] == r["mid_rows"] * answer_labels for r in rows)
    assert all(r["label_tokens"] == (8 - r["mid_rows"]) * 63 + r["mid_rows"] * answer_labels for r in rows)
    assert final["mid_data_rows"] == 200 and final["mid_truncated"] == 0
    losses_ = [r["loss"] for r in rows]
    assert sum(losses_[-3:]) / 3 < 0.7 * losses_[0]


def test_strict_makes_an_over_long_mid_conversation_an_error(tiny_model, assets, tmp_path):
    chat = chat_mid_data(tmp_path / "chat.jsonl", n=3)
    lines = chat.read_text().splitlines(keepends=True)
    lines[1] = json.dumps({"messages": [u("Tell me a long story."), a("and then " * 40)]}) + "\n"
    chat.write_text("".join(lines))
    args = pretrain_args(tiny_model, assets, tmp_path / "o", "--max-steps", "2", "--batch-size", "4", "--max-length",
                         "64", "--schedule", "wsd", "--mid-data", str(chat), "--mid-ratio", "0.5")
    with pytest.raises((SystemExit, ValueError), match=r"chat.jsonl:2: .*longer than max_length"):
        cli([*args, "--strict"])
    assert cli([*args, "--output", str(tmp_path / "lenient")])["mid_truncated"] == 1  # without it: cut and counted


def test_strict_without_chat_mid_data_is_refused(tiny_model, assets, tmp_path):
    with pytest.raises(SystemExit, match="--strict applies to chat --mid-data"):
        cli(pretrain_args(tiny_model, assets, tmp_path / "o", "--max-steps", "1", "--strict"))


def test_mid_data_requires_wsd(tiny_model, assets, tmp_path):
    with pytest.raises(SystemExit, match="--schedule wsd"):
        cli(["pretrain", "--model", str(tiny_model), "--data", str(assets / "corpus.jsonl"),
             "--mid-data", str(assets / "corpus.jsonl"), "--output", str(tmp_path / "x")])


def test_sft_loss_falls_and_generate_runs(tiny_model, assets, tmp_path):
    out = tmp_path / "sft"
    cli(["sft", "--model", str(tiny_model), "--data", str(assets / "instructions.jsonl"), "--output", str(out),
         "--max-steps", "80", "--batch-size", "8", "--max-length", "64", "--lr", "3e-3", "--no-progress"])
    ls = losses(out)
    assert sum(ls[-5:]) / 5 < 0.5 * ls[0], ls  # from a random init, on assistant tokens only
    final = read_metrics(out)[-1]
    assert final["final"] and final["tokens"] > 0 and final["dropped"] == 0
    rows = cli(["generate", "--model", str(out), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "8"])
    assert len(rows) == 1 and isinstance(rows[0]["completion"], str)


def test_missing_model_dir_is_a_clear_error(assets, tmp_path):
    with pytest.raises((SystemExit, OSError)) as e:
        cli(["sft", "--model", str(tmp_path / "nope"), "--data", str(assets / "instructions.jsonl"),
             "--output", str(tmp_path / "o")])
    assert "nope" in str(e.value)
