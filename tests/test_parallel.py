"""train/parallel.py helpers that need no process group: the generation copy of an FSDP policy."""

from types import SimpleNamespace

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
