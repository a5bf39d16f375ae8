"""alignkit demo: the main job until the synthetic world exists. From nothing to an assistant on a CPU:
train a tokenizer, create a tiny Llama, pretrain it on the shipped corpus (a continuation machine),
SFT it on the shipped instructions (an assistant), and print both models' answers side by side."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from alignkit.commands import InitModelConfig, encode_prompt, init_model_main
from alignkit.generation import generate
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.recipes import pretrain, sft
from alignkit.tokenizer import TokenizerConfig, main as train_tokenizer_main


@dataclass
class DemoConfig:
    """Tokenizer + tiny model from scratch, pretrain, SFT, then base vs SFT answers."""

    output: str = "runs/demo"
    """Directory for every stage's outputs (tokenizer/, init/, base/, sft/)."""
    pretrain_steps: int = 300
    """Pretraining optimizer steps (batch 16 x 128 tokens)."""
    sft_epochs: float = 20.0
    """SFT passes over the shipped instructions."""
    seed: int = 0
    """Seed of every stage."""
    progress: bool = True
    """Show progress bars."""


def asset(name: str) -> str:
    return str(resources.files("alignkit") / "assets" / name)


def main(cfg: DemoConfig) -> dict:
    out = Path(cfg.output)
    corpus, instructions = asset("corpus.jsonl"), asset("instructions.jsonl")
    timings = {}

    t = time.perf_counter()
    train_tokenizer_main(TokenizerConfig(data=(corpus, instructions), vocab_size=1024, output=str(out / "tokenizer")))
    init_model_main(InitModelConfig(tokenizer=str(out / "tokenizer"), output=str(out / "init"), seed=cfg.seed))
    timings["tokenizer + init"] = time.perf_counter() - t

    t = time.perf_counter()
    pretrain.main(pretrain.PretrainConfig(
        model=str(out / "init"), data=(corpus,), output=str(out / "base"), max_steps=cfg.pretrain_steps,
        batch_size=16, max_length=128, lr=2e-3, warmup_steps=30, seed=cfg.seed, progress=cfg.progress))
    timings["pretrain"] = time.perf_counter() - t

    t = time.perf_counter()
    sft.main(sft.SFTConfig(
        model=str(out / "base"), data=(instructions,), output=str(out / "sft"), epochs=cfg.sft_epochs,
        batch_size=16, max_length=128, lr=1e-3, warmup_steps=10, seed=cfg.seed, progress=cfg.progress))
    timings["sft"] = time.perf_counter() - t

    prompts = [json.loads(line) for line in Path(asset("demo_prompts.jsonl")).read_text().splitlines()]
    answers = {}
    for stage in ("base", "sft"):
        tok = load_tokenizer(out / stage)
        model = load_causal_lm(out / stage)
        ids = [encode_prompt(tok, p["prompt"], chat=True) for p in prompts]
        answers[stage] = [tok.decode(c, skip_special_tokens=True).strip() for c in generate(model, tok, ids, 40)]

    print("\n== base model vs SFT model (greedy; + = the expected answer appears) ==")
    correct = {stage: [p["answer"] in a for p, a in zip(prompts, answers[stage])] for stage in answers}
    for i, p in enumerate(prompts):
        print(f"\nQ: {p['prompt']}   [{p['kind']}; expected: {p['answer']}]")
        for stage in answers:
            print(f"  {stage:<4} {'+' if correct[stage][i] else ' '} {answers[stage][i]!r}")
    print("\n" + "  ".join(f"{stage}: {sum(c)}/{len(c)} correct" for stage, c in correct.items()))
    print("\n== stage timings ==")
    for k, v in timings.items():
        print(f"  {k:<18} {v:7.1f} s")
    result = {"timings": timings, "prompts": prompts, "answers": answers, "correct": correct}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    return result
