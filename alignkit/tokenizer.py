"""alignkit train-tokenizer: a byte-level BPE that is a normal Hugging Face tokenizer directory, with
ChatML special tokens and a chat template whose `{% generation %}` markers let
`apply_chat_template(return_assistant_tokens_mask=True)` find the assistant tokens."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.config import Repeatable

# <|endoftext|> ends documents in pretraining; <|im_end|> ends chat turns. Both stop generation.
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE tokenizer (with chat template) from text or chat data."""

    data: Annotated[tuple[str, ...], Repeatable] = ()
    """JSONL files; every string in a record (text, messages' content, prompt, ...) is training text. Repeatable."""
    vocab_size: int = 1024
    """Vocabulary size including special tokens."""
    output: str = "runs/tokenizer"
    """Output directory (a Hugging Face tokenizer directory)."""
    min_frequency: int = 2
    """Merges must occur at least this often."""


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main(cfg: TokenizerConfig) -> None:
    from alignkit.data import read_records

    if not cfg.data:
        raise SystemExit("error: alignkit train-tokenizer needs --data FILE")
    texts = [s for path in cfg.data for _, rec in read_records(path) for s in _strings(rec)]
    tok = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)
    tok.save_pretrained(cfg.output)
    print(f"tokenizer with {len(tok)} tokens trained on {len(texts)} strings -> {cfg.output}")
