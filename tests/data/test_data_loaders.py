"""The loaders the recipes call: every format, every bad-input case, truncation and stats."""

import pytest

from alignkit.data import (DataError, DataStats, Example, PreferenceExample, PromptExample, UnpairedExample,
                           load_preference, load_prompts, load_sft, load_text, load_unpaired, render_prompt)


from helpers import a, s, spans, u  # noqa: E402  (message builders shared by the data tests)


def data_error(fn, *args, **kw) -> DataError:
    with pytest.raises(DataError) as ei:
        fn(*args, **kw)
    return ei.value


# ---------------------------------------------------------------- load_text

def test_load_text(tok, write_jsonl):
    p = write_jsonl([{"text": "The moon is a rock."}, "", {"text": "Water boil."}])
    docs = list(load_text([str(p)], tok))
    assert docs == [tok("The moon is a rock.")["input_ids"] + [tok.eos_token_id],
                    tok("Water boil.")["input_ids"] + [tok.eos_token_id]]
    assert tok.decode(docs[0]) == "The moon is a rock.<|im_end|>"  # no BOS: this tokenizer adds none


def test_load_text_rejects_other_records(tok, write_jsonl):
    p = write_jsonl([{"text": "ok"}, {"text": "ok"}, {"messages": [u("q"), a("x")]}])
    e = data_error(lambda: list(load_text([str(p)], tok)))
    assert str(e).startswith(f"{p}:3: a messages record")
    assert "cannot be used for pretraining" in str(e) and 'text {"text"}' in str(e)
    p = write_jsonl([{"text": 5}], name="t2.jsonl")
    assert str(data_error(lambda: list(load_text([str(p)], tok)))) == \
        f"{p}:1: field 'text' must be a string, got a JSON number"
    p = write_jsonl([{"text": ""}], name="t3.jsonl")
    assert str(data_error(lambda: list(load_text([str(p)], tok)))) == f"{p}:1: field 'text' is empty"


# ---------------------------------------------------------------- load_sft: formats

def test_load_sft_every_format(tok, write_jsonl):
    p = write_jsonl([
        {"messages": [s("Be brief."), u("Moon?"), a("A rock.")]},
        {"conversations": [{"from": "human", "value": "Water?"}, {"from": "gpt", "value": "It boils."}]},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5."},
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
        {"prompt": "Q: why?", "completion": " A: because."},
        {"prompt": [u("Q?")], "completion": [a("Yes.")]},
    ])
    exs, stats = load_sft([str(p)], tok, max_length=512)
    assert stats == DataStats(read=6, kept=6)
    assert all(isinstance(e, Example) and len(e.input_ids) == len(e.loss_mask) for e in exs)
    assert [spans(tok, e) for e in exs] == [["A rock.<|im_end|>"], ["It boils.<|im_end|>"], ["5.<|im_end|>"],
                                            ["Hi.<|im_end|>"], [" A: because.<|im_end|>"], ["Yes.<|im_end|>"]]
    assert tok.decode(exs[1].input_ids) == "<|im_start|>user\nWater?<|im_end|><|im_start|>assistant\nIt boils.<|im_end|>"
    assert tok.decode(exs[2].input_ids) == \
        "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|><|im_start|>assistant\n5.<|im_end|>"
    assert tok.decode(exs[3].input_ids) == "<|im_start|>user\nSay hi.<|im_end|><|im_start|>assistant\nHi.<|im_end|>"
    assert tok.decode(exs[4].input_ids) == "Q: why? A: because.<|im_end|>"


def test_load_sft_multi_turn_mask(tok, tok_plain, write_jsonl):
    p = write_jsonl([{"messages": [s("Sys."), u("One?"), a("First."), u("Two?"), a("Second.")]}])
    (e1,), _ = load_sft([str(p)], tok, max_length=512)
    (e2,), _ = load_sft([str(p)], tok_plain, max_length=512)
    assert e1 == e2
    assert spans(tok, e1) == ["First.<|im_end|>", "Second.<|im_end|>"]
    masked_out = tok.decode([t for t, m in zip(e1.input_ids, e1.loss_mask) if not m])
    assert masked_out == ("<|im_start|>system\nSys.<|im_end|><|im_start|>user\nOne?<|im_end|><|im_start|>assistant\n"
                          "<|im_start|>user\nTwo?<|im_end|><|im_start|>assistant\n")


