"""LoRA adapters through peft (optional extra `alignkit[peft]`) for every training command.

With adapters, the frozen base model *is* the reference model: `reference(model)` disables the
adapters for a forward pass, so preference/RL recipes keep one copy of the weights in memory.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from alignkit.models import load_causal_lm, prepare


def _peft():
    try:
        import peft
    except ImportError:
        raise SystemExit("error: --lora-r needs peft: pip install 'alignkit[peft]'") from None
    return peft


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def load_trainable(cfg, checkpoint: Path | None, device, loader=load_causal_lm, meta: bool = False, **loader_kwargs):
    """The model a recipe trains: from the checkpoint when resuming, else from --model; wrapped with
    fresh LoRA adapters when --lora-r > 0 (or with the checkpoint's adapters when resuming);
    with --autocast and --compile applied (models.prepare).

    --model may be a LoRA run's adapter directory: the loader merges its adapters into their base, so
    training starts from the model that run produced, as from any other model directory. Without
    --lora-r all of its weights train; with --lora-r fresh adapters go on top of the merged model, which
    is then their frozen base and so the reference of the preference and RL recipes: the SFT model, not
    the model before SFT. This is the route TRL's docs recommend for DPO after LoRA SFT (merge the SFT
    adapter, train a new one); continuing the same adapters would make the pre-SFT base the reference.
    The new adapters record --model as their base (peft's base_model_name_or_path), so the output
    loads, and chains on, the same way."""
    adapter_ckpt = checkpoint is not None and (checkpoint / "adapter_config.json").is_file()
    path = checkpoint if checkpoint is not None and not adapter_ckpt else cfg.model
    model = loader(path, cfg.dtype, cfg.trust_remote_code, device, meta=meta, **loader_kwargs)
    if cfg.lora_r <= 0:
        return prepare(model, cfg)
    peft = _peft()
    if adapter_ckpt:
        model = peft.PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    else:
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                               task_type=loader_kwargs.get("task_type", "CAUSAL_LM"))
        model = peft.get_peft_model(model, lcfg)
    return prepare(model, cfg)


def reference(model):
    """Context in which `model` computes the reference policy: adapters off (LoRA) or nothing to do
    (callers without adapters keep a separate frozen reference, or precomputed log-probs)."""
    return model.disable_adapter() if is_peft(model) else nullcontext()


def reference_model(cfg, model, device, path: str | None = None, frozen_copy: bool = False):
    """The frozen reference of a log-ratio (the DPO family, KTO): the base model with adapters disabled
    under LoRA (`reference`), or `model` itself when its log-probs are all taken before its first update;
    a frozen model loaded from `path` when one is given, or from --model when `frozen_copy` is asked (a
    reference used during training, or a policy resumed from a checkpoint, no longer the reference)."""
    if path is None and (is_peft(model) or not frozen_copy):
        return model
    ref = load_causal_lm(path or cfg.model, cfg.dtype, cfg.trust_remote_code, device).eval()
    prepare(ref, cfg)
    return ref.requires_grad_(False)


def merged(model):
    """Full weights with the adapters folded in (--merge-lora), or the model itself."""
    return model.merge_and_unload() if is_peft(model) else model
