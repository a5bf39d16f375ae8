"""Loading, creating and saving Hugging Face causal LMs (safetensors only, no remote code unless asked)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig)

# Architectures `alignkit init-model` can create, at two sizes. `tiny` is the 1.9M-parameter shape
# calibrated on a 2-core CPU (issue 5 notes: ~5,400 tokens/s pretraining).
SIZES = {
    "tiny": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=2048),
}
ARCHS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}


def _check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise SystemExit(f"error: model directory {p} does not exist (expected a local Hugging Face model dir)")
    if not (p / "config.json").is_file():
        raise SystemExit(f"error: {p} has no config.json; is it a Hugging Face model directory?")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.safetensors.index.json")):
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickled weights are not loaded, convert them to safetensors)" if pickled else ""
        raise SystemExit(f"error: {p} has no .safetensors weights{hint}")
    return p


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    if not Path(path).is_dir():
        raise SystemExit(f"error: model/tokenizer directory {path} does not exist (expected a local Hugging Face directory)")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked out of every loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False,
                   device: str | torch.device = "cpu"):
    p = _check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(p), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return model.to(device)


def load_reward_model(path, dtype: str = "float32", trust_remote_code: bool = False, device="cpu", *,
                      pad_token_id: int | None = None, task_type: str | None = None):
    """A causal LM directory (or a saved reward model) as a sequence classifier with one output.

    Same contract as `models.load_causal_lm`: safetensors only, no remote code unless asked. The
    head (`score`) is newly initialised when `path` holds a causal LM. `config.pad_token_id` must
    be set: HF scores a row at its rightmost token that is not padding. `task_type` is accepted
    (and ignored) because `lora.load_trainable` passes its keyword arguments on to the loader."""
    p = _check_model_dir(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(p), num_labels=1, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True)
    except ValueError as e:  # an architecture without a ...ForSequenceClassification class
        raise SystemExit(f"error: {p} cannot be loaded as a reward model (sequence classifier): {e}") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise SystemExit(f"error: {p}: no pad_token_id; a reward model needs one to find each row's last token")
    return model.to(device)


def _classifier(model):
    """The HF sequence classifier inside DDP/compile and peft wrappers, or None for other models."""
    m = unwrap(model)
    m = m.get_base_model() if hasattr(m, "get_base_model") else m  # peft: the model its adapters are in
    return m if hasattr(m, "score") else None


def backbone_and_head(model):
    """(backbone, score head) of a sequence classifier, through DDP/compile and peft wrappers: HF's
    ...ForSequenceClassification forward returns one pooled score, so callers that need the head
    elsewhere call the two parts themselves (the backbone is what `prepare` speeds up)."""
    m = _classifier(model)
    if m is None:
        raise SystemExit(f"error: {type(unwrap(model)).__name__} has no `score` head; alignkit reads reward and value "
                         "models as transformers' ...ForSequenceClassification decoders (Llama, Qwen2, Mistral, GPT-2, ...)")
    return getattr(m, m.base_model_prefix), m.score


class LastTokenReward(torch.nn.Module):
    """A sequence classifier read at each row's last real token, found from the attention mask: (B,).

    HF's classifier reads the rightmost token that is not `pad_token_id`. When pad == EOS (what
    `load_tokenizer` sets for tokenizers without a pad token, e.g. Llama 3, whose turns end with the
    EOS <|eot_id|>), that is the token before a completion's final EOS, and a reward model would be
    trained at one position and scored at another. `alignkit reward` trains and
    `rewards.RewardModelScorer` scores through this module, so both read the same token. A module (not a
    function) so that DDP can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """attention_mask None: no row is padded (`batching.collate`)."""
        backbone, head = backbone_and_head(self.model)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, D)
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)
        last = (positions * attention_mask).argmax(-1) if attention_mask is not None \
            else torch.full((B,), T - 1, device=input_ids.device)  # (B,) last real token, right or left padding
        return head(hidden[torch.arange(B, device=hidden.device), last])[:, 0]  # (B,)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a generation: EOS, the chat template's end-of-turn token, and the model's
    generation_config EOS ids (Qwen-style models list several)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            if tokenizer.convert_ids_to_tokens(tid) == t:
                ids.add(tid)
    gc = getattr(model, "generation_config", None) if model is not None else None
    if gc is not None and gc.eos_token_id is not None:
        ids.update([gc.eos_token_id] if isinstance(gc.eos_token_id, int) else gc.eos_token_id)
    return sorted(ids)


def init_model(arch: str, size: str, tokenizer, seed: int = 0, **overrides):
    """A randomly initialised causal LM whose vocabulary matches `tokenizer`."""
    import transformers

    if arch not in ARCHS:
        raise SystemExit(f"error: unknown --arch {arch}; choose from {', '.join(ARCHS)}")
    if size not in SIZES:
        raise SystemExit(f"error: unknown --size {size}; choose from {', '.join(SIZES)}")
    cfg_cls = getattr(transformers, ARCHS[arch])
    cfg = cfg_cls(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{"tie_word_embeddings": True, **SIZES[size], **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return model


def prepare(model, cfg):
    """Apply the config's speed options to a loaded model, in place: --autocast bf16 runs the forward
    under `torch.autocast` (bfloat16 matmuls, float32 weights, optimizer state and logits: TRL's and
    accelerate's `bf16=True`); --compile `torch.compile`s it (dynamic shapes, so batches of varying length
    reuse one graph). Weights, state_dict keys and saving are unchanged.

    For a sequence classifier (reward and value models) the backbone is prepared: `LastTokenReward` and
    PPO's per-token values call the backbone and the score head themselves, and the head's scores stay
    float32."""
    classifier = _classifier(model)
    target = getattr(classifier, classifier.base_model_prefix) if classifier is not None else model
    if getattr(cfg, "autocast", "none") == "bf16":
        device_type = next(model.parameters()).device.type
        forward = target.forward

        def autocast_forward(*args, **kwargs):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                out = forward(*args, **kwargs)
            for name in ("logits", "last_hidden_state"):  # losses, log-probs and scores stay float32
                if getattr(out, name, None) is not None:
                    setattr(out, name, getattr(out, name).float())
            return out

        target.forward = autocast_forward
    if getattr(cfg, "compile", False):
        target.compile(dynamic=True)
    return model


def unwrap(model):
    """The underlying HF model of a DDP/compiled wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> None:
    """save_pretrained (safetensors) + tokenizer into `out_dir`, atomically per file: a kill during the
    save leaves either the previous files or the new ones, never a half-written weight file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-save"
    if tmp.exists():
        shutil.rmtree(tmp)
    model = unwrap(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def config_of(path: str | os.PathLike):
    return AutoConfig.from_pretrained(str(path))
