"""What the loaders say about a directory that is not a model, and how an adapter finds its base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignkit.errors import UserError
from alignkit.models import load_causal_lm, load_reward_model, load_tokenizer
from helpers import run_cli

LOADERS = [load_causal_lm, load_tokenizer, load_reward_model]


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter of the tiny model with non-zero weights, saved without a tokenizer."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(load_causal_lm(tiny_model),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return out


def set_base(adapter_dir, base: str):
    f = adapter_dir / "adapter_config.json"
    config = json.loads(f.read_text())
    f.write_text(json.dumps({**config, "base_model_name_or_path": base}))


@pytest.mark.parametrize("load", LOADERS)
def test_an_empty_path_is_not_the_working_directory(load, tiny_model, monkeypatch):
    monkeypatch.chdir(tiny_model)  # even where a model is: '' is a missing flag, not "."
    with pytest.raises(UserError, match="no model directory given"):
        load("")


def test_a_runs_parent_folder_says_which_runs_it_holds(tiny_model, adapter, tmp_path):
    shutil.copytree(tiny_model, tmp_path / "base")
    shutil.copytree(adapter, tmp_path / "sft")
    (tmp_path / "demo.json").write_text("{}")
    for load in LOADERS:
        with pytest.raises(UserError, match=r"is not a model directory; it holds runs: base/, sft/$"):
            load(tmp_path)
    r = run_cli("generate", "--model", str(tmp_path), "--prompt", "hi")  # one line, no traceback
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a model directory; it holds runs: base/, sft/"]


def test_other_directories_that_are_not_models(tiny_model, tmp_path):
    (tmp_path / "weights.safetensors").write_text("")
    with pytest.raises(UserError, match="is a file, not a model directory"):
        load_causal_lm(tmp_path / "weights.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is an empty directory"):
        load_causal_lm(tmp_path / "empty")
    tok_only = tmp_path / "tok"
    load_tokenizer(tiny_model).save_pretrained(tok_only)
    assert load_tokenizer(tok_only).get_vocab() == load_tokenizer(tiny_model).get_vocab()
    with pytest.raises(UserError, match="holds a tokenizer but no model .*alignkit init-model --tokenizer"):
        load_causal_lm(tok_only)
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / f, no_tok / f)
    assert load_causal_lm(no_tok) is not None
    with pytest.raises(UserError, match="is a model directory without a tokenizer"):
        load_tokenizer(no_tok)
    stopped = tmp_path / "stopped"  # a run killed before its final save
    shutil.copytree(tiny_model, stopped / "checkpoints" / "step-00000004")
    (stopped / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="run without its final model.*--resume.*step-00000004"):
        load_causal_lm(stopped)


def test_adapter_base_relative_to_the_adapter_dir_or_the_working_directory(tiny_model, adapter, tmp_path, monkeypatch):
    import peft
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model, tmp_path / "base")
    ad = tmp_path / "runs" / "sft"
    shutil.copytree(adapter, ad)
    expected = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    ids = torch.tensor([[5, 6, 7, 8]])
    want = expected.merge_and_unload()(input_ids=ids).logits
    set_base(ad, "../../base")  # relative to the adapter directory
    torch.testing.assert_close(load_causal_lm(ad)(input_ids=ids).logits, want)
    monkeypatch.chdir(tmp_path)
    set_base(ad, "base")  # relative to the working directory, as a run records --model
    torch.testing.assert_close(load_causal_lm("runs/sft")(input_ids=ids).logits, want)
    # no tokenizer saved with the adapter: its base's
    assert load_tokenizer("runs/sft").get_vocab() == load_tokenizer(tiny_model).get_vocab()


@pytest.mark.parametrize("base", ["gone", "meta-llama/Llama-3.2-1B"])
def test_adapter_whose_base_is_not_local(adapter, tmp_path, base):
    ad = tmp_path / "sft"
    shutil.copytree(adapter, ad)
    set_base(ad, base)
    for load in LOADERS:
        with pytest.raises(UserError, match=f"{ad} is a LoRA adapter of {base}, which is not a local directory"):
            load(ad)


def test_adapter_with_pickled_weights_is_refused(adapter, tmp_path):
    from safetensors.torch import load_file

    ad = tmp_path / "pickled"
    shutil.copytree(adapter, ad)
    torch.save(load_file(str(ad / "adapter_model.safetensors")), ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(SystemExit, match="adapter_model.bin: pickled weights are not loaded"):
        load_causal_lm(ad)
