"""Data parallelism for the trained model: DDP (every process holds the whole model and optimizer) or
FSDP2 (`torch.distributed.fsdp.fully_shard`: parameters, gradients and optimizer state sharded over the
processes; each decoder layer a unit, then the root), plus the few helpers that differ under sharding:
gathering the full weights (exports, the generation copy of RL recipes) and the sharded checkpoint."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from alignkit.errors import UserError


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError as e:  # public from torch 2.6
        raise UserError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                        f"{torch.__version__}: upgrade torch, or train without --fsdp") from e
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def fsdp_units(model) -> list[torch.nn.Module]:
    """The FSDP2 units in `model` (itself included), every root among them; none on a torch without FSDP2."""
    try:
        FSDPModule = _fsdp()[0]
    except UserError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    """True if `model` (or a module inside it) is FSDP2-sharded: its forward is then a collective."""
    return bool(fsdp_units(model))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of every Hugging Face model inside `model` (a PEFT wrapper, PPO's actor-critic),
    found by the class names of their `_no_split_modules`, as accelerate and TRL do."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def mixed_precision(device: torch.device):
    """bf16 parameters with fp32 gradient reduction on CUDA; on CPU (gloo) everything stays float32."""
    MixedPrecisionPolicy = _fsdp()[1]
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model, device: torch.device, roots: list[torch.nn.Module] | None = None):
    """fully_shard each decoder layer, then each root (default: the model itself), in place (modules keep
    their names). Each root is called on its own (its forward unshards what the layers leave it); several
    roots suit a model whose parts are called separately, such as PPO's value backbone and head. Every
    trainable parameter must end up in a unit: one left out would train unsynchronised on each process."""
    from torch.distributed.tensor import DTensor

    fully_shard = _fsdp()[2]
    layers = decoder_layers(model)
    if not layers and roots is None:
        raise SystemExit(f"error: --fsdp: found no decoder layers in {type(model).__name__} "
                         "(its model class names none in _no_split_modules)")
    mp = mixed_precision(device)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    for root in roots or [model]:
        fully_shard(root, mp_policy=mp)
    left = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"--fsdp: parameters outside every FSDP unit: {left[:5]}")
    return model


def builds_on_meta(run, cfg) -> bool:
    """Whether this process builds the trained model without its weights (on the meta device): under --fsdp
    on several processes, all but process 0, which reads them and sends each process its shards (`wrap`).
    For recipes whose every process needs the full weights anyway (a local generation copy), pass False."""
    return bool(getattr(cfg, "fsdp", False)) and run.world_size > 1 and not run.is_main


def shard_from_main(model, device: torch.device, is_main: bool):
    """`shard` a model that only process 0 holds with its weights (the others built it on the meta device):
    the others allocate their shards, process 0 broadcasts its full state dict (each process keeps its
    shards of it) and its buffers (non-persistent ones, e.g. rotary frequencies, are in no state dict)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = model.state_dict() if is_main else {}
    shard(model, device)
    if not is_main:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def wrap(model, run, cfg):
    """What the training loop calls: the FSDP2-sharded model with --fsdp (also in one process: a 1-process
    mesh; filled from process 0 when the others built it on the meta device, `builds_on_meta`), DDP under
    torchrun, else the model. Build the optimizer afterwards: sharding replaces the parameters with DTensors."""
    if getattr(cfg, "fsdp", False):
        if run.world_size > 1 and run.dist.any(any(p.is_meta for p in model.parameters())):
            return shard_from_main(model, run.device, run.is_main)
        return shard(model, run.device)
    return DDP(model) if run.world_size > 1 else model


def no_sync(model):
    """Context that skips the gradient all-reduce / reduce-scatter of a micro-batch (DDP's no_sync,
    FSDP2's set_requires_gradient_sync)."""
    import contextlib
    if isinstance(model, DDP):
        return model.no_sync()
    units = fsdp_units(model)
    if units:
        @contextlib.contextmanager
        def off():
            for unit in units:
                unit.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for unit in units:
                    unit.set_requires_gradient_sync(True, recurse=False)
        return off()
    return contextlib.nullcontext()


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU on process 0 (empty elsewhere); a collective under FSDP,
    so every process calls it. The model's own state dict otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of each parameter and buffer of an FSDP-sharded `model`, on its device, one
    all-gather at a time: a consumer that copies each tensor away holds one full weight, not the model. A
    collective: every process must consume the whole iterator, in this order."""
    from torch.distributed.tensor import DTensor
    for name, value in model.state_dict().items():
        yield name, (value.full_tensor() if isinstance(value, DTensor) else value).detach()


def export_state_dict(model) -> dict[str, torch.Tensor]:
    """The full weights to save_pretrained, on process 0 (empty elsewhere): `full_state_dict` less the second
    name of each tied parameter (e.g. lm_head.weight tied to the embeddings), which save_pretrained leaves out."""
    state = full_state_dict(model)
    first_name = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied.add(name)
        else:
            first_name[id(param)] = name
    return {k: v for k, v in state.items() if k not in tied}


def generation_copy(model, cfg):
    """A plain (unsharded, eval, no-grad) copy of the policy for rollouts under --fsdp, taken before
    sharding: generation runs per process with its own number of forwards, which a sharded model cannot
    (its forward is a collective). Without --fsdp, the model itself."""
    if not getattr(cfg, "fsdp", False):
        return model
    if getattr(cfg, "rollout_engine", "local") == "vllm":
        from alignkit.lora import is_peft
        if is_peft(model):  # vLLM takes merged weights, which a sharded adapter model does not give one by one
            raise UserError("--rollout-engine vllm with --fsdp and LoRA (--lora-r) is not supported: drop --fsdp (the "
                            "frozen base needs no sharded optimizer state) or train without LoRA")
        return model  # the engine holds its own copy, loaded from `rollout_weights` before each rollout
    plain = copy.deepcopy(model).eval().requires_grad_(False)
    for m in plain.modules():
        # `models.prepare`'s forward wrappers (token log-probs, autocast, checkpointing, compile) close over the
        # original modules, which deepcopy does not rebind: the copy runs its class's own forward
        m.__dict__.pop("forward", None)
        for flag in ("_alignkit_token_logps", "_alignkit_checkpointed"):
            m.__dict__.pop(flag, None)
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return plain


def refresh(gen_model, model) -> None:
    """Load the trained weights into the generation copy (before each rollout), one tensor at a time; nothing
    when they are one model."""
    from alignkit.engines import copy_weights
    if gen_model is not model:
        copy_weights(gen_model, gathered(model) if is_sharded(model) else model.state_dict().items())


def rollout_weights(model):
    """(name, tensor) of the policy for a rollout engine's load_weights, lazily: gathered one tensor at a time
    under --fsdp (`gathered`), else `engines.policy_weights` (LoRA adapters merged in)."""
    from alignkit.engines import policy_weights

    return gathered(model) if is_sharded(model) else policy_weights(model)
