"""Every command's output is every command's input: a LoRA run's adapter directory (no --merge-lora) is
accepted wherever a model directory is (--model, --ref-model, --reward-model, generate, chat, world eval)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.cli import run as cli
from alignkit.data import load_sft
from alignkit.models import load_causal_lm, load_reward_model, load_tokenizer
from helpers import read_metrics, run_cli, spans, toy_preferences

peft = pytest.importorskip("peft")


def check(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def first_row(out):
    return next(r for r in read_metrics(out) if not r.get("final"))


def probe_logits(model, tok):
    ids = torch.tensor([tok.encode("Ada Brook lives in Marlow and plays the violin.")])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def runs(tiny_model, assets, tmp_path_factory):
    """A LoRA SFT run saved as adapters (high lr, so that it is a different model from its base)."""
    root = tmp_path_factory.mktemp("chains")
    pairs = toy_preferences(assets, root / "pairs.jsonl", slice(0, 16))
    sft = root / "sft"
    check(run_cli("sft", "--model", str(tiny_model), "--data", str(assets / "instructions.jsonl"), "--output", str(sft),
                  "--lora-r", "4", "--lr", "1e-2", "--warmup-steps", "0", "--max-steps", "4", "--batch-size", "4",
                  "--max-length", "64", "--no-progress"))
    assert (sft / "adapter_config.json").is_file() and not (sft / "config.json").exists()
    return {"root": root, "pairs": pairs, "sft": sft}


def dpo_args(model, data, out, *extra):
    return ["dpo", "--model", str(model), "--data", str(data), "--output", str(out), "--max-length", "64",
            "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "0", "--no-progress", *extra]


def test_adapter_dir_loads_as_its_base_with_the_adapters_merged(tiny_model, runs):
    tok = load_tokenizer(runs["sft"])
    expected = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(runs["sft"]))
    got = load_causal_lm(runs["sft"])
    torch.testing.assert_close(probe_logits(got, tok), probe_logits(expected.merge_and_unload(), tok))
    base = probe_logits(load_causal_lm(tiny_model), tok)
    assert (probe_logits(got, tok) - base).abs().max() > 0.05  # SFT changed the model: the checks below can fail
    assert not hasattr(got, "peft_config")  # a plain model: fast decoding, no adapter switch


def test_lora_sft_then_lora_dpo_then_generate(tiny_model, runs, tmp_path):
    dpo = tmp_path / "dpo"
    check(run_cli(*dpo_args(runs["sft"], runs["pairs"], dpo, "--lora-r", "4", "--max-steps", "2")))
    # Fresh adapters on the merged SFT model: the reference (adapters off) is the SFT model, so the
    # first step's implicit rewards are 0; the pre-SFT base as reference would give another loss.
    assert first_row(dpo)["loss"] == pytest.approx(math.log(2), abs=1e-5)
    config = json.loads((dpo / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(runs["sft"]) and not (dpo / "config.json").exists()

    # The DPO adapter loads as base + SFT adapters + DPO adapters, merged in that order.
    tok = load_tokenizer(dpo)
    sft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(runs["sft"]))
    expected = peft.PeftModel.from_pretrained(sft_model.merge_and_unload(), str(dpo)).merge_and_unload()
    torch.testing.assert_close(probe_logits(load_causal_lm(dpo), tok), probe_logits(expected, tok))

    out = tmp_path / "gen.jsonl"
    check(run_cli("generate", "--model", str(dpo), "--prompt", "Where does Ada live?", "--max-new-tokens", "8",
                  "--temperature", "1", "--output", str(out)))  # sampled: a greedy tiny model may stop at once
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["completion"][0]["role"] == "assistant" and row["completion"][0]["content"].strip()


def test_full_fine_tuning_from_an_adapter_dir_with_it_as_ref_model(runs, tmp_path):
    """No --lora-r: all weights of the merged model train; --ref-model given the same adapter directory
    is that same model, so the first step's implicit rewards are 0."""
    out = tmp_path / "dpo-full"
    check(run_cli(*dpo_args(runs["sft"], runs["pairs"], out, "--ref-model", str(runs["sft"]), "--max-steps", "1")))
    assert first_row(out)["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()


@pytest.fixture(scope="module")
def reward_adapter(runs):
    """A LoRA reward model trained from the SFT adapter directory: a SEQ_CLS adapter whose base is itself
    an adapter (of a causal LM), its score head in modules_to_save."""
    rm = runs["root"] / "rm"
    cli(["reward", "--model", str(runs["sft"]), "--data", str(runs["pairs"]), "--output", str(rm), "--lora-r", "4",
         "--lr", "1e-2", "--warmup-steps", "0", "--max-steps", "3", "--batch-size", "4", "--max-length", "64",
         "--no-progress"])
    config = json.loads((rm / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(runs["sft"])
    return rm


def test_reward_adapter_loads_as_the_trained_scorer(tiny_model, runs, reward_adapter):
    tok = load_tokenizer(reward_adapter)
    sft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(runs["sft"]))
    sft.merge_and_unload().save_pretrained(runs["root"] / "sft-merged")
    base = AutoModelForSequenceClassification.from_pretrained(runs["root"] / "sft-merged", num_labels=1)
    expected = peft.PeftModel.from_pretrained(base, str(reward_adapter)).merge_and_unload()
    got = load_reward_model(reward_adapter, pad_token_id=tok.pad_token_id)
    torch.testing.assert_close(got.score.weight, expected.score.weight)
    torch.testing.assert_close(probe_logits(got, tok), probe_logits(expected, tok))
    assert got.config.architectures == ["LlamaForSequenceClassification"]  # a trained scorer, not a random head
    with pytest.raises(Exception, match="reward model"):  # it scores; it does not generate
        load_causal_lm(reward_adapter)


def test_reward_adapter_as_reward_model_of_ppo_grpo_and_best_of_n(runs, reward_adapter, assets, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = (assets / "instructions.jsonl").read_text().splitlines()[:8]
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["messages"][:1]}) + "\n" for line in lines))
    common = ["--model", str(runs["sft"]), "--reward-model", str(reward_adapter), "--data", str(prompts),
              "--max-new-tokens", "3", "--no-progress"]
    cli(["ppo", *common, "--output", str(tmp_path / "ppo"), "--max-steps", "1", "--batch-size", "4"])
    assert "reward_mean" in first_row(tmp_path / "ppo")
    cli(["grpo", *common, "--output", str(tmp_path / "grpo"), "--max-steps", "1", "--batch-size", "2",
         "--group-size", "2", "--lora-r", "4", "--beta", "0.1"])
    assert first_row(tmp_path / "grpo")["step"] == 1
    final = cli(["best-of-n", *common, "--output", str(tmp_path / "bon"), "--num-samples", "2", "--batch-size", "4",
                 "--keep-truncated"])
    assert final["completions"] == 16 and (tmp_path / "bon" / "best.jsonl").is_file()


