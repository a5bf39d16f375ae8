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


def shard(model, device: torch.device, roots: list[torch.nn.Module] | None = None, mesh=None):
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
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    for root in roots or [model]:
        fully_shard(root, mesh=mesh, mp_policy=mp)
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
    """`shard` a model that only process 0 holds with its weights (the others built it on the meta device).
    The others shard first and allocate their shards; process 0 then scatters each parameter's rows (each process
    receives its own shard only, so it holds its shards and one weight's rows) and shards its own copy; then it
    broadcasts the buffers (non-persistent ones, e.g. rotary frequencies, are in no state dict)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))  # once, on every process, before they part ways
    if not is_main:
        shard(model, device, mesh=mesh)
        model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():  # the same order, sharded or not
            rows = -(-param.shape[0] // world)  # FSDP2 gives process r rows [r * rows, (r + 1) * rows)
            received = torch.empty((rows, *param.shape[1:]), dtype=param.dtype, device=device)
            chunks = None
            if is_main:
                chunks = [c if c.shape[0] == rows else torch.cat([c, c.new_zeros((rows - c.shape[0], *c.shape[1:]))])
                          for c in param.detach().split(rows)]
                chunks += [param.new_zeros((rows, *param.shape[1:]))] * (world - len(chunks))
            dist.scatter(received, chunks, src=0)
            if not is_main:
                if not (isinstance(param, DTensor) and param.placements == (Shard(0),)):
                    raise RuntimeError(f"--fsdp: {name} is not sharded by rows ({type(param).__name__})")
                local = param.to_local()
                local.copy_(received[:local.shape[0]])
    if is_main:
        shard(model, device, mesh=mesh)
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
    for name, value in model.state_dict().items():
        yield name, _full(value)


def _full(value: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered in full (a collective), or a plain tensor as it is."""
    from torch.distributed.tensor import DTensor
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach()


def tied_names(model) -> set[str]:
    """The second and later names of each tied parameter (e.g. lm_head.weight tied to the embeddings), which
    save_pretrained leaves out."""
    first_name, tied = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied.add(name)
        else:
            first_name[id(param)] = name
    return tied


def export_state_dict(model) -> dict[str, torch.Tensor]:
    """The full weights to save_pretrained, on process 0 (empty elsewhere): `full_state_dict` less `tied_names`."""
    tied = tied_names(model)
    return {k: v for k, v in full_state_dict(model).items() if k not in tied}


SHARD_BYTES = 1 << 30  # save_pretrained's max_shard_size for sharded models: the most process 0 holds gathered


def shard_plan(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names in order, cut into files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    files, size = [[]], 0
    for name, n in sizes:
        if files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += n
    return files if files[0] else []


def _renames_on_save(hf, is_main: bool, device) -> bool:
    """Whether transformers would rename or convert weights when saving `hf` (e.g. fused MoE experts), which it
    does over the whole state dict at once: process 0's answer (its model came from from_pretrained, the others'
    maybe from the meta device), from a probe of empty tensors, an error counting as yes."""
    import torch.distributed as dist

    answer = True
    if is_main:
        try:
            from transformers.core_model_loading import revert_weight_conversion
            probe = {k: torch.empty(0) for k in hf.state_dict()}
            answer = set(revert_weight_conversion(hf, dict(probe))) != set(probe)
        except Exception:
            pass
    flag = torch.tensor([float(answer)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def write_pretrained(model, directory, is_main: bool) -> None:
    """save_pretrained of an FSDP-sharded `model` into `directory` (process 0's), gathering one weights file at a
    time: config and generation config as save_pretrained writes them, then safetensors files of at most
    SHARD_BYTES (`model.safetensors`, or `model-0000k-of-0000n.safetensors` and their index), so process 0 holds
    one file's worth of gathered weights, not the model. A PEFT model's adapter directory is written from its
    trainable weights alone (what it holds); a model transformers converts on saving, from the full gather.
    Every process calls it (each gather is a collective); only process 0 writes, and an OSError of its writes
    is raised after the last gather, so the others are not left waiting."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from alignkit.models import save_kwargs, unwrap

    def full(v):  # a collective: every process gathers, process 0 keeps the result
        v = _full(v)
        return v.cpu().contiguous() if is_main else None

    hf = unwrap(model)
    state = None
    if hasattr(hf, "peft_config"):  # an adapter directory holds the adapters and modules_to_save: the trainable weights
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: full(v) for k, v in model.state_dict().items() if k in trainable}
    elif _renames_on_save(hf, is_main, next(model.parameters()).device):
        state = export_state_dict(model)
    if state is not None:
        if is_main:
            hf.save_pretrained(directory, state_dict=state, safe_serialization=True, **save_kwargs(hf))
        return
    tied = tied_names(model)
    values = {k: v for k, v in model.state_dict().items() if k not in tied}
    files = shard_plan([(k, v.numel() * v.element_size()) for k, v in values.items()], SHARD_BYTES)
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    failure = None
    if is_main:
        try:
            hf.save_pretrained(directory, state_dict={}, safe_serialization=True)  # config.json, generation_config.json
        except OSError as e:
            failure = e
    for name, keys in zip(names, files):
        tensors = {k: full(values[k]) for k in keys} if is_main else [full(values[k]) for k in keys]
        if is_main and failure is None:
            try:
                save_file(tensors, str(Path(directory) / name), metadata={"format": "pt"})
            except OSError as e:
                failure = e
        del tensors
    if is_main and failure is None and len(files) > 1:
        index = {"metadata": {"total_parameters": hf.num_parameters(),
                              "total_size": sum(v.numel() * v.element_size() for v in values.values())},
                 "weight_map": {k: name for name, keys in zip(names, files) for k in keys}}
        try:
            (Path(directory) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        except OSError as e:
            failure = e
    if failure is not None:
        raise failure


def save_sharded(model, tokenizer, out, is_main: bool) -> None:
    """`models.save_model` of an FSDP-sharded model into `out`: every process calls it (`write_pretrained`
    gathers), process 0 writes."""
    from alignkit.errors import writing
    from alignkit.models import save_model

    if not is_main:
        write_pretrained(model, None, False)
        return
    with writing(out, "the model to"):
        save_model(model, tokenizer, out, write=lambda tmp: write_pretrained(model, tmp, True))


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
