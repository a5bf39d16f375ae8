"""Tiny byte-level BPE tokenizers with ChatML templates, built in memory (never downloaded).

Same construction as /work/shared/bench/make_fixture.py (smaller vocab, smaller corpus)."""
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the a an of to and in is was for on with as by at from that this it be are were has have had not but or "
         "model data train reward policy value human answer question explain simple moon rocket earth water boil "
         "mountain river city people learn teach good bad better best write poem story short long step think "
         "number add subtract apples lunch bought used how many what why when where who which small large").split()

# exactly the fixture template (make_fixture.py); note transformers renders with trim_blocks, so the "\n"
# after {% endif %} disappears and turns are not separated by a newline
CHATML_GEN = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_PLAIN = CHATML_GEN.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# real-world ChatML (Qwen style): a newline after every <|im_end|>, outside the generation block
CHATML_NL_GEN = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
                 "{% else %}{{ m['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_NL_PLAIN = CHATML_NL_GEN.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# generation prompt differs from how assistant turns are rendered: not prefix-consistent
INCONSISTENT = CHATML_PLAIN.replace("{% if add_generation_prompt %}<|im_start|>assistant\n",
                                    "{% if add_generation_prompt %}<|im_start|>bot\n")


def _sent(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="session")
def _tokenizer_object():
    rng = random.Random(0)
    corpus = [" ".join(_sent(rng, rng.randint(5, 14)) for _ in range(3)) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _make(tok, template):
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                 pad_token="<|pad|>")
    ft.chat_template = template
    return ft


@pytest.fixture(scope="session")
def tok(_tokenizer_object):
    """Fixture-style ChatML template WITH {% generation %} markers."""
    return _make(_tokenizer_object, CHATML_GEN)


@pytest.fixture(scope="session")
def tok_plain(_tokenizer_object):
    """Same template without generation markers (prefix-rendering fallback path)."""
    return _make(_tokenizer_object, CHATML_PLAIN)


@pytest.fixture(scope="session")
def tok_nl(_tokenizer_object):
    return _make(_tokenizer_object, CHATML_NL_GEN)


@pytest.fixture(scope="session")
def tok_nl_plain(_tokenizer_object):
    return _make(_tokenizer_object, CHATML_NL_PLAIN)


@pytest.fixture(scope="session")
def tok_inconsistent(_tokenizer_object):
    return _make(_tokenizer_object, INCONSISTENT)


@pytest.fixture(scope="session")
def tok_notemplate(_tokenizer_object, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_notemplate")
    ft = _make(_tokenizer_object, None)
    ft.save_pretrained(d)
    return PreTrainedTokenizerFast.from_pretrained(d)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name="data.jsonl") -> path; a str row is written verbatim (for malformed lines)."""
    def write(rows, name="data.jsonl"):
        p = tmp_path / name
        with open(p, "w") as f:
            for r in rows:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return p
    return write


@pytest.fixture(scope="session")
def make_tok(_tokenizer_object):
    """make_tok(template) -> tokenizer with the shared vocabulary and the given chat template."""
    return lambda template: _make(_tokenizer_object, template)
