"""Command configs: dataclass defaults < YAML file (`--config`) < command-line flags, parsed by tyro.

Every training command's config dataclass inherits the fields of `TrainConfig` (plain data
inheritance, no behaviour). The resolved config is written next to the run's outputs so a run can
be reproduced with `--config OUTPUT/config.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro
import yaml

from alignkit.errors import UserError

# `--data a.jsonl --data b.jsonl` (repeatable).
Repeatable = tyro.conf.UseAppendAction


@dataclasses.dataclass
class TrainConfig:
    """Fields shared by every training command."""

    model: str = ""
    """Local Hugging Face model directory (safetensors weights, tokenizer included)."""
    data: Annotated[tuple[str, ...], Repeatable] = ()
    """Training data file (JSONL, or .parquet/.arrow with the `datasets` extra). Repeat the flag for several files."""
    output: str = "runs/out"
    """Output directory: final model, metrics.jsonl, config.yaml, checkpoints/."""
    config: str | None = None
    """YAML file of defaults for these fields; command-line flags override it. Unknown keys are an error."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = run `epochs` full passes over the data."""
    epochs: float = 1.0
    """Passes over the data when `max_steps` is -1 (fractions allowed)."""
    batch_size: int = 8
    """Sequences per micro-batch on each process. Global batch = batch_size * grad_accum * processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (higher = bigger batch at the same memory)."""
    max_length: int = 512
    """Longest sequence in tokens. Longer examples are truncated (or dropped) and counted; see `strict`."""
    strict: bool = False
    """Over-long examples are an error (naming file and line) instead of being truncated."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of the schedule, as a fraction of `lr`."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables."""
    seed: int = 0
    """Seed of data order and initialisation. Same seed, same run."""
    log_every: int = 1
    """Write a metrics.jsonl row every N optimizer steps."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0 = only at the end and on SIGTERM/SIGINT)."""
    save_total_limit: int = 2
    """Checkpoints kept in OUTPUT/checkpoints (oldest deleted first)."""
    resume: bool = False
    """Continue from the last complete checkpoint in OUTPUT/checkpoints (refused if the checkpoint was trained with other settings or data)."""
    overwrite: bool = False
    """Replace the run already in OUTPUT (its checkpoints, metrics and model files are deleted first)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run. Off by default: it executes arbitrary code."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, or cuda. CUDA paths are untested on this project's CI."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype. bfloat16 is meant for GPUs (untested here); CPU training uses float32."""
    autocast: Literal["none", "bf16"] = "none"
    """Mixed precision: bf16 runs the model's matmuls in bfloat16 under torch.autocast with float32 weights, optimizer state and losses (TRL's bf16=True). Several times faster matmuls on CPUs with AMX and on GPUs; results change at bfloat16 precision. Rollout generation stays float32."""
    compile: bool = False
    """torch.compile the model's forward (dynamic shapes). Faster steps after a one-off compile of tens of seconds; see docs/performance.md."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (activation checkpointing, non-reentrant): less memory, about 30% more compute; same losses and gradients. Applies to the trained models (policy, value and reward models), not to frozen references or teachers."""
    progress: bool = True
    """Show progress: a bar on a terminal, else a plain line every few steps or 30 s."""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """Also send the metrics rows to an experiment tracker (metrics.jsonl is always written): tensorboard (OUTPUT/tensorboard), wandb (OUTPUT/wandb; WANDB_MODE=offline works without a network) or trackio (local). Each needs its extra, e.g. pip install 'alignkit[tensorboard]'."""
    skip_nonfinite: bool = False
    """Skip (and count) an optimizer step whose loss is NaN/inf instead of stopping the run."""
    lora_r: int = 0
    """LoRA rank; > 0 trains adapters (peft) instead of all weights. In preference/RL commands the base model with adapters disabled is then the reference."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_targets: str = "all-linear"
    """Comma-separated module names to adapt, or all-linear."""
    merge_lora: bool = False
    """Save merged full weights instead of the adapter."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the torchrun processes with FSDP2 (torch.distributed.fsdp.fully_shard): each decoder layer a unit, then the root. Checkpoints are sharded (torch.distributed.checkpoint); the saved model is a consolidated save_pretrained directory. Without torchrun it runs on a 1-process mesh."""


# Fields that do not change what a run computes: a run may be resumed with other values of these.
# Every other field (and the number of processes) must match the checkpoint's.
RUN_ONLY_FIELDS = {"output", "config", "resume", "overwrite", "progress", "log_every", "save_every",
                   "save_total_limit", "device", "trust_remote_code", "compile", "gradient_checkpointing",
                   "report_to"}

_AT_LEAST_ONE = (lambda v: v >= 1, "must be >= 1")
_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "must be between 0 and 1")

