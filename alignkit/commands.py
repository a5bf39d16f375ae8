"""Small non-training commands: init-model, generate, chat."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from alignkit.config import Repeatable
from alignkit.generation import generate
from alignkit.models import init_model, load_causal_lm, load_tokenizer, save_model


@dataclass
class InitModelConfig:
    """Create a randomly initialised causal LM (for from-scratch pretraining) sized to a tokenizer."""

    tokenizer: str = ""
    """Tokenizer directory (e.g. from `alignkit train-tokenizer`)."""
    output: str = "runs/model-init"
    """Output model directory."""
    arch: Literal["llama", "qwen2"] = "llama"
    """Architecture (transformers config class)."""
    size: Literal["tiny", "small"] = "tiny"
    """tiny: hidden 192, 4 layers (~2M params with a 1k vocabulary); small: hidden 384, 6 layers."""
    seed: int = 0
    """Initialisation seed."""


def init_model_main(cfg: InitModelConfig) -> None:
    if not cfg.tokenizer:
        raise SystemExit("error: alignkit init-model needs --tokenizer DIR")
    tok = load_tokenizer(cfg.tokenizer)
    model = init_model(cfg.arch, cfg.size, tok, seed=cfg.seed)
    save_model(model, tok, cfg.output)
    n = sum(p.numel() for p in model.parameters())
    print(f"{cfg.arch}/{cfg.size}: {n / 1e6:.2f}M parameters -> {cfg.output}")


@dataclass
class GenerateConfig:
    """Generate completions for prompts given as flags or in a JSONL file."""

    model: str = ""
    """Local Hugging Face model directory."""
    prompt: Annotated[tuple[str, ...], Repeatable] = ()
    """A prompt (repeatable)."""
    data: str | None = None
    """JSONL file of {"prompt": str | messages, ...} records."""
    output: str | None = None
    """Write {"prompt", "completion"} JSONL here instead of printing."""
    chat: bool = True
    """Wrap string prompts in the chat template as a user turn (when the tokenizer has one)."""
    max_new_tokens: int = 64
    """Tokens to generate at most per prompt."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold when sampling."""
    batch_size: int = 32
    """Prompts per generate call."""
    seed: int = 0
    """Sampling seed."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""


def encode_prompt(tokenizer, prompt, chat: bool) -> list[int]:
    from alignkit.data import render_prompt

    if isinstance(prompt, str) and chat and tokenizer.chat_template:
        prompt = [{"role": "user", "content": prompt}]
    return render_prompt(tokenizer, prompt)


def generate_main(cfg: GenerateConfig) -> list[dict]:
    from alignkit.data import load_prompts

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prompts = list(cfg.prompt)
    ids = [encode_prompt(tok, p, cfg.chat) for p in prompts]
    if cfg.data:
        examples, _ = load_prompts([cfg.data], tok)
        prompts += [ex.prompt for ex in examples]
        ids += [ex.prompt_ids for ex in examples]
    if not ids:
        raise SystemExit("error: give --prompt TEXT or --data FILE")
    completions = generate(model, tok, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    rows = [{"prompt": p, "completion": tok.decode(c, skip_special_tokens=True)} for p, c in zip(prompts, completions)]
    if cfg.output:
        with open(cfg.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        for r in rows:
            print(f">>> {r['prompt']}\n{r['completion']}\n")
    return rows


@dataclass
class ChatConfig:
    """Talk to a model in the terminal through its chat template (empty line or Ctrl-D to quit)."""

    model: str = ""
    """Local Hugging Face model directory."""
    system: str | None = None
    """Optional system message."""
    max_new_tokens: int = 128
    """Tokens to generate at most per reply."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold when sampling."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""


def chat_main(cfg: ChatConfig) -> None:
    from alignkit.data import render_prompt

    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply_ids = generate(model, tok, [render_prompt(tok, messages)], cfg.max_new_tokens, cfg.temperature, cfg.top_p)[0]
        reply = tok.decode(reply_ids, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    sys.stdout.flush()
