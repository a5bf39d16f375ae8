"""Reading files, format detection, conversions (no tokenizer needed)."""
import json
import logging
import sys
import types

import pytest

from alignkit.data import FORMATS, DataError, DataStats, detect_format, read_records
from alignkit.data.formats import check_messages, split_implicit_prompt, to_conversation


# ---------------------------------------------------------------- read_records

def test_read_jsonl_line_numbers_skip_blank_lines(write_jsonl):
    p = write_jsonl([{"text": "a"}, "", "   ", {"text": "b"}])
    assert list(read_records(p)) == [(1, {"text": "a"}), (4, {"text": "b"})]


def test_read_jsonl_malformed_json_names_file_and_line(write_jsonl):
    p = write_jsonl([{"text": "a"}, {"text": "b"}, '{"text": "c",}'])
    with pytest.raises(DataError) as ei:
        list(read_records(p))
    e = ei.value
    assert str(e).startswith(f"{p}:3: malformed JSON")
    assert (e.path, e.line) == (str(p), 3)


def test_read_jsonl_non_object_line(write_jsonl):
    p = write_jsonl([{"text": "a"}, [1, 2]])
    with pytest.raises(DataError, match=r":2: expected a JSON object per line, got a JSON array"):
        list(read_records(p))


def test_read_json_array_and_json_lines(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert list(read_records(arr)) == [(1, {"text": "x"}), (2, {"text": "y"})]
    lines = tmp_path / "b.json"
    lines.write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert list(read_records(lines)) == [(1, {"text": "x"}), (3, {"text": "y"})]


def test_read_bad_utf8(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        list(read_records(p))


def test_read_unsupported_extension_and_missing_file(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.csv: unsupported file type '.csv'"):
        list(read_records(p))
    with pytest.raises(DataError, match=r"nope.jsonl: no such file"):
        list(read_records(tmp_path / "nope.jsonl"))


def test_parquet_without_datasets_package(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as ei:
        list(read_records(p))
    assert str(ei.value).startswith(f"{p}: reading .parquet files needs the optional 'datasets' package")
    assert "pip install 'alignkit[datasets]'" in str(ei.value)


def test_parquet_and_arrow_go_through_datasets(tmp_path, monkeypatch):
    calls = []

    class FakeDataset:
        @staticmethod
        def from_parquet(path):
            calls.append(("parquet", path))
            return [{"text": "r1"}, {"text": "r2"}]

        @staticmethod
        def from_file(path):
            calls.append(("arrow", path))
            return [{"prompt": "p"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(Dataset=FakeDataset))
    (tmp_path / "d.parquet").write_bytes(b"")
    (tmp_path / "d.arrow").write_bytes(b"")
    assert list(read_records(tmp_path / "d.parquet")) == [(1, {"text": "r1"}), (2, {"text": "r2"})]
    assert list(read_records(tmp_path / "d.arrow")) == [(1, {"prompt": "p"})]
    assert calls == [("parquet", str(tmp_path / "d.parquet")), ("arrow", str(tmp_path / "d.arrow"))]


def test_data_error_format():
    assert str(DataError("x/y.jsonl", 7, "bad thing")) == "x/y.jsonl:7: bad thing"
    assert isinstance(DataError("f", 1, "p"), ValueError)


# ---------------------------------------------------------------- detect_format

M = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize("record,fmt", [
    ({"text": "t"}, "text"),
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"messages": M}, "messages"),
    ({"conversations": [{"from": "human", "value": "v"}]}, "sharegpt"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
    ({"chosen": M, "rejected": M}, "preference"),
    ({"prompt": "p", "completion": "c", "label": True}, "unpaired_preference"),
    ({"prompt": "p", "answer": "4"}, "prompt_only"),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_detect_format_names_every_format():
    assert set(FORMATS) == {"text", "alpaca", "messages", "sharegpt", "prompt_completion", "preference",
                            "unpaired_preference", "prompt_only"}


@pytest.mark.parametrize("record,msg", [
    ({"foo": 1}, "unknown record format (fields: 'foo'); expected one of: text {\"text\"}, alpaca"),
    ({"chosen": "c"}, "record has 'chosen' but no 'rejected' field"),
    ({"rejected": "c", "prompt": "p"}, "record has 'rejected' but no 'chosen' field"),
    ({"completion": "c"}, "record has 'completion' but no 'prompt' field"),
    ({"prompt": "p", "label": True}, "record has 'prompt' and 'label' but no 'completion' field"),
    ({"instruction": "i"}, "record has 'instruction' but no 'output' field"),
    ({}, "unknown record format (fields: none)"),
])
def test_detect_format_errors(record, msg):
    with pytest.raises(ValueError) as ei:
        detect_format(record)
    assert msg in str(ei.value)


def test_unknown_format_lists_expected_formats():
    with pytest.raises(ValueError) as ei:
        detect_format({"question": "q", "response": "r"})
    for name in FORMATS:
        assert name in str(ei.value)


# ---------------------------------------------------------------- conversions

def test_sharegpt_conversion():
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "H"},
                             {"from": "gpt", "value": "G"}, {"from": "user", "value": "U"},
                             {"from": "chatgpt", "value": "C"}, {"from": "Human", "value": "H2"},
                             {"from": "bot", "value": "B"}, {"from": "assistant", "value": "A"}]}
    assert to_conversation(rec, "sharegpt") == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "H"},
        {"role": "assistant", "content": "G"}, {"role": "user", "content": "U"},
        {"role": "assistant", "content": "C"}, {"role": "user", "content": "H2"},
        {"role": "assistant", "content": "B"}, {"role": "assistant", "content": "A"}]


def test_sharegpt_unknown_speaker():
    with pytest.raises(ValueError, match=r"conversations\[1\] has from='robot'; expected one of human/user"):
        to_conversation({"conversations": [{"from": "human", "value": "h"}, {"from": "robot", "value": "r"}]},
                        "sharegpt")


def test_alpaca_conversion():
    assert to_conversation({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca") == [
        {"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    for rec in ({"instruction": "Say hi.", "input": "", "output": "Hi"},
                {"instruction": "Say hi.", "output": "Hi"},
                {"instruction": "Say hi.", "input": None, "output": "Hi"}):
        assert to_conversation(rec, "alpaca") == [{"role": "user", "content": "Say hi."},
                                                  {"role": "assistant", "content": "Hi"}]
    with pytest.raises(ValueError, match="field 'output' is empty"):
        to_conversation({"instruction": "i", "output": "  "}, "alpaca")


@pytest.mark.parametrize("msgs,msg", [
    ([{"role": "robot", "content": "x"}], "messages[0] has role 'robot'; allowed roles: system, user, assistant"),
    ([{"role": "user", "content": 3}], "messages[0].content must be a string, got a JSON number"),
    ([{"role": "user"}], "messages[0] has no 'content' field"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
     "messages[1] (assistant) has empty content"),
    ([], "field 'messages' is an empty list of messages"),
    ("hello", "field 'messages' must be a list of messages, got a JSON string"),
    (["hello"], "messages[0] must be an object with 'role' and 'content', got a JSON string"),
])
def test_check_messages_errors(msgs, msg):
    with pytest.raises(ValueError) as ei:
        check_messages(msgs)
    assert str(ei.value) == msg


def test_check_messages_keeps_role_and_content_only():
    assert check_messages([{"role": "user", "content": "q", "name": "bob"}]) == [{"role": "user", "content": "q"}]


def u(x):
    return {"role": "user", "content": x}


def a(x):
    return {"role": "assistant", "content": x}


def test_split_implicit_prompt():
    (p, c), (p2, r) = split_implicit_prompt([u("q"), a("good")], [u("q"), a("bad")])
    assert p == p2 == [u("q")] and c == [a("good")] and r == [a("bad")]
    # shared history: the prompt is everything up to the last common user turn
    (p, c), (_, r) = split_implicit_prompt([u("q"), a("x"), u("q2"), a("good")], [u("q"), a("x"), u("q2"), a("bad")])
    assert p == [u("q"), a("x"), u("q2")] and c == [a("good")] and r == [a("bad")]
    # divergence at a user turn: back up to the previous assistant turn
    (p, c), (_, r) = split_implicit_prompt([u("q"), a("x"), u("A"), a("y")], [u("q"), a("x"), u("B"), a("z")])
    assert p == [u("q")] and c == [a("x"), u("A"), a("y")] and r == [a("x"), u("B"), a("z")]
    # identical conversations: the prompt is all but the last turn
    (p, c), (_, r) = split_implicit_prompt([u("q"), a("same")], [u("q"), a("same")])
    assert p == [u("q")] and c == r == [a("same")]


def test_split_implicit_prompt_errors():
    with pytest.raises(ValueError, match="share no prompt turns"):
        split_implicit_prompt([u("q1"), a("x")], [u("q2"), a("y")])
    with pytest.raises(ValueError, match="for plain-text pairs add a 'prompt' field"):
        split_implicit_prompt("q good", "q bad")


# ---------------------------------------------------------------- stats

def test_stats_summary_and_warn(caplog):
    s = DataStats(read=10, kept=8, truncated=1, dropped=2)
    s.note("prompt alone fills max_length", 2)
    assert s.summary() == ("read 10 records, kept 8 examples, truncated 1, dropped 2 "
                           "(prompt alone fills max_length: 2)")
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        assert s.warn() == "data: " + s.summary()
    assert caplog.records[-1].getMessage() == "data: " + s.summary()
    assert DataStats(read=3, kept=3).warn() is None