def test_load_sft_several_files_and_path_argument(tok, write_jsonl):
    p1 = write_jsonl([{"messages": [u("a?"), a("b.")]}], name="one.jsonl")
    p2 = write_jsonl([{"messages": [u("c?"), a("d.")]}, {"messages": [u("e?"), a("f.")]}], name="two.jsonl")
    exs, stats = load_sft([str(p1), p2], tok, max_length=64)
    assert [spans(tok, e) for e in exs] == [["b.<|im_end|>"], ["d.<|im_end|>"], ["f.<|im_end|>"]]
    assert (stats.read, stats.kept) == (3, 3)
    assert len(load_sft(str(p1), tok, max_length=64)[0]) == 1  # a single path is accepted too


# ---------------------------------------------------------------- load_sft: bad input

GOOD = {"messages": [u("q?"), a("x.")]}


@pytest.mark.parametrize("bad,problem", [
    ('{"messages": [', "malformed JSON"),
    ({"messages": [u("q"), {"role": "robot", "content": "x"}]},
     "messages[1] has role 'robot'; allowed roles: system, user, assistant"),
    ({"messages": [u("q"), {"role": "assistant", "content": ["x"]}]},
     "messages[1].content must be a string, got a JSON array"),
    ({"messages": "q"}, "field 'messages' must be a list of messages, got a JSON string"),
    ({"messages": [u("q"), a("")]}, "messages[1] (assistant) has empty content"),
    ({"messages": [u("q"), a("x"), u("more?")]},
     "conversation ends with a 'user' turn; it must end with an assistant turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "alien", "value": "x"}]},
     "conversations[1] has from='alien'"),
    ({"instruction": "i", "input": 3, "output": "o"}, "field 'input' must be a string, got a JSON number"),
    ({"instruction": "i", "output": ""}, "field 'output' is empty"),
    ({"prompt": "p", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": "p", "completion": 7}, "must all be strings or all be message lists (got prompt=string, "
                                       "completion=number)"),
    ({"prompt": [u("q")], "completion": [a(" ")]}, "completion[0] (assistant) has empty content"),
    ({"prompt": [u("q")], "completion": [u("x")]}, "completion starts with a 'user' turn"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "a preference record"),
    ({"text": "t"}, "a text record {\"text\"} cannot be used for SFT (use it for pretraining)"),
    ({"question": "q", "answer": "a"}, "unknown record format (fields: 'question', 'answer'); expected one of"),
    ({"prompt": "p", "answer": "4"}, "a prompt_only record"),
])
def test_load_sft_bad_input(bad, problem, tok, write_jsonl):
    p = write_jsonl([GOOD, GOOD, "", bad, GOOD], name="sft_bad.jsonl")
    e = data_error(load_sft, [str(p)], tok, max_length=512)
    assert str(e).startswith(f"{p}:4: ")
    assert problem in str(e)
    assert (e.path, e.line) == (str(p), 4)


def test_load_sft_wrong_format_lists_accepted_formats(tok, write_jsonl):
    p = write_jsonl([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    msg = str(data_error(load_sft, [str(p)], tok, max_length=512))
    assert "SFT data must be one of: messages" in msg
    for name in ("messages", "sharegpt", "alpaca", "prompt_completion"):
        assert name in msg


def test_load_sft_no_chat_template(tok_notemplate, write_jsonl):
    p = write_jsonl([{"prompt": "p", "completion": "c"}, GOOD])
    e = data_error(load_sft, [str(p)], tok_notemplate, max_length=512)
    assert str(e).startswith(f"{p}:2: tokenizer ")
    assert tok_notemplate.name_or_path in str(e) and "alignkit train-tokenizer" in str(e)
    # plain-text prompt/completion needs no template
    assert len(load_sft([str(write_jsonl([{"prompt": "p", "completion": "c"}], name="pc.jsonl"))],
                        tok_notemplate, max_length=512)[0]) == 1


def test_load_sft_inconsistent_template(tok_inconsistent, write_jsonl):
    p = write_jsonl([GOOD, GOOD])
    e = data_error(load_sft, [str(p)], tok_inconsistent, max_length=512)
    assert str(e).startswith(f"{p}:1: the chat template") and "not prefix-consistent" in str(e)


# ---------------------------------------------------------------- load_sft: truncation

def test_load_sft_truncation_counted(tok, write_jsonl):
    long_answer = "The moon rocket is a good story about water and the river. " * 4
    rows = [{"messages": [u("Hi?"), a("Short.")]},
            {"messages": [u("Tell me."), a(long_answer)]},
            {"messages": [u("A very long question about the moon and the river and water " * 6), a("Yes.")]}]
    p = write_jsonl(rows)
    full, st_full = load_sft([str(p)], tok, max_length=10_000)
    assert st_full == DataStats(read=3, kept=3)
    n_prompt_2 = len(render_prompt(tok, [u("Tell me.")]))
    n_prompt_3 = len(render_prompt(tok, rows[2]["messages"][:1]))
    max_length = n_prompt_2 + 5
    assert len(full[0]) <= max_length < n_prompt_3
    exs, stats = load_sft([str(p)], tok, max_length=max_length)
    assert (stats.read, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert stats.reasons == {"nothing trainable left after truncation to max_length": 1}
    assert exs[0] == full[0]
    assert exs[1].input_ids == full[1].input_ids[:max_length] and exs[1].loss_mask == full[1].loss_mask[:max_length]
    assert sum(exs[1].loss_mask) == 5
    assert "truncated 1, dropped 1" in stats.summary()
    assert stats.warn() is not None


def test_load_sft_strict(tok, write_jsonl):
    p = write_jsonl([GOOD, {"messages": [u("Tell me."), a("The moon rocket is a good story. " * 5)]}])
    n = len(load_sft([str(p)], tok, max_length=10_000)[0][1])
    e = data_error(load_sft, [str(p)], tok, max_length=20, strict=True)
    assert str(e) == (f"{p}:2: sequence is {n} tokens, longer than max_length=20 "
                      "(strict mode; without it the example would be truncated)")


# ---------------------------------------------------------------- load_preference

def test_load_preference_strings(tok, write_jsonl):
    p = write_jsonl([{"prompt": "Q: why?", "chosen": " Because.", "rejected": " No."}])
    (ex,), stats = load_preference([str(p)], tok, max_length=128)
    assert isinstance(ex, PreferenceExample) and stats == DataStats(read=1, kept=1)
    assert ex.prompt_ids == tok("Q: why?")["input_ids"]
    assert tok.decode(ex.chosen_ids) == " Because.<|im_end|>" and tok.decode(ex.rejected_ids) == " No.<|im_end|>"


@pytest.mark.parametrize("fixture", ["tok", "tok_plain", "tok_nl", "tok_nl_plain"])
def test_load_preference_conversational(fixture, request, write_jsonl):
    t = request.getfixturevalue(fixture)
    p = write_jsonl([{"prompt": [s("Sys."), u("Moon?")], "chosen": [a("A rock.")], "rejected": [a("Cheese.")]}])
    (ex,), _ = load_preference([str(p)], t, max_length=128)
    assert ex.prompt_ids == render_prompt(t, [s("Sys."), u("Moon?")])
    # completion ends with <|im_end|>; the newline some templates put after it is not part of it
    assert t.decode(ex.chosen_ids) == "A rock.<|im_end|>"
    assert t.decode(ex.rejected_ids) == "Cheese.<|im_end|>"
    full = t.apply_chat_template([s("Sys."), u("Moon?"), a("A rock.")], tokenize=False)
    assert full.startswith(t.decode(ex.prompt_ids + ex.chosen_ids))


def test_load_preference_implicit_prompt(tok, write_jsonl):
    p = write_jsonl([{"chosen": [u("Q1?"), a("A1."), u("Q2?"), a("Good.")],
                      "rejected": [u("Q1?"), a("A1."), u("Q2?"), a("Bad.")]}])
    (ex,), _ = load_preference([str(p)], tok, max_length=128)
    assert ex.prompt_ids == render_prompt(tok, [u("Q1?"), a("A1."), u("Q2?")])
    assert tok.decode(ex.chosen_ids) == "Good.<|im_end|>" and tok.decode(ex.rejected_ids) == "Bad.<|im_end|>"


def test_load_preference_chosen_equals_rejected_kept_and_counted(tok, write_jsonl):
    p = write_jsonl([{"prompt": "q", "chosen": " same", "rejected": " same"},
                     {"prompt": "q", "chosen": " x", "rejected": " y"}])
    exs, stats = load_preference([str(p)], tok, max_length=128)
    assert len(exs) == 2 and exs[0].chosen_ids == exs[0].rejected_ids
    assert stats.reasons == {"chosen identical to rejected (kept)": 1}
    assert stats.warn() is not None


def test_load_preference_truncation_and_strict(tok, write_jsonl):
    long = " the moon rocket water" * 10
    p = write_jsonl([{"prompt": "Q:", "chosen": " Yes.", "rejected": long},
                     {"prompt": "the moon rocket water " * 10, "chosen": " a", "rejected": " b"}])
    (full1, full2), _ = load_preference([str(p)], tok, max_length=10_000)
    max_length = len(full1.prompt_ids) + 6
    assert len(full2.prompt_ids) >= max_length
    exs, stats = load_preference([str(p)], tok, max_length=max_length)
    assert (stats.read, stats.kept, stats.truncated, stats.dropped) == (2, 1, 1, 1)
    assert stats.reasons == {"prompt alone fills max_length": 1}
    (ex,) = exs
    assert ex.prompt_ids == full1.prompt_ids
    assert ex.chosen_ids == full1.chosen_ids  # already short enough
    assert ex.rejected_ids == full1.rejected_ids[:6]
    n = len(full1.prompt_ids) + len(full1.rejected_ids)
    e = data_error(load_preference, [str(p)], tok, max_length=max_length, strict=True)
    assert str(e).startswith(f"{p}:1: prompt + longest completion is {n} tokens, longer than max_length={max_length}")


@pytest.mark.parametrize("bad,problem", [
    ({"prompt": "q", "completion": "c", "label": True}, "a unpaired_preference record"),
    ({"prompt": [u("q")], "chosen": "x", "rejected": [a("y")]}, "must all be strings or all be message lists"),
    ({"prompt": [u("q"), a("x")], "chosen": [a("y")], "rejected": [a("z")]}, "prompt ends with an assistant turn"),
    ({"prompt": [u("q")], "chosen": [a("y"), u("z")], "rejected": [a("z")]},
     "chosen ends with a 'user' turn; it must end with an assistant turn"),
    ({"prompt": "q", "chosen": "", "rejected": "r"}, "field 'chosen' is empty"),
    ({"chosen": "q good", "rejected": "q bad"}, "for plain-text pairs add a 'prompt' field"),
    ({"chosen": [u("q1"), a("x")], "rejected": [u("q2"), a("y")]}, "share no prompt turns"),
    ({"chosen": [u("q")]}, "record has 'chosen' but no 'rejected' field"),
])
def test_load_preference_bad_input(bad, problem, tok, write_jsonl):
    good = {"prompt": "q", "chosen": " a", "rejected": " b"}
    p = write_jsonl([good, bad], name="pref_bad.jsonl")
    e = data_error(load_preference, [str(p)], tok, max_length=128)
    assert str(e).startswith(f"{p}:2: ") and problem in str(e)


# ---------------------------------------------------------------- load_unpaired

def test_load_unpaired(tok, write_jsonl):
    p = write_jsonl([{"prompt": "Q:", "completion": " good", "label": True},
                     {"prompt": [u("Q?")], "completion": [a("Bad.")], "label": False}])
    exs, stats = load_unpaired([str(p)], tok, max_length=128)
    assert stats == DataStats(read=2, kept=2)
    assert all(isinstance(e, UnpairedExample) for e in exs)
    assert [(tok.decode(e.prompt_ids), tok.decode(e.completion_ids), e.label) for e in exs] == [
        ("Q:", " good<|im_end|>", True),
        ("<|im_start|>user\nQ?<|im_end|><|im_start|>assistant\n", "Bad.<|im_end|>", False)]


def test_load_unpaired_from_paired_file(tok, write_jsonl):
    p = write_jsonl([{"prompt": [u("Q?")], "chosen": [a("Yes.")], "rejected": [a("No.")]},
                     {"chosen": [u("R?"), a("Up.")], "rejected": [u("R?"), a("Down.")]}])
    exs, stats = load_unpaired([str(p)], tok, max_length=128)
    assert (stats.read, stats.kept) == (2, 4)
    assert [(tok.decode(e.completion_ids), e.label) for e in exs] == [
        ("Yes.<|im_end|>", True), ("No.<|im_end|>", False), ("Up.<|im_end|>", True), ("Down.<|im_end|>", False)]
    assert exs[0].prompt_ids == exs[1].prompt_ids == render_prompt(tok, [u("Q?")])
    assert exs[2].prompt_ids == render_prompt(tok, [u("R?")])


def test_load_unpaired_bad_label_and_truncation(tok, write_jsonl):
    p = write_jsonl([{"prompt": "q", "completion": " c", "label": True},
                     {"prompt": "q", "completion": " c", "label": 1}])
    assert str(data_error(load_unpaired, [str(p)], tok, max_length=64)) == \
        f"{p}:2: field 'label' must be true or false, got 1"
    p = write_jsonl([{"prompt": "Q:", "completion": " the moon rocket water" * 5, "label": False}], name="u2.jsonl")
    (full,), _ = load_unpaired([str(p)], tok, max_length=10_000)
    ml = len(full.prompt_ids) + 3
    (ex,), stats = load_unpaired([str(p)], tok, max_length=ml)
    assert ex.completion_ids == full.completion_ids[:3] and ex.label is False
    assert (stats.kept, stats.truncated) == (1, 1)
    with pytest.raises(DataError, match=r"u2.jsonl:1: prompt \+ longest completion is"):
        load_unpaired([str(p)], tok, max_length=ml, strict=True)


# ---------------------------------------------------------------- load_prompts

def test_load_prompts_keeps_extra_columns(tok, write_jsonl):
    rows = [{"prompt": [u("What is 2 plus 3?")], "answer": "5", "meta": {"id": 7}},
            {"prompt": "Question: 1 plus 1?", "answer": "2"}]
    p = write_jsonl(rows)
    exs, stats = load_prompts([str(p)], tok)
    assert stats == DataStats(read=2, kept=2)
    assert all(isinstance(e, PromptExample) for e in exs)
    assert exs[0].prompt == rows[0]["prompt"] and exs[0].columns == {"answer": "5", "meta": {"id": 7}}
    assert tok.decode(exs[0].prompt_ids) == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|><|im_start|>assistant\n"
    assert exs[1].prompt == "Question: 1 plus 1?" and exs[1].columns == {"answer": "2"}
    assert exs[1].prompt_ids == tok("Question: 1 plus 1?")["input_ids"]


def test_load_prompts_from_other_formats_with_prompt(tok, write_jsonl):
    p = write_jsonl([{"prompt": "q", "chosen": " a", "rejected": " b"}, {"prompt": "r", "completion": " c"}])
    exs, _ = load_prompts([str(p)], tok)
    assert [(e.prompt, e.columns) for e in exs] == [("q", {"chosen": " a", "rejected": " b"}),
                                                    ("r", {"completion": " c"})]


def test_load_prompts_max_length_and_errors(tok, write_jsonl):
    p = write_jsonl([{"prompt": "short", "answer": "1"}, {"prompt": "the moon rocket water " * 10, "answer": "2"}])
    n_long = len(tok("the moon rocket water " * 10)["input_ids"])
    exs, stats = load_prompts([str(p)], tok, max_prompt_length=8)
    assert [e.columns["answer"] for e in exs] == ["1"]
    assert (stats.read, stats.kept, stats.dropped) == (2, 1, 1)
    assert stats.reasons == {"prompt longer than max_prompt_length": 1}
    e = data_error(load_prompts, [str(p)], tok, max_prompt_length=8, strict=True)
    assert str(e).startswith(f"{p}:2: prompt is {n_long} tokens, longer than max_prompt_length=8")
    for bad, problem in [({"messages": [u("q"), a("x")]}, "a messages record"),
                         ({"prompt": [u("q"), a("x")]}, "prompt ends with an assistant turn"),
                         ({"prompt": ""}, "field 'prompt' is empty"),
                         ({"prompt": 3}, "field 'prompt' must be a string or a list of messages, got a JSON number")]:
        p = write_jsonl([{"prompt": "ok"}, bad], name="pr_bad.jsonl")
        e = data_error(load_prompts, [str(p)], tok)
        assert str(e).startswith(f"{p}:2: ") and problem in str(e), str(e)


# ---------------------------------------------------------------- many records

@pytest.mark.parametrize("fixture", ["tok", "tok_plain"])
def test_load_sft_1000_conversations(fixture, request, write_jsonl):
    """A thousand multi-turn conversations load with every turn masked (no timing assertion: CI machines'
    speed varies)."""
    t = request.getfixturevalue(fixture)
    text = "The moon rocket is a good story about water and the river and people who learn."
    rows = [{"messages": [s("Be helpful."), u(f"{i}: {text}"), a(text * 3), u("Why?"), a(f"Because {i}.")]}
            for i in range(1000)]
    p = write_jsonl(rows)
    exs, stats = load_sft([str(p)], t, max_length=4096)
    assert stats.kept == 1000 and spans(t, exs[999]) == [text * 3 + "<|im_end|>", "Because 999.<|im_end|>"]
