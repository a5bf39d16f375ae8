"""Resumable checkpoints, written atomically and without pickle.

Layout: OUTPUT/checkpoints/step-00000100/
    model files (save_pretrained: safetensors + config + tokenizer)   -> loadable by from_pretrained
    optimizer.safetensors   AdamW moments, flattened to named tensors
    trainer_state.json      step, optimizer param groups, RNG states, data position, recipe extras

A checkpoint is written into a `.tmp-*` directory, fsynced, then renamed into place; `os.rename`
of a directory is atomic on POSIX, so a SIGKILL at any moment leaves every `step-*` directory complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.models import unwrap


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
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
                    keep: int = 2, save_extra=None) -> Path:
    """Write OUTPUT/checkpoints/step-N atomically and prune old ones (keeping `keep`). `save_extra(dir)`
    writes a recipe's other trained state (e.g. PPO's value function) into the same directory before
    the rename, so it is part of the same atomic checkpoint."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tensors, groups = _flatten_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "param_groups": groups, "rng": rng_state(), "extra": extra or {}}
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    if save_extra is not None:
        save_extra(tmp)
    _fsync_dir(tmp)
    if final.exists():  # same step saved twice (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_state(path: Path) -> dict:
    """The recipe's own resume state (`extra` of save_checkpoint)."""
    return json.loads((path / "trainer_state.json").read_text()).get("extra", {})


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer and RNG states from a checkpoint (the model is loaded from `path` by the
    recipe with from_pretrained). Returns trainer_state.json."""
    state = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
    set_rng_state(state["rng"])
    return state