def test_world_eval_of_an_adapter_dir(runs, tmp_path):
    from alignkit.world.evaluate import EVAL_SETS

    world = tmp_path / "world"
    cli(["world", "build", "--output", str(world)])
    for name in EVAL_SETS:  # two questions per set keep it quick
        f = world / "eval" / f"{name}.jsonl"
        f.write_text("".join(f.read_text().splitlines(keepends=True)[:2]))
    metrics = cli(["world", "eval", "--model", str(runs["sft"]), "--world", str(world)])
    assert 0.0 <= metrics["near"]["arith_option_accuracy"] <= 1.0


def sft_args(model, data, out, *extra):
    return ["sft", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "1",
            "--batch-size", "2", "--max-length", "64", "--no-progress", *extra]


def test_generate_writes_sft_data_in_its_prompts_format(tiny_model, tmp_path):
    """Message-list prompts get an assistant message list (TRL's conversational prompt-completion), string
    prompts a string; the other columns stay, fields about other completions go; sft trains on the file."""
    chat = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}], "id": i} for i in range(3)]
    chat.append({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}], "id": 3})
    plain = [{"prompt": f"Item {i} is", "answer": str(i), "completion": "old"} for i in range(2)]
    for name, records in (("chat", chat), ("plain", plain)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        out = tmp_path / f"{name}-gen.jsonl"
        # sampled from the random model, so that no completion is empty (they would be left out)
        r = check(run_cli("generate", "--model", str(tiny_model), "--data", str(data), "--output", str(out),
                          "--max-new-tokens", "6", "--temperature", "1"))
        assert "had fields about other completions" in r.stderr and "were empty" not in r.stderr
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["prompt"] for row in rows] == [rec["prompt"] for rec in records]
        for row, rec in zip(rows, records):
            if name == "chat":
                assert row.keys() == {"prompt", "completion", "id"} and row["id"] == rec["id"]
                (turn,) = row["completion"]
                assert turn["role"] == "assistant" and isinstance(turn["content"], str)
            else:
                assert row.keys() == {"prompt", "completion", "answer"} and isinstance(row["completion"], str)
                assert row["completion"] != "old" or rec["completion"] != "old"
        check(run_cli(*sft_args(tiny_model, out, tmp_path / f"{name}-sft")))
        final = read_metrics(tmp_path / f"{name}-sft")[-1]
        assert final["final"] and final["dropped"] == 0


