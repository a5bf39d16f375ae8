"""Resumable checkpoints, written atomically and without pickle.

Layout: OUTPUT/checkpoints/step-00000100/
    model files (save_pretrained: safetensors + config + tokenizer)   -> loadable by from_pretrained
    optimizer.safetensors   AdamW moments, flattened to named tensors
    trainer_state.json      step, optimizer param groups, RNG states, data position, recipe extras

Under --fsdp the optimizer state and the model are also saved sharded: each process writes its shards
into `dcp/` (torch.distributed.checkpoint), which --resume loads; the model files are still the full,
consolidated weights (gathered to process 0), so every checkpoint loads with from_pretrained.

A checkpoint is written into a `.tmp-*` directory, fsynced, then renamed into place; `os.rename`
of a directory is atomic on POSIX, so a SIGKILL at any moment leaves every `step-*` directory complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.config import RUN_ONLY_FIELDS, to_dict
from alignkit.errors import UserError, writing
from alignkit.models import save_kwargs, unwrap

# Files and directories a run writes into OUTPUT: what --overwrite deletes. The first group marks a
# directory as holding a run (or a model), which a new run must not silently replace.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "config.json", "adapter_config.json",
               "model.safetensors")
RUN_FILES = RUN_MARKERS + ("eval.json", "value_model", "value_head.safetensors", "generation_config.json",
                           "chat_template.jinja", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                           "merges.txt", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                           "adapter_model.safetensors", "model.safetensors.index.json", ".tmp-save",
                           "tensorboard", "wandb", "report.html", "report")


def probe_writable(out: str | Path) -> None:
    """Fail now, before any model is loaded, if OUTPUT cannot be created or written to."""
    out = Path(out)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--output {out}: {existing} is a file, not a directory")
    probe = existing / f".alignkit-probe-{os.getpid()}"
    with writing(out, "--output"):
        with open(probe, "w") as f:
            f.write("x")
        probe.unlink()


def run_files(out: str | Path) -> list[str]:
    """The names in OUTPUT that show it holds a run or a model."""
    return [name for name in RUN_MARKERS if (Path(out) / name).exists()]


def clear_run(out: str | Path) -> None:
    """Delete a previous run's checkpoints, metrics, config and model files (--overwrite); other files stay."""
    out = Path(out)
    names = list(RUN_FILES) + (["README.md"] if (out / "adapter_config.json").exists() else [])  # peft's model card
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in out.glob("model-*-of-*.safetensors"):
        path.unlink()


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Delete half-written checkpoints left by a run that died while saving (they hold disk space and
    are never resumed from)."""
    stale = sorted((Path(out) / "checkpoints").glob(".tmp-step-*")) + sorted(Path(out).glob(".tmp-save"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _digest(path: Path) -> str:
    """Content hash of a file, or of a directory's top-level files (files over 64 MB by size only)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        if not f.is_file() or f.name.startswith("."):  # e.g. the .lock file a run keeps in its output
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        if size <= 64 << 20:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg, world_size: int) -> dict:
    """What determines a run's trajectory: every config field but RUN_ONLY_FIELDS, the number of
    processes, and the content of every file or directory the config names (data, models)."""
    values = {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY_FIELDS}
    values["processes"] = world_size
    files = {}
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or not item:
                continue
            path = Path(item.rsplit(":", 1)[0] if ".py:" in item else item)
            if path.exists():  # a data file, a model directory, or FILE.py of a FILE.py:function reward
                files[f"{key}={item}"] = _digest(path)
    return {"config": values, "files": files}


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints, e.g. `lr 0.001 -> 0.002`."""
    out = []
    a, b = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key} {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}")
    a, b = saved.get("files", {}), current.get("files", {})
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key]:
            field, path = key.split("=", 1)
            out.append(f"{field} {path} changed since the checkpoint (content hash)")
    return out


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_dir():
            _fsync_dir(f)
        elif f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(out_dir: str | Path, step: int, model, tokenizer, optimizer, extra: dict | None = None,
                    keep: int = 2, save_extra=None, run: dict | None = None) -> Path:
    """Write OUTPUT/checkpoints/step-N atomically and prune old ones (keeping `keep`). `save_extra(dir)`
    writes a recipe's other trained state (e.g. PPO's value function) into the same directory before
    the rename, so it is part of the same atomic checkpoint. `run` is the run's `fingerprint`, checked
    by --resume. A failed write removes the partial checkpoint and is reported as a UserError."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    try:
        with writing(final, "checkpoint"):
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            unwrap(model).save_pretrained(tmp, safe_serialization=True, **save_kwargs(model))
            tokenizer.save_pretrained(tmp)
            tensors, groups = _flatten_optimizer(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = {"step": step, "param_groups": groups, "rng": rng_state(), "extra": extra or {}, "run": run}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            if save_extra is not None:
                save_extra(tmp)
            _fsync_dir(tmp)
    except UserError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only keeps the disk full
        raise UserError(f"{e}; the partial checkpoint was removed, the last complete one is kept "
                        "(free space or fix permissions, then continue with --resume)") from e.__cause__
    if final.exists():  # same step saved twice (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(out_dir: str | Path, step: int, model, tokenizer, optimizer, dist, extra: dict | None = None,
                            keep: int = 2, save_extra=None, run: dict | None = None, trained=None) -> Path:
    """`save_checkpoint` of an FSDP-sharded model, called by every process: each writes its shards of the
    trained state (`trained`, default `model`: the module whose parameters `optimizer` updates) and the
    optimizer into the temporary directory's `dcp/`, process 0 the consolidated `model`, tokenizer and
    trainer_state.json, then (after a barrier) fsyncs and renames it into place. `save_extra(dir)` runs on
    every process, since gathering a sharded module is a collective; only process 0 may write."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from alignkit.train.parallel import write_pretrained

    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    failure = None
    if dist.is_main:
        try:
            with writing(final, "checkpoint"):
                root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
        except UserError as e:
            failure = e
    if dist.any(failure is not None):
        raise failure or UserError(f"checkpoint {final}: process 0 could not create {tmp}")
    model_state, optim_state = get_state_dict(trained or model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    try:
        with writing(final, "checkpoint"):
            write_pretrained(model, tmp if dist.is_main else None, dist.is_main)  # gathered one file at a time
            if dist.is_main:
                tokenizer.save_pretrained(tmp)
                state = {"step": step, "rng": rng_state(), "extra": extra or {}, "run": run,
                         "sharded": {"processes": dist.world_size}}
                (tmp / "trainer_state.json").write_text(json.dumps(state))
    except UserError as e:
        failure = e
    if save_extra is not None:
        try:
            with writing(final, "checkpoint"):
                save_extra(tmp)
        except UserError as e:
            failure = failure or e
    if dist.is_main:
        try:
            with writing(final, "checkpoint"):
                if failure is None:
                    _fsync_dir(tmp)
        except UserError as e:
            failure = e
        if failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.any(failure is not None):
        raise UserError(f"{failure or 'checkpoint: process 0 failed to write it'}; the partial checkpoint was removed, "
                        "the last complete one is kept (free space or fix permissions, then continue with --resume)")
    if dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / "dcp").is_dir()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_fingerprint(path: Path) -> dict | None:
    """The `run` fingerprint a checkpoint was saved with (None for checkpoints written before it existed)."""
    return json.loads((path / "trainer_state.json").read_text()).get("run")


def load_state(path: Path) -> dict:
    """The recipe's own resume state (`extra` of save_checkpoint)."""
    return json.loads((path / "trainer_state.json").read_text()).get("extra", {})


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, model=None) -> dict:
    """Restore optimizer and RNG states from a checkpoint (the model is loaded from `path` by the
    recipe with from_pretrained). Returns trainer_state.json. A sharded (--fsdp) checkpoint restores
    the sharded `model` and optimizer from its `dcp/` shards (every process calls this)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if is_sharded_checkpoint(path) != (model is not None):
        raise UserError(f"--resume: {path} is {'a sharded (--fsdp)' if is_sharded_checkpoint(path) else 'an unsharded'} "
                        f"checkpoint; resume it {'with' if is_sharded_checkpoint(path) else 'without'} --fsdp")
    if model is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optim_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    else:
        tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
    set_rng_state(state["rng"])
    return state