# Allowed values of numeric fields, by field name, for every command that has the field.
LIMITS = {
    "max_steps": (lambda v: v == -1 or v >= 1, "must be >= 1, or -1 to run --epochs passes"),
    "epochs": _POSITIVE,
    "batch_size": _AT_LEAST_ONE,
    "grad_accum": _AT_LEAST_ONE,
    "max_length": (lambda v: v >= 2, "must be >= 2"),
    "lr": _POSITIVE,
    "min_lr_ratio": _FRACTION,
    "warmup_steps": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "adam_betas": (lambda v: all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
    "max_grad_norm": _NON_NEGATIVE,
    "log_every": _AT_LEAST_ONE,
    "save_every": _NON_NEGATIVE,
    "save_total_limit": _NON_NEGATIVE,
    "lora_r": _NON_NEGATIVE,
    "lora_alpha": _POSITIVE,
    "max_new_tokens": _AT_LEAST_ONE,
    "temperature": _NON_NEGATIVE,
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "generation_batch_size": _AT_LEAST_ONE,
    "mini_batch_size": _NON_NEGATIVE,
    "group_size": _AT_LEAST_ONE,
    "ppo_epochs": _AT_LEAST_ONE,
    "num_iterations": _AT_LEAST_ONE,
    "beta": _NON_NEGATIVE,
    "kl_coef": _NON_NEGATIVE,
    "clip_eps": _POSITIVE,
    "gamma": _FRACTION,
    "lam": _FRACTION,
    "vocab_size": _AT_LEAST_ONE,
    "on_policy_fraction": _FRACTION,
    "sampling_temperature": _NON_NEGATIVE,
    "tis_cap": _NON_NEGATIVE,
    "vllm_gpu_memory_utilization": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg, prefix: str = "") -> None:
    """Every numeric field is finite and within its LIMITS; the message names the flag (a nested config's
    fields as --NESTED.NAME)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
            continue
        numbers = value if isinstance(value, tuple) else (value,)
        if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            continue
        if not all(math.isfinite(v) for v in numbers):
            raise UserError(f"{flag(prefix + f.name)} must be a finite number (got {value})")
        check, rule = LIMITS.get(f.name, (None, ""))
        if check is not None and not check(value):
            raise UserError(f"{flag(prefix + f.name)} {rule} (got {value})")


def require(cfg) -> None:
    """Flags without a usable default: a command's --model (unless its config says OPTIONAL_MODEL), and a
    training command's --data."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if "model" in names and not cfg.model and not getattr(cfg, "OPTIONAL_MODEL", False):
        raise UserError("--model is required (a local model directory)")
    if isinstance(cfg, TrainConfig) and not cfg.data:
        raise UserError("--data is required (a training data file; repeat the flag for several)")


def _list_fields(cls) -> set[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = set()
    for f in dataclasses.fields(cls):
        meta = getattr(hints[f.name], "__metadata__", ())
        if any(m is Repeatable for m in meta):
            out.add(f.name)
    return out


def _flag_given(args: list[str], name: str) -> bool:
    return any(a == flag(name) or a.startswith(flag(name) + "=") for a in args)


def load_yaml_overrides(cls, path: str) -> dict[str, Any]:
    """Read a YAML config file and check its keys against the command's fields."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: --config {path}: no such file")
    with p.open() as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"error: {path}: invalid YAML: {e}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"error: {path}: expected a mapping of field: value, got {type(values).__name__}")
    return _checked_values(cls, values, path)


def _checked_values(cls, values: dict, path: str, prefix: str = "") -> dict[str, Any]:
    """YAML values -> constructor arguments of `cls`: unknown keys are an error, lists become tuples, and a
    mapping under a nested config field (e.g. `dpo:`) becomes that config."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(
            f"error: {path}: unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys: "
            f"{', '.join(prefix + k for k in sorted(names))}"
        )
    for k, v in values.items():
        nested = hints[k] if dataclasses.is_dataclass(hints[k]) else None
        if nested is not None and isinstance(v, dict):
            try:
                values[k] = nested(**_checked_values(nested, v, path, f"{prefix}{k}."))
            except TypeError as e:
                raise SystemExit(f"error: {path}: {prefix}{k}: {e}") from None
        elif isinstance(v, list):
            values[k] = tuple(v)
    return values


def parse(cls, args: list[str] | None = None, prog: str | None = None):
    """Parse a command's config: dataclass defaults < `--config` YAML < flags; numeric values are
    checked against LIMITS."""
    args = list(sys.argv[1:] if args is None else args)
    default = cls()
    config_path = None
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            config_path = args[i + 1]
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
    if config_path:
        values = load_yaml_overrides(cls, config_path)
        if "config" in {f.name for f in dataclasses.fields(cls)}:
            values["config"] = config_path
        try:
            default = cls(**values)
        except TypeError as e:
            raise SystemExit(f"error: {config_path}: {e}") from None
    # A repeatable flag given on the command line replaces the YAML list instead of appending to it.
    replace = {n: () for n in _list_fields(cls) if _flag_given(args, n)}
    if replace:
        default = dataclasses.replace(default, **replace)
    cfg = tyro.cli(cls, default=default, args=args, prog=prog)
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict[str, Any]:
    def plain(v):  # YAML-safe: tuples as lists, a nested config as a mapping
        return list(v) if isinstance(v, tuple) else {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg, out_dir: str | Path, command: str | None = None) -> None:
    """Write the fully resolved config as OUTPUT/config.yaml (reusable with --config); `command` is
    recorded in a first comment line (`# alignkit sft`) for `alignkit report`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = to_dict(cfg)
    d.pop("config", None)
    d.pop("resume", None)
    d.pop("overwrite", None)
    tmp = out / "config.yaml.tmp"
    tmp.write_text((f"# alignkit {command}\n" if command else "") + yaml.safe_dump(d, sort_keys=False))
    tmp.replace(out / "config.yaml")
