"""train-tokenizer, init-model, model loading safety, --help on every command, the demo pipeline."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.cli import COMMANDS, run as cli
from alignkit.data import render_messages
from alignkit.models import load_causal_lm


@pytest.fixture(scope="module")
def tok_dir(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    cli(["train-tokenizer", "--data", str(assets / "corpus.jsonl"), "--data", str(assets / "instructions.jsonl"),
         "--vocab-size", "600", "--output", str(out)])
    return out


def test_trained_tokenizer_is_a_normal_hf_tokenizer(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert 300 < len(tok) <= 600
    for t in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(t) < 4  # specials come first
    text = "Ada Brook lives in Marlow; 12 + 7 = 19. Ünïcode too."
    assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless, no unknown token
    assert "{% generation %}" in tok.chat_template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."}]
    ex = render_messages(tok, msgs)
    trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained == "Hello there.<|im_end|>"


def test_init_model_creates_loadable_models(tok_dir, tmp_path):
    for arch in ("llama", "qwen2"):
        cli(["init-model", "--arch", arch, "--size", "tiny", "--tokenizer", str(tok_dir), "--output", str(tmp_path / arch)])
        model = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
        assert model.config.model_type == arch
        assert model.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(tok_dir))
        tok = AutoTokenizer.from_pretrained(tmp_path / arch)
        eos = model.generation_config.eos_token_id
        assert tok.convert_tokens_to_ids("<|im_end|>") in eos and tok.eos_token_id in eos
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "llama").parameters())
    assert 1.5e6 < n < 2.5e6  # tiny = hidden 192, 4 layers, tied embeddings


def test_pickled_weights_are_refused(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_model / "config.json").read_text())
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(SystemExit, match="pytorch_model.bin"):
        load_causal_lm(d)


def test_remote_code_is_not_run_unless_asked(tiny_model, tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text("raise RuntimeError('remote code ran')\n")
    (d / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    model = load_causal_lm(d)  # auto_map ignored: the built-in Llama class is used, evil.py never imported
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli([command, "--help"])
    assert e.value.code == 0
    assert "usage: alignkit " + command in capsys.readouterr().out


def test_top_level_help_lists_commands(capsys):
    cli(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


def test_demo_pipeline_end_to_end(tmp_path):
    """The README's main job, with a tiny budget: every stage runs and both models answer."""
    result = cli(["demo", "--output", str(tmp_path / "demo"), "--pretrain-steps", "10", "--sft-epochs", "1",
                  "--no-progress"])
    assert set(result["answers"]) == {"base", "sft"}
    assert len(result["answers"]["sft"]) == len(result["prompts"]) == 8
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "sft") is not None
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["timings"]["pretrain"] > 0
