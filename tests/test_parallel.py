"""train/parallel.py helpers that need no process group: the generation copy of an FSDP policy, and a torch
without FSDP2."""

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