def test_generate_saves_a_chat_wrapped_prompt_as_the_conversation_it_generated(tiny_model, tmp_path):
    """--prompt strings go through the chat template as a user turn: the record says so."""
    out = tmp_path / "gen.jsonl"
    check(run_cli("generate", "--model", str(tiny_model), "--prompt", "Where does Ada live?", "--max-new-tokens", "6",
                  "--temperature", "1", "--output", str(out)))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == [{"role": "user", "content": "Where does Ada live?"}]
    assert row["completion"][0]["role"] == "assistant"
    check(run_cli(*sft_args(tiny_model, out, tmp_path / "sft")))
    out_plain = tmp_path / "plain.jsonl"
    check(run_cli("generate", "--model", str(tiny_model), "--prompt", "Ada lives in", "--no-chat",
                  "--max-new-tokens", "6", "--temperature", "1", "--output", str(out_plain)))
    (row,) = [json.loads(line) for line in out_plain.read_text().splitlines()]
    assert row["prompt"] == "Ada lives in" and isinstance(row["completion"], str)


def test_chat_ends_its_prompt_line_at_end_of_input(tiny_model):
    r = check(run_cli("chat", "--model", str(tiny_model), "--max-new-tokens", "4", input="Hello there\n"))
    assert r.stdout.endswith("you> \n")  # Ctrl-D: the shell's prompt starts on a line of its own
    assert r.stdout.startswith("you> model> ") and r.stdout.count("you> ") == 2


def test_chat_with_an_adapter_dir(runs):
    r = check(run_cli("chat", "--model", str(runs["sft"]), "--max-new-tokens", "4", input="Hello there\n"))
    assert r.stdout.startswith("you> model> ")


def test_generate_leaves_out_empty_completions_and_says_so(tiny_model, tmp_path, monkeypatch, capsys):
    """An empty completion is no sft record (sft refuses it); the file holds the others and stderr the count."""
    import alignkit.commands

    tok = load_tokenizer(tiny_model)
    words = tok.encode(" Marlow")
    monkeypatch.setattr(alignkit.commands, "generate", lambda model, tok_, ids, *a: [[], words, [tok.eos_token_id]])
    out = tmp_path / "gen.jsonl"
    cli(["generate", "--model", str(tiny_model), "--prompt", "a", "--prompt", "b", "--prompt", "c",
         "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"][0]["content"] for row in rows] == ["b"]
    assert rows[0]["completion"] == [{"role": "assistant", "content": tok.decode(words)}]
    assert "2 of 3 completions were empty" in capsys.readouterr().err


def test_sequence_level_distillation_is_generate_then_sft(tiny_model, assets, runs, tmp_path):
    """Sequence-level KD (Kim & Rush 2016): the teacher (here the LoRA SFT run, an adapter directory) answers the
    prompts, `generate --output` writes its answers as prompt-completion records, `sft` trains the student on
    them: on exactly the teacher's answer tokens (and their end of turn), with a falling loss."""
    prompts = tmp_path / "prompts.jsonl"
    lines = (assets / "instructions.jsonl").read_text().splitlines()[:16]
    conversations = [json.loads(line)["messages"] for line in lines]
    prompts.write_text("".join(json.dumps({"prompt": conv[:1]}) + "\n" for conv in conversations))
    teacher_data = tmp_path / "teacher.jsonl"
    cli(["generate", "--model", str(runs["sft"]), "--data", str(prompts), "--output", str(teacher_data),
         "--max-new-tokens", "12", "--temperature", "1"])
    records = [json.loads(line) for line in teacher_data.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [conv[:1] for conv in conversations]  # sampled: none empty
    tok = load_tokenizer(tiny_model)
    examples, _ = load_sft([str(teacher_data)], tok, 64)
    assert [spans(tok, ex) for ex in examples] == [[r["completion"][0]["content"] + "<|im_end|>"] for r in records]
    out = tmp_path / "student"
    final = cli(["sft", "--model", str(tiny_model), "--data", str(teacher_data), "--output", str(out),
                 "--max-steps", "10", "--batch-size", "8", "--max-length", "64", "--lr", "1e-2", "--warmup-steps", "0",
                 "--no-progress"])
    assert final["examples"] == len(records) and final["dropped"] == 0
    losses = [r["loss"] for r in read_metrics(out) if not r.get("final")]
    assert losses[-1] < 0.8 * losses[0], losses


def test_distill_takes_an_adapter_dir_as_teacher(tiny_model, assets, runs, tmp_path):
    """Token-level distillation from the LoRA SFT run (its adapters merged into its base): the first step's KL,
    measured before any update, is > 0, where the base itself as teacher gives exactly 0."""
    def first_kl(teacher, out):
        cli(["distill", "--model", str(tiny_model), "--teacher", str(teacher), "--output", str(out),
             "--data", str(assets / "instructions.jsonl"), "--max-steps", "1", "--batch-size", "4",
             "--max-length", "64", "--no-progress"])
        return first_row(out)["kl_teacher_student"]

    assert first_kl(tiny_model, tmp_path / "self") == 0
    assert first_kl(runs["sft"], tmp_path / "adapter") > 1e-3
