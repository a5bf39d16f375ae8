"""Loading, creating and saving Hugging Face causal LMs (safetensors only, no remote code unless asked)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig)
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from alignkit.errors import UserError

# Architectures `alignkit init-model` can create, at two sizes. `tiny` is the 1.9M-parameter shape
# sized for pretraining on a 2-core CPU.
SIZES = {
    "tiny": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=2048),
}
ARCHS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}


class ModelDirError(UserError, OSError):
    """A path given as a model directory that cannot be loaded as one (an OSError, like transformers' own)."""


ADAPTER_CONFIG = "adapter_config.json"  # what a LoRA run without --merge-lora writes (peft's save_pretrained)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _local_dir(path: str | os.PathLike) -> Path:
    """`path` as an existing directory, or a one-line error saying what it is instead."""
    if not str(path):  # Path("") is ".", the working directory: never what an empty flag meant
        raise ModelDirError("no model directory given (an empty path)")
    p = Path(path)
    if p.is_file():
        raise ModelDirError(f"{p} is a file, not a model directory (a Hugging Face model directory holds "
                            "config.json, *.safetensors and the tokenizer files)")
    if not p.is_dir():
        raise ModelDirError(f"model directory {p} does not exist (expected a local Hugging Face model directory)")
    return p


def is_adapter_dir(p: Path) -> bool:
    """A PEFT adapter directory (what a LoRA run without --merge-lora writes), not a full model."""
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def _not_a_model(p: Path) -> str:
    """What a directory without config.json or adapter_config.json holds, for the error that refuses it."""
    entries = sorted(p.iterdir())
    if not entries:
        return f"{p} is an empty directory, not a model directory"
    runs = [e.name + "/" for e in entries
            if e.is_dir() and ((e / "config.json").is_file() or (e / ADAPTER_CONFIG).is_file())]
    if runs:
        more = f", ... ({len(runs)} in all)" if len(runs) > 8 else ""
        return f"{p} is not a model directory; it holds runs: {', '.join(runs[:8])}{more}"
    steps = sorted((p / "checkpoints").glob("step-*")) if (p / "checkpoints").is_dir() else []
    if steps:
        return (f"{p} is a run without its final model (it stopped before the end); continue it with --resume, "
                f"or load its last checkpoint {steps[-1]}")
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        return (f"{p} holds a tokenizer but no model (no config.json); create a model for it with "
                f"`alignkit init-model --tokenizer {p}`")
    names = [e.name + ("/" if e.is_dir() else "") for e in entries]
    return (f"{p} is not a model directory (no config.json or {ADAPTER_CONFIG}); it holds "
            f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")


def _adapter_config(p: Path) -> dict:
    try:
        config = json.loads((p / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{p / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not config.get("base_model_name_or_path"):
        raise ModelDirError(f"{p / ADAPTER_CONFIG}: no base_model_name_or_path; the adapter does not say which "
                            "model it adapts")
    return config


def adapter_base(p: Path) -> Path:
    """The base model directory of the PEFT adapter directory `p`: adapter_config.json's
    base_model_name_or_path, absolute, relative to the working directory (where peft itself looks; a
    run records --model as it was given) or relative to the adapter directory."""
    name = _adapter_config(p)["base_model_name_or_path"]
    tried = [Path(name)] if Path(name).is_absolute() else [Path(name), p / name]
    for base in tried:
        if base.is_dir():
            return base
    where = " or ".join(str(t) for t in dict.fromkeys(tried))
    raise ModelDirError(f"{p} is a LoRA adapter of {name}, which is not a local directory (looked for {where}); "
                        f"alignkit loads local models only: point base_model_name_or_path in {p / ADAPTER_CONFIG} "
                        "to the base model's directory")


def _check_model_dir(path: str | os.PathLike) -> Path:
    """`path` as a loadable model directory: a Hugging Face model (config.json + safetensors) or a PEFT
    adapter (adapter_config.json + adapter_model.safetensors)."""
    p = _local_dir(path)
    adapter = is_adapter_dir(p)
    if not adapter and not (p / "config.json").is_file():
        raise ModelDirError(_not_a_model(p))
    weights = ["adapter_model.safetensors"] if adapter else ["*.safetensors", "*.safetensors.index.json"]
    if not any(any(p.glob(w)) for w in weights):
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickled weights are not loaded, convert them to safetensors)" \
            if pickled else ""
        raise SystemExit(f"error: {p} has no {'adapter_model' if adapter else ''}.safetensors weights{hint}")
    return p


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a model directory, a tokenizer directory, or a PEFT adapter directory (its own
    tokenizer when the run saved one, else its base model's)."""
    p = _local_dir(path)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        if (p / ADAPTER_CONFIG).is_file():
            return load_tokenizer(adapter_base(p), trust_remote_code)
        if (p / "config.json").is_file():
            raise ModelDirError(f"{p} is a model directory without a tokenizer (none of "
                                f"{', '.join(TOKENIZER_FILES)})")
        raise ModelDirError(_not_a_model(p))
    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked out of every loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("loading a LoRA adapter directory needs peft: pip install 'alignkit[peft]'") from None
    return peft


@contextmanager
def _quiet_transformers():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _load(path, auto_class, dtype: str, trust_remote_code: bool, meta: bool = False, **kwargs):
    """`auto_class.from_pretrained` on a model directory; on an adapter directory, its base loaded the
    same way (recursively: an adapter may adapt another run's adapter) with the adapters merged in.
    `meta`: the same model without its weights, on the meta device (`parallel.shard_from_main` fills it)."""
    p = _check_model_dir(path)
    if meta:
        config = config_of(p)
        for k, v in kwargs.items():  # e.g. num_labels of a reward model
            setattr(config, k, v)
        with torch.device("meta"):
            return auto_class.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    if not is_adapter_dir(p):
        return auto_class.from_pretrained(
            str(p), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    peft = _peft()
    config = peft.PeftConfig.from_pretrained(str(p))
    scorer = config.task_type == "SEQ_CLS"
    if scorer and auto_class is AutoModelForCausalLM:
        raise ModelDirError(f"{p} is a LoRA adapter of a reward model (peft task_type SEQ_CLS): it scores text, it "
                            "does not generate; give it as --reward-model")
    if scorer:
        with safe_open(str(p / "adapter_model.safetensors"), "pt") as f:
            if not any(k.endswith("score.weight") for k in f.keys()):
                raise ModelDirError(f"{p} is a reward-model adapter without its score head (not in modules_to_save)")
    base = adapter_base(p)
    if base.resolve() == p.resolve():
        raise ModelDirError(f"{p / ADAPTER_CONFIG}: base_model_name_or_path names the adapter directory itself")
    # a scorer's head is not new (the adapter carries it), so the base's report of a missing score.weight would mislead
    with _quiet_transformers() if scorer else nullcontext():
        model = _load(base, auto_class, dtype, trust_remote_code, **kwargs)
    # task_type None: the adapters go onto whichever head `auto_class` has (an SFT adapter under a new reward head)
    config.task_type = None
    model = peft.PeftModel.from_pretrained(model, str(p), config=config).merge_and_unload()
    model.requires_grad_(True)  # peft loads for inference (frozen); as from_pretrained, every weight can train
    if scorer:
        model.config.architectures = [type(model).__name__]  # a trained scorer, as a saved reward model says
    # peft records a model's name_or_path as the base of adapters trained on it: this adapter directory,
    # which loads as this merged model
    model.name_or_path = model.config.name_or_path = str(path)
    return model


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False,
                   device: str | torch.device = "cpu", meta: bool = False):
    """A causal LM from a model directory, or from a PEFT adapter directory as its base with the adapters
    merged in. Safetensors only; no remote code unless asked. `meta`: its structure only, on the meta device."""
    model = _load(path, AutoModelForCausalLM, dtype, trust_remote_code, meta=meta)
    return model if meta else model.to(device)


def load_reward_model(path, dtype: str = "float32", trust_remote_code: bool = False, device="cpu", *,
                      pad_token_id: int | None = None, task_type: str | None = None, meta: bool = False):
    """A causal LM directory (or a saved reward model) as a sequence classifier with one output.

    Same contract as `models.load_causal_lm`, adapter directories included: a reward model saved as a
    LoRA adapter (peft task_type SEQ_CLS, its head in modules_to_save) loads as that trained scorer. The
    head (`score`) is newly initialised when `path` holds a causal LM (or a causal LM's adapter).
    `config.pad_token_id` must be set: HF scores a row at its rightmost token that is not padding.
    `task_type` is accepted (and ignored) because `lora.load_trainable` passes its keyword arguments on
    to the loader."""
    new_head = _holds_a_causal_lm(_check_model_dir(path))
    try:
        # transformers' load report would list the expected new head as MISSING: say it once, plainly
        with _quiet_transformers() if new_head else nullcontext():
            model = _load(path, AutoModelForSequenceClassification, dtype, trust_remote_code, meta=meta, num_labels=1)
    except ValueError as e:  # an architecture without a ...ForSequenceClassification class
        raise UserError(f"{path} cannot be loaded as a reward model (sequence classifier): {e}") from None
    if new_head and not meta and int(os.environ.get("RANK", "0")) == 0:
        print(f"{path} is a causal LM: its score head is new (one output), initialised here")
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise UserError(f"{path}: no pad_token_id; a reward model needs one to find each row's last token")
    return model if meta else model.to(device)


def _holds_a_causal_lm(p: Path) -> bool:
    """Whether a model (or adapter) directory holds a causal LM rather than a trained sequence classifier."""
    if is_adapter_dir(p):
        return json.loads((p / ADAPTER_CONFIG).read_text()).get("task_type") != "SEQ_CLS"
    architectures = json.loads((p / "config.json").read_text()).get("architectures") or []
    return not any("SequenceClassification" in a for a in architectures)


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
    """Token ids that end a generation: the end-of-turn tokens the data layer trains on
    (`alignkit.data.end_of_turn_ids`: EOS, the chat template's end-of-turn token) and the model's
    generation_config EOS ids (Qwen-style models list several)."""
    from alignkit.data.templates import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer)
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
    reuse one graph); --gradient-checkpointing recomputes each decoder layer's activations in backward
    (`checkpoint_layers`: only where something is being trained). Weights, state_dict keys and saving are
    unchanged. A causal LM also gets the `token_labels=` forward
    (`install_token_logps`) before autocast and compile wrap it.

    For a sequence classifier (reward and value models) the backbone is prepared: `LastTokenReward` and
    PPO's per-token values call the backbone and the score head themselves, and the head's scores stay
    float32."""
    classifier = _classifier(model)
    target = getattr(classifier, classifier.base_model_prefix) if classifier is not None else model
    if getattr(cfg, "gradient_checkpointing", False):
        checkpoint_layers(model)
    if classifier is None:
        install_token_logps(model)
    if getattr(cfg, "autocast", "none") == "bf16":
        forward = target.forward

        def autocast_forward(*args, **kwargs):
            # the device at call time: a model built on the meta device is materialised after `prepare`
            with torch.autocast(next(target.parameters()).device.type, dtype=torch.bfloat16):
                out = forward(*args, **kwargs)
            for name in ("logits", "last_hidden_state"):  # losses, log-probs and scores stay float32
                if getattr(out, name, None) is not None:
                    setattr(out, name, getattr(out, name).float())
            return out

        target.forward = autocast_forward
    if getattr(cfg, "compile", False):
        target.compile(dynamic=True)
    return model


def checkpoint_layers(model) -> None:
    """Activation (gradient) checkpointing of every decoder layer of `model` (transformers'
    `GradientCheckpointingLayer`s), non-reentrant (`torch.utils.checkpoint`, use_reentrant=False: works with
    frozen embeddings and LoRA, DDP, FSDP2 and torch.compile): a layer keeps only its inputs in forward and
    recomputes its activations in backward. Idempotent.

    transformers' own `gradient_checkpointing_enable` checkpoints only modules in training mode, and alignkit
    trains the DPO family, KTO and PPO in eval mode (dropout off), so each layer's `forward` is wrapped here
    instead, checkpointing whenever a backward can follow: gradients enabled, and the layer has a trainable
    parameter or an input that requires grad. Frozen references and teachers (no grad, or nothing to
    differentiate) and generation (no grad, a KV cache) run the layer as it is."""
    from torch.utils.checkpoint import checkpoint
    from transformers.cache_utils import Cache
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise UserError(f"--gradient-checkpointing: {type(unwrap(model)).__name__} has no decoder layers that "
                        "transformers can checkpoint")
    for layer in layers:
        if getattr(layer, "_alignkit_checkpointed", False):
            continue

        def checkpointed(*args, _forward=layer.forward, _layer=layer, **kwargs):
            values = (*args, *kwargs.values())
            backward_follows = torch.is_grad_enabled() and not any(isinstance(v, Cache) for v in values) and (
                any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)
                or any(p.requires_grad for p in _layer.parameters()))
            if not backward_follows:
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
        layer._alignkit_checkpointed = True


@dataclass
class TokenLogpsOutput(ModelOutput):
    """What a causal LM's forward returns when called with `token_labels=` (`install_token_logps`)."""

    logps: torch.Tensor | None = None
    """(B, T) or (B, W): log pi(label) at each scored position; 0 where the label is < 0."""
    entropy: torch.Tensor | None = None
    """Same shape: entropy of the (temperature-scaled) next-token distribution there, with `token_entropy=True`."""
    last_hidden_state: torch.Tensor | None = None
    """(B, T, H) final hidden states (None on the full-logits fallback)."""
    hidden_states: tuple | None = None
    """Every layer's hidden states, with `output_hidden_states=True`."""


def _causal_lm(model):
    """The HF causal LM inside DDP/compile and peft wrappers."""
    m = unwrap(model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def _fused_head(m):
    """(backbone, output nn.Linear) when the logits are `lm_head(backbone(...).last_hidden_state)` and
    nothing else, else None: softcapped or scaled logits (Gemma 2, Cohere) and adapted output layers (LoRA
    on lm_head) take the full-logits path."""
    prefix = getattr(m, "base_model_prefix", "")
    backbone = getattr(m, prefix, None) if prefix else None
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    config = getattr(m, "config", None)
    if not isinstance(backbone, torch.nn.Module) or backbone is m or type(head) is not torch.nn.Linear:
        return None
    if getattr(config, "final_logit_softcapping", None) is not None or getattr(config, "logit_scale", None) is not None:
        return None
    return backbone, head


def _at_positions(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, ...) at positions (B, W) -> (B, W, ...), or x itself."""
    if positions is None:
        return x
    rows = torch.arange(x.shape[0], device=x.device)[:, None]  # (B, 1)
    return x[rows, positions]


@torch.compiler.disable  # eager: data-dependent row selection and Python loops over blocks
def _hidden_token_logps(hidden, weight, bias, labels, positions, temperature, entropy):
    from alignkit.losses import linear_token_logps

    hidden = _at_positions(hidden, positions)  # (B, W, H)
    B, W = labels.shape
    out = linear_token_logps(hidden.reshape(B * W, -1), weight, labels.reshape(-1), bias,
                             temperature=temperature, entropy=entropy)
    return tuple(t.reshape(B, W) for t in out) if entropy else (out.reshape(B, W), None)


def _logits_token_logps(logits, labels, positions, temperature, entropy):
    """The full-logits path: the same quantities from (B, T, V) logits."""
    from alignkit.losses import token_entropy, token_logps

    logits = _at_positions(logits, positions)  # (B, W, V)
    logits = logits / temperature if temperature != 1.0 else logits
    keep = labels >= 0  # (B, W)
    logps = torch.where(keep, token_logps(logits, labels.clamp(min=0)), 0.0)  # (B, W)
    return logps, torch.where(keep, token_entropy(logits), 0.0) if entropy else None


def install_token_logps(model) -> bool:
    """Give the HF causal LM inside `model` (through DDP, compile and peft wrappers) an instance-level
    forward that also takes

        token_labels (B, T) or (B, W) long: the token each position is scored on; < 0 = not scored,
        token_positions (B, W) long or None: score hidden state positions[b, j] on token_labels[b, j],
        token_temperature float (1.0): divide the logits by it,
        token_entropy bool (False): also return the entropy there,

    and then returns a `TokenLogpsOutput` (`.logps`, `.entropy`) instead of logits: the backbone runs, and
    `losses.linear_token_logps` applies the output layer in blocks, so no (B, T, V) logits exist. Without
    `token_labels` it is the original forward. Callers call it through whatever wrapper they hold (DDP's
    forward syncs gradients, FSDP's root hooks unshard, compile and peft wrap `forward`), which is why this
    is a forward and not a function of the unwrapped model. Models whose logits are not a plain nn.Linear of
    the last hidden state (`_fused_head`) compute full logits and the same outputs from them.
    Idempotent; installed by `prepare`, and by `logprobs` on models that were not prepared. Returns whether
    the model has it (False for a model that is not a transformers causal LM: callers take full logits)."""
    m = _causal_lm(model)
    if getattr(m, "_alignkit_token_logps", False):
        return True
    if not hasattr(m, "get_output_embeddings"):
        return False
    original = m.forward

    def forward(*args, token_labels=None, token_positions=None, token_temperature: float = 1.0,
                token_entropy: bool = False, **kwargs):
        if token_labels is None:
            return original(*args, **kwargs)
        fused = _fused_head(m)
        if fused is None:
            out = original(*args, **kwargs)
            logps, entropy = _logits_token_logps(out.logits, token_labels, token_positions, token_temperature,
                                                 token_entropy)
            return TokenLogpsOutput(logps=logps, entropy=entropy, hidden_states=getattr(out, "hidden_states", None))
        backbone, head = fused
        for key in ("labels", "logits_to_keep", "return_dict"):  # the head's arguments (peft passes them as None)
            kwargs.pop(key, None)
        out = backbone(*args, **kwargs)
        hidden = out.last_hidden_state  # (B, T, H)
        logps, entropy = _hidden_token_logps(hidden, head.weight, head.bias, token_labels, token_positions,
                                             token_temperature, token_entropy)
        return TokenLogpsOutput(logps=logps, entropy=entropy, last_hidden_state=hidden,
                                hidden_states=getattr(out, "hidden_states", None))

    m.forward = forward
    m._alignkit_token_logps = True
    return True


def forward_token_logps(model, *, token_labels, token_positions=None, token_temperature: float = 1.0,
                        token_entropy: bool = False, **kwargs) -> TokenLogpsOutput:
    """`model(**kwargs, token_labels=..., ...)` through its wrappers (`install_token_logps`); a model that is
    not a transformers causal LM is called for its full logits and scored from them."""
    if install_token_logps(model):
        return model(**kwargs, token_labels=token_labels, token_positions=token_positions,
                     token_temperature=token_temperature, token_entropy=token_entropy)
    out = model(**kwargs)
    logps, entropy = _logits_token_logps(out.logits, token_labels, token_positions, token_temperature, token_entropy)
    return TokenLogpsOutput(logps=logps, entropy=entropy, hidden_states=getattr(out, "hidden_states", None))


def unwrap(model):
    """The underlying HF model of a DDP/compiled wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_kwargs(model) -> dict:
    """Extra save_pretrained arguments: peft's default "auto" would look the base up (on the Hub when it is
    an adapter directory, which has no config.json) to see whether the vocabulary grew; alignkit never resizes it."""
    return dict(save_embedding_layers=False) if hasattr(unwrap(model), "peft_config") else {}


def save_model(model, tokenizer, out_dir: str | os.PathLike, write=None) -> None:
    """save_pretrained (safetensors) + tokenizer into `out_dir`, atomically per file: a kill during the
    save leaves either the previous files or the new ones, never a half-written weight file. `write(dir)`:
    what writes the model's files instead of its save_pretrained (`parallel.write_pretrained` of a sharded
    model); weight files of an earlier save that this one did not write are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-save"
    if tmp.exists():
        shutil.rmtree(tmp)
    model = unwrap(model)
    if write is None:
        model.save_pretrained(tmp, safe_serialization=True, **save_kwargs(model))
    else:
        tmp.mkdir()
        write(tmp)
    tokenizer.save_pretrained(tmp)
    written = {f.name for f in tmp.iterdir()}
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        if stale.name not in written:  # e.g. one model.safetensors where this save wrote several files
            stale.unlink()


def config_of(path: str | os.PathLike):
    """The transformers config of a model directory, or of an adapter directory's base."""
    p = _check_model_dir(path)
    return config_of(adapter_base(p)) if is_adapter_dir(p) else AutoConfig.from_pretrained(str(p))
