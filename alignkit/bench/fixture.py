"""The CPU benchmark fixture: a tiny random Llama + BPE tokenizer with a chat template, and SFT,
preference and prompt JSONL files.

A port of the shared `make_fixture.py` that writes byte-identical files: every `rng` call happens in
the same order as there, so do not reorder, batch or "simplify" the generators below.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the a an of to and in is was for on with as by at from that this it be are were has have had not but or "
         "model data train reward policy value human answer question explain simple moon rocket earth water boil "
         "mountain river city people learn teach good bad better best write poem story short long step think "
         "number add subtract apples lunch bought used how many what why when where who which small large").split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_fixture(out_dir: str | Path) -> dict:
    """Write OUT/model (tokenizer + random-init weights), sft.jsonl, pref.jsonl and prompts.jsonl.
    Returns {"params": parameter count, "dir": OUT}."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    def sent(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    def para(n_words):
        s = []
        while sum(len(x.split()) for x in s) < n_words:
            s.append(sent(rng.randint(5, 14)))
        return " ".join(s)

    corpus = [para(rng.randint(20, 200)) for _ in range(3000)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2048, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>", pad_token="<|pad|>")
    ft.chat_template = CHAT_TEMPLATE
    model_dir = out / "model"
    ft.save_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=len(ft), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=ft.bos_token_id, eos_token_id=ft.eos_token_id, pad_token_id=ft.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)

    def write(name, rows):
        with (out / name).open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    # SFT: conversational, variable lengths (so padding-free / length-grouped batching matters)
    write("sft.jsonl", [{"messages": [{"role": "user", "content": para(rng.randint(8, 40))},
                                      {"role": "assistant", "content": para(rng.randint(10, 300))}]}
                        for _ in range(1024)])

    def pref():
        p = para(rng.randint(8, 40))
        return {"prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": para(rng.randint(10, 200))}],
                "rejected": [{"role": "assistant", "content": para(rng.randint(10, 200))}]}

    write("pref.jsonl", [pref() for _ in range(512)])
    # prompt-only rows for GRPO: arithmetic with a verifiable answer
    rows = []
    for _ in range(256):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "answer": str(a + b)})
    write("prompts.jsonl", rows)
    return {"params": sum(p.numel() for p in model.parameters()), "dir": str(out)}


# Published configurations of real models (random weights here): what decides memory and speed at real scale is
# the vocabulary, width and depth, not the weights. Each entry: the transformers config class and its fields.
SHAPES = {
    # Qwen/Qwen2.5-0.5B config.json: 494M parameters, 358M without the (tied) embedding.
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                         tie_word_embeddings=True)),
    # meta-llama/Llama-3.2-1B config.json: 1.24B parameters.
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                         head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                                         rms_norm_eps=1e-5, tie_word_embeddings=True)),
}


def shaped_config(shape: str, tokenizer=None, **overrides):
    """The transformers config of `shape` (SHAPES), with the tokenizer's special token ids when given. The
    vocabulary stays the published one even where the tokenizer has fewer tokens (as Qwen's own 151,936 rows
    exceed its tokenizer's 151,665): the logits are (B, T, vocab_size) either way."""
    import transformers

    if shape not in SHAPES:
        raise SystemExit(f"error: --shape {shape}: unknown; choose from tiny, {', '.join(SHAPES)}")
    cls, fields = SHAPES[shape]
    ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id)
    return getattr(transformers, cls)(**{**fields, **ids, **overrides})


def make_shaped(out_dir: str | Path, shape: str = "qwen2.5-0.5b", seed: int = 0, **overrides) -> dict:
    """Write OUT/model (the fixture's tokenizer + random weights with the published config of `shape`),
    OUT/sft.jsonl (answers long enough to fill 512 tokens), pref.jsonl (~300-token sequences) and
    prompts.jsonl (arithmetic with an `answer`). `overrides` change config fields (e.g. num_hidden_layers
    for a cheap test). Returns {"params": parameter count, "dir": OUT, "shape": shape}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiny = out / "tiny"
    if not (tiny / "model" / "tokenizer.json").is_file():
        make_fixture(tiny)  # its BPE tokenizer and chat template, trained the same way every time
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    model_dir = out / "model"
    tok.save_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shaped_config(shape, tok, **overrides))
    model.save_pretrained(model_dir)

    rng = random.Random(seed)

    def text(n_words):
        return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."

    def write(name, rows):
        with (out / name).open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    write("sft.jsonl", [{"messages": [{"role": "user", "content": text(30)},
                                      {"role": "assistant", "content": text(600)}]} for _ in range(64)])
    write("pref.jsonl", [{"prompt": [{"role": "user", "content": text(30)}],
                          "chosen": [{"role": "assistant", "content": text(rng.randint(180, 220))}],
                          "rejected": [{"role": "assistant", "content": text(rng.randint(180, 220))}]}
                         for _ in range(64)])
    rows = []
    for _ in range(64):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "answer": str(a + b)})
    write("prompts.jsonl", rows)
    return {"params": sum(p.numel() for p in model.parameters()), "dir": str(out), "shape": shape}
