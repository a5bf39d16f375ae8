"""Run under torchrun by test_fsdp.py: process 0 loads MODEL_DIR, the others build it on the meta device, and
after `parallel.wrap` every process holds process 0's weights and buffers, tied weights still tied, and the
sharded forward gives process 0's unsharded logits. KIND: causal, lora or reward."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from alignkit import lora
from alignkit.models import load_reward_model
from alignkit.train import dist as distributed, parallel

model_dir, kind, scratch = sys.argv[1], sys.argv[2], Path(sys.argv[3])
d = distributed.setup("cpu", fsdp=True)
run = SimpleNamespace(world_size=d.world_size, is_main=d.is_main, dist=d, device=d.device)
cfg = SimpleNamespace(fsdp=True, lora_r=4 if kind == "lora" else 0, lora_alpha=8, lora_targets="q_proj,v_proj",
                      model=model_dir, dtype="float32", trust_remote_code=False, gradient_checkpointing=True,
                      autocast="none", compile=False)
extra = dict(loader=load_reward_model, pad_token_id=0, task_type="SEQ_CLS") if kind == "reward" else {}
model = lora.load_trainable(cfg, None, d.device, meta=parallel.builds_on_meta(run, cfg), **extra)
assert all(p.is_meta for p in model.parameters()) == (d.rank > 0), d.rank
ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
if d.is_main:
    with torch.no_grad():
        out = model(input_ids=ids).logits
    save_file({"logits": out, **{f"buffer.{n}": b for n, b in model.named_buffers()},
               **{k: v.clone() for k, v in model.state_dict().items()}}, str(scratch / "main.safetensors"))
d.barrier()
expected = load_file(str(scratch / "main.safetensors"))
parallel.wrap(model, run, cfg)
assert parallel.is_sharded(model)
got = dict(parallel.gathered(model))
assert got.keys() == {k for k in expected if k != "logits" and not k.startswith("buffer.")}
for k, v in got.items():
    assert torch.equal(v, expected[k]), (d.rank, k)
for n, b in model.named_buffers():
    assert torch.equal(b, expected[f"buffer.{n}"]), (d.rank, n)
base = model.get_base_model() if kind == "lora" else model
if getattr(base.config, "tie_word_embeddings", False) and kind != "reward":
    assert base.lm_head.weight is base.get_input_embeddings().weight, d.rank
trainable = {n for n, p in model.named_parameters() if p.requires_grad}
assert all("lora_" in n for n in trainable) if kind == "lora" else len(trainable) == len(list(model.parameters()))
with torch.no_grad():
    assert torch.allclose(model(input_ids=ids).logits, expected["logits"], atol=1e-6), d.rank
d.barrier()
print(f"rank {d.rank} ok")
distributed.teardown()
