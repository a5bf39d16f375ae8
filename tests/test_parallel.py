"""train/parallel.py helpers: the generation copy of an FSDP policy and the weights streamed into it (on a
1-process mesh), and a torch without FSDP2."""

from types import SimpleNamespace

import pytest
import torch

from alignkit.models import forward_token_logps, load_causal_lm, prepare
from alignkit.train import parallel


def test_generation_copy_runs_its_own_weights_after_prepare(tiny_model):
    """`prepare` wraps forwards in closures over the original modules (token log-probs, checkpointing);
    the copy must not call back into them, or a sharded original would run (and collect) in its place."""
    cfg = SimpleNamespace(fsdp=True, gradient_checkpointing=True, autocast="none", compile=False)
    model = prepare(load_causal_lm(str(tiny_model), "float32", False, torch.device("cpu")), cfg)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = model(input_ids=ids).logits
    copy = parallel.generation_copy(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert torch.allclose(copy(input_ids=ids).logits, before)  # the copy's own weights
    assert not torch.allclose(model(input_ids=ids).logits, before)
    logps = forward_token_logps(copy, input_ids=ids, token_labels=ids[:, 1:], token_positions=torch.arange(4)[None])
    assert logps.logps.shape == (1, 4)  # the copy gets its own token log-probs forward when asked
    assert parallel.generation_copy(model, SimpleNamespace(fsdp=False)) is model


def test_a_torch_without_fsdp2_says_so_and_shards_nothing(monkeypatch, tiny_model):
    import torch.distributed.fsdp as fsdp

    from alignkit.errors import UserError

    monkeypatch.delattr(fsdp, "fully_shard")  # as on torch < 2.6
    model = load_causal_lm(str(tiny_model), "float32", False, torch.device("cpu"))
    assert not parallel.is_sharded(model)  # every run asks; only --fsdp needs FSDP2
    with pytest.raises(UserError, match=r"--fsdp needs torch >= 2\.6 .*this is torch"):
        parallel.shard(model, torch.device("cpu"))


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_weights_stream_one_gather_at_a_time_into_the_copy(one_process_group, tiny_model, monkeypatch):
    """`gathered` (what rollout engines and the generation copy load from) yields the full weights under their
    names one all-gather at a time, and `refresh` copies them into the plain copy."""
    from torch.distributed.tensor import DTensor

    cfg = SimpleNamespace(fsdp=True, rollout_engine="local")
    model = load_causal_lm(str(tiny_model), "float32", False, torch.device("cpu"))
    copy = parallel.generation_copy(model, cfg)
    parallel.shard(model, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    names = list(model.state_dict())
    calls = []
    full_tensor = DTensor.full_tensor
    monkeypatch.setattr(DTensor, "full_tensor", lambda self, **kw: calls.append(1) or full_tensor(self, **kw))
    stream = parallel.gathered(model)
    first_name, first = next(stream)
    assert len(calls) == 1 and first_name == names[0] and not isinstance(first, DTensor)
    rest = dict(stream)
    assert [first_name, *rest] == names
    assert len(calls) == sum(isinstance(v, DTensor) for v in model.state_dict().values())
    halved = {k: v.full_tensor() for k, v in model.state_dict().items()}
    assert not torch.allclose(copy.state_dict()[names[0]], halved[names[0]])
    parallel.refresh(copy, model)
    assert all(torch.equal(copy.state_dict()[k], halved[k]) for k in names)


def test_vllm_under_fsdp_takes_no_generation_copy_and_refuses_lora(tiny_model):
    from alignkit import lora
    from alignkit.errors import UserError

    cfg = SimpleNamespace(fsdp=True, rollout_engine="vllm")
    model = load_causal_lm(str(tiny_model), "float32", False, torch.device("cpu"))
    assert parallel.generation_copy(model, cfg) is model  # the engine keeps its own copy
    peft_cfg = SimpleNamespace(lora_r=4, lora_alpha=8, lora_targets="q_proj", model=str(tiny_model), dtype="float32",
                               trust_remote_code=False, gradient_checkpointing=False, autocast="none", compile=False)
    with pytest.raises(UserError, match="--rollout-engine vllm with --fsdp and LoRA"):
        parallel.generation_copy(lora.load_trainable(peft_cfg, None, torch.device("cpu")), cfg)


@pytest.mark.parametrize("shard_bytes", [1 << 30, 40_000])
def test_sharded_save_writes_what_save_pretrained_writes(one_process_group, tiny_model, tmp_path, monkeypatch,
                                                         shard_bytes):
    """`parallel.save_sharded` (one file's worth gathered at a time) writes save_pretrained's config files and
    weights: one model.safetensors, or, with files smaller than the model, shards and their index; from_pretrained
    loads either as the unsharded model, and a later save leaves no file of the earlier one's behind."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from alignkit.models import load_tokenizer, save_model

    tok = load_tokenizer(tiny_model)
    plain = load_causal_lm(str(tiny_model), "float32", False, torch.device("cpu"))
    save_model(plain, tok, tmp_path / "plain")
    model = parallel.shard(load_causal_lm(str(tiny_model), "float32", False, torch.device("cpu")), torch.device("cpu"))
    monkeypatch.setattr(parallel, "SHARD_BYTES", shard_bytes)
    out = tmp_path / "sharded"
    save_model(plain, tok, out)  # an earlier save, as one file
    parallel.save_sharded(model, tok, out, is_main=True)
    files = sorted(p.name for p in out.iterdir())
    expected = sorted(p.name for p in (tmp_path / "plain").iterdir())
    if shard_bytes > 1 << 20:
        assert files == expected
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and files == sorted([*(set(expected) - {"model.safetensors"}),
                                                    "model.safetensors.index.json", *shards])
        assert all(s.startswith("model-") and s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
        contents = {s: load_file(str(out / s)) for s in shards}
        sizes = {s: sum(t.numel() * t.element_size() for t in c.values()) for s, c in contents.items()}
        assert index["metadata"]["total_size"] == sum(sizes.values())
        assert all(sizes[s] <= shard_bytes for s in shards if len(contents[s]) > 1)  # else one tensor above the size
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((tmp_path / "plain" / name).read_text())
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
