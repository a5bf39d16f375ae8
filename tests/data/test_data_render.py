"""Chat-template rendering and loss masks."""
import random

import pytest

from alignkit.data import (ChatTemplateError, Example, has_generation_markers, render_messages, render_prompt,
                           render_prompt_completion)


from helpers import a, s, spans, u  # noqa: E402  (message builders shared by the data tests)


def unmasked(tokenizer, ex):
    return tokenizer.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if not m])


CHATML_GEN_CONTENT_ONLY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}{% endgeneration %}<|im_end|>{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONV = [s("Be brief."), u("What is the moon?"), a("A rock."), u("Why?"), a("Because the earth.")]


def test_generation_markers_detected(tok, tok_plain):
    assert has_generation_markers(tok) is True
    assert has_generation_markers(tok_plain) is False


@pytest.mark.parametrize("fixture", ["tok", "tok_plain", "tok_nl", "tok_nl_plain"])
def test_multi_turn_mask(fixture, request):
    t = request.getfixturevalue(fixture)
    ex = render_messages(t, CONV)
    assert isinstance(ex, Example) and len(ex.input_ids) == len(ex.loss_mask)
    assert t.decode(ex.input_ids) == t.apply_chat_template(CONV, tokenize=False)
    # both assistant turns are trained on, each including its <|im_end|>, nothing else
    assert spans(t, ex) == ["A rock.<|im_end|>", "Because the earth.<|im_end|>"]
    nl = "\n" if fixture.startswith("tok_nl") else ""
    assert unmasked(t, ex) == (f"<|im_start|>system\nBe brief.<|im_end|>{nl}<|im_start|>user\nWhat is the moon?"
                               f"<|im_end|>{nl}<|im_start|>assistant\n{nl}<|im_start|>user\nWhy?<|im_end|>{nl}"
                               f"<|im_start|>assistant\n{nl}")


def test_mask_exact_positions(tok):
    ex = render_messages(tok, [u("Hi."), a("Good.")])
    # transformers 5: apply_chat_template(tokenize=True) returns a BatchEncoding (return_dict defaults to True)
    header = tok.apply_chat_template([u("Hi.")], tokenize=True, add_generation_prompt=True)["input_ids"]
    answer = tok("Good.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == header + answer
    assert ex.loss_mask == [0] * len(header) + [1] * len(answer)
    assert ex.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def _random_convs(n, seed=0):
    rng = random.Random(seed)
    words = "the moon rocket water boil river city people learn teach good bad why how many apples".split()

    def txt():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))).capitalize() + rng.choice(".?!")

    convs = []
    for _ in range(n):
        c = [s(txt())] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            c += [u(txt()), a(txt())]
        convs.append(c)
    return convs


@pytest.mark.parametrize("pair", [("tok", "tok_plain"), ("tok_nl", "tok_nl_plain")])
def test_generation_markers_and_fallback_give_identical_masks(pair, request):
    with_markers, without = (request.getfixturevalue(f) for f in pair)
    n_checked = 0
    for conv in _random_convs(60):
        e1 = render_messages(with_markers, conv)
        e2 = render_messages(without, conv)
        e3 = render_messages(with_markers, conv, use_generation_markers=False)
        assert e1 == e2 == e3
        assert len(spans(with_markers, e1)) == sum(m["role"] == "assistant" for m in conv)
        n_checked += 1
    assert n_checked == 60


def test_generation_block_without_end_of_turn_token_is_extended(make_tok, tok):
    # markers around the content only: the end-of-turn token after the block is still trained on
    t = make_tok(CHATML_GEN_CONTENT_ONLY)
    ex = render_messages(t, CONV)
    assert spans(t, ex) == ["A rock.<|im_end|>", "Because the earth.<|im_end|>"]
    assert ex == render_messages(tok, CONV)


def test_no_chat_template_error(tok_notemplate):
    with pytest.raises(ChatTemplateError) as ei:
        render_messages(tok_notemplate, [u("q"), a("x")])
    msg = str(ei.value)
    assert tok_notemplate.name_or_path in msg and "tok_notemplate" in msg
    assert "has no chat template" in msg and "alignkit train-tokenizer" in msg
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        render_prompt(tok_notemplate, [u("q")])


def test_prefix_inconsistent_template_error(tok_inconsistent):
    with pytest.raises(ChatTemplateError) as ei:
        render_messages(tok_inconsistent, [u("q"), a("x")])
    msg = str(ei.value)
    assert "not prefix-consistent" in msg and "{% generation %}" in msg
    assert "messages[:1] with the generation prompt is not a token prefix of messages[:2]" in msg


def test_assistant_first_needs_markers(tok, tok_plain):
    assert spans(tok, render_messages(tok, [a("Hello."), u("q"), a("x")])) == ["Hello.<|im_end|>", "x<|im_end|>"]
    with pytest.raises(ChatTemplateError, match="starts with an assistant turn"):
        render_messages(tok_plain, [a("Hello."), u("q"), a("x")])


def test_render_prompt(tok, tok_nl):
    assert tok.decode(render_prompt(tok, [s("S."), u("Q?")])) == \
        "<|im_start|>system\nS.<|im_end|><|im_start|>user\nQ?<|im_end|><|im_start|>assistant\n"
    assert tok_nl.decode(render_prompt(tok_nl, [u("Q?")])) == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "Question: why?") == tok("Question: why?")["input_ids"]


def test_render_prompt_completion_strings(tok):
    ex = render_prompt_completion(tok, "Q: why?", " A: because.")
    p = tok("Q: why?")["input_ids"]
    c = tok(" A: because.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p + c + [tok.eos_token_id]
    assert ex.loss_mask == [0] * len(p) + [1] * (len(c) + 1)
    assert spans(tok, ex) == [" A: because.<|im_end|>"]


@pytest.mark.parametrize("fixture", ["tok", "tok_plain", "tok_nl_plain"])
def test_render_prompt_completion_conversational(fixture, request):
    t = request.getfixturevalue(fixture)
    # an assistant turn inside the prompt is context, not trained on
    ex = render_prompt_completion(t, [u("Q1?"), a("A1."), u("Q2?")], [a("A2.")])
    assert spans(t, ex) == ["A2.<|im_end|>"]
    assert t.decode(ex.input_ids) == t.apply_chat_template([u("Q1?"), a("A1."), u("Q2?"), a("A2.")], tokenize=False)
    # multi-turn completion: every assistant turn of the completion
    ex = render_prompt_completion(t, [u("Q1?")], [a("A1."), u("Q2?"), a("A2.")])
    assert spans(t, ex) == ["A1.<|im_end|>", "A2.<|im_end|>"]


def test_render_prompt_completion_mixed_types(tok):
    with pytest.raises(ValueError, match="must all be strings or all be message lists"):
        render_prompt_completion(tok, "Q?", [a("x")])
