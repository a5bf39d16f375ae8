"""Small non-training commands: init-model, generate, chat."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

from alignkit.config import Repeatable
from alignkit.decoding import DecodingOptions, SamplingOptions, context_prompt, decode_completion, decoding_rules
from alignkit.generation import generate
from alignkit.models import init_model, load_causal_lm, load_tokenizer, save_model, stop_token_ids


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
class GenerateConfig(DecodingOptions):
    """Generate completions for prompts given as flags or in a JSONL file, with any decoding rules and an
    in-context prefix (--system-prompt, --demonstrations)."""

    model: str = ""
    """Local Hugging Face model directory (or a LoRA run's adapter directory)."""
    prompt: Annotated[tuple[str, ...], Repeatable] = ()
    """A prompt (repeatable)."""
    data: str | None = None
    """JSONL file of {"prompt": str | messages, ...} records."""
    output: str | None = None
    """Write the records as JSONL here instead of printing: each input record with its "completion", in the
    prompt's format (a message-list prompt gets [{"role": "assistant", ...}], a string prompt a string), so
    the file is sft (prompt-completion) data as it was generated."""
    chat: bool = True
    """Wrap --prompt strings in the chat template as a user turn (when the tokenizer has one). --data records
    keep their own format: a string prompt there is plain text, as sft and the other commands read it."""
    max_new_tokens: int = 64
    """Tokens to generate at most per prompt."""
    batch_size: int = 32
    """Prompts per generate call."""
    seed: int = 0
    """Sampling seed."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""


def encode_prompt(tokenizer, prompt, chat: bool) -> list[int]:
    from alignkit.data import render_prompt

    return render_prompt(tokenizer, chat_prompt(tokenizer, prompt, chat))


def chat_prompt(tokenizer, prompt, chat: bool):
    """A string prompt as a user turn when `chat` is asked for and the tokenizer has a chat template."""
    if isinstance(prompt, str) and chat and tokenizer.chat_template:
        return [{"role": "user", "content": prompt}]
    return prompt


# Fields of a prompt record that describe other completions than the one generated for it: a record
# keeping them would be preference data about other text, not sft data.
OTHER_COMPLETIONS = ("completion", "label", "chosen", "rejected")


def with_completion(record: dict, text: str) -> dict:
    """`record` (a prompt and its other columns) with the generated `text` as its completion, in the
    prompt's format: TRL's conversational prompt-completion records for a message-list prompt."""
    completion = text if isinstance(record["prompt"], str) else [{"role": "assistant", "content": text}]
    return {"prompt": record["prompt"], "completion": completion,
            **{k: v for k, v in record.items() if k not in ("prompt", *OTHER_COMPLETIONS)}}


def write_jsonl(path: str, rows: list[dict]) -> None:
    """All rows or none: written beside `path`, then renamed over it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out)


def generate_main(cfg: GenerateConfig) -> list[dict]:
    """Returns the records written to --output, or the (prompt, completion text) pairs printed."""
    from alignkit.data import load_prompts

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    # each prompt as the record it is generated from: a --prompt string wrapped as a user turn is a message list
    records = [{"prompt": chat_prompt(tok, p, cfg.chat)} for p in cfg.prompt]
    ids = [encode_prompt(tok, r["prompt"], chat=False) for r in records]
    shown = list(cfg.prompt)
    if cfg.data:
        examples, _ = load_prompts([cfg.data], tok)
        records += [{"prompt": ex.prompt, **ex.columns} for ex in examples]
        ids += [ex.prompt_ids for ex in examples]
        shown += [ex.prompt for ex in examples]
    if not ids:
        raise SystemExit("error: give --prompt TEXT or --data FILE")
    if cfg.system_prompt or cfg.demonstrations:  # the same prompts behind the in-context prefix
        ids = [context_prompt(tok, r["prompt"], cfg) for r in records]
    model = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)
    rules = decoding_rules(cfg, tok, model)
    completions = generate(model, tok, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, rules)
    stops = stop_token_ids(tok, model)
    decoded = [decode_completion(tok, c, rules, stops) for c in completions]
    texts = [text for text, _ in decoded]
    cut = sum(not ended for _, ended in decoded)
    if cut:
        print(f"note: {cut} of {len(completions)} completions reached --max-new-tokens {cfg.max_new_tokens} "
              "without a stop token or stop string", file=sys.stderr)
    if not cfg.output:
        rows = [{"prompt": p, "completion": t} for p, t in zip(shown, texts)]
        for r in rows:
            prompt = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
            print(f">>> {prompt}\n{r['completion']}\n")
        return rows
    # sft (and every other command) refuses an empty completion, so a model that stopped at once gives no record
    rows = [with_completion(r, t) for r, t in zip(records, texts) if t.strip()]
    if len(rows) < len(records):
        print(f"note: {len(records) - len(rows)} of {len(records)} completions were empty (the model stopped at "
              f"once); {cfg.output} leaves them out", file=sys.stderr)
    replaced = [r for r in records if any(k in r for k in OTHER_COMPLETIONS)]
    if replaced:
        fields = ", ".join(k for k in OTHER_COMPLETIONS if any(k in r for r in replaced))
        print(f"note: {len(replaced)} records had fields about other completions ({fields}); {cfg.output} has "
              "the generated completion in their place", file=sys.stderr)
    write_jsonl(cfg.output, rows)
    return rows


@dataclass
class ChatConfig(SamplingOptions):
    """Talk to a model in the terminal through its chat template (empty line or Ctrl-D to quit)."""

    model: str = ""
    """Local Hugging Face model directory (or a LoRA run's adapter directory)."""
    system: str | None = None
    """Optional system message."""
    max_new_tokens: int = 128
    """Tokens to generate at most per reply."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""


def chat_main(cfg: ChatConfig) -> None:
    from alignkit.data import render_prompt

    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    rules = decoding_rules(cfg, tok, model)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:  # Ctrl-D: end the prompt's line, as Enter would have
            print()
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply_ids = generate(model, tok, [render_prompt(tok, messages)], cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                             rules=rules)[0]
        reply = tok.decode(reply_ids, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    sys.stdout.flush()
