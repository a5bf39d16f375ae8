"""User errors in data files: one DataError (a UserError, printed by the CLI as one line) naming the file and,
where there is one, the line; conversations the templates accept but that are usually mistakes are counted."""
import pytest

from alignkit.data import load_preference, load_prompts, load_sft, load_text, load_unpaired
from alignkit.errors import DataError, UserError

from helpers import a, run_cli, s, u  # noqa: E402

GOOD = {"messages": [u("q?"), a("x.")]}
LOADERS = {
    "sft": lambda p, t, **kw: load_sft([str(p)], t, max_length=256, **kw),
    "preference": lambda p, t, **kw: load_preference([str(p)], t, max_length=256, **kw),
    "unpaired": lambda p, t, **kw: load_unpaired([str(p)], t, max_length=256, **kw),
    "prompts": lambda p, t, **kw: load_prompts([str(p)], t, **kw),
    "text": lambda p, t, **kw: list(load_text([str(p)], t)),
}
GOODS = {"sft": GOOD, "preference": {"prompt": "q", "chosen": " a", "rejected": " b"},
         "unpaired": {"prompt": "q", "completion": " a", "label": True}, "prompts": {"prompt": "q"},
         "text": {"text": "The moon."}}


def data_error(fn, *args, **kw) -> DataError:
    with pytest.raises(DataError) as ei:
        fn(*args, **kw)
    assert isinstance(ei.value, UserError)
    return ei.value


ROBOT = {"role": "robot", "content": "x"}
BAD = {  # per loader: a wrong role, and a field of the wrong type
    "sft": [({"messages": [u("q"), ROBOT]}, "messages[1] has role 'robot'"),
            ({"messages": [u("q"), a(["x"])]}, "messages[1].content must be a string, got a JSON array")],
    "preference": [({"prompt": [u("q")], "chosen": [ROBOT], "rejected": [a("y")]}, "chosen[0] has role 'robot'"),
                   ({"prompt": "q", "chosen": 1, "rejected": " b"}, "must all be strings or all be message lists")],
    "unpaired": [({"prompt": [u("q")], "completion": [ROBOT], "label": True}, "completion[0] has role 'robot'"),
                 ({"prompt": "q", "completion": " a", "label": "yes"}, "field 'label' must be true or false")],
    "prompts": [({"prompt": [ROBOT]}, "prompt[0] has role 'robot'"),
                ({"prompt": {"text": "q"}}, "field 'prompt' must be a string or a list of messages")],
    "text": [({"text": 3}, "field 'text' must be a string, got a JSON number"),
             ({"text": ["q"]}, "field 'text' must be a string, got a JSON array")],
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("case", ["malformed", "nested", "role", "type"])
def test_bad_record_is_a_user_error_at_its_line(loader, case, tok, write_jsonl):
    bad, problem = {"malformed": ('{"messages": [', "malformed JSON"),
                    "nested": ('{"a": ' * 100_000 + "1" + "}" * 100_000, "JSON nested too deeply"),
                    "role": BAD[loader][0], "type": BAD[loader][1]}[case]
    p = write_jsonl([GOODS[loader], bad, GOODS[loader]])
    e = data_error(LOADERS[loader], p, tok)
    assert (e.path, e.line) == (str(p), 2)
    assert str(e).startswith(f"{p}:2: ") and problem in str(e)


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_or_blank_file_names_the_file(loader, content, tok, tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    e = data_error(LOADERS[loader], p, tok)
    assert str(e) == f"{p}: has no records (the file is empty or has only blank lines)"


@pytest.mark.parametrize("loader", list(LOADERS))
def test_directory_as_data(loader, tok, tmp_path):
    (tmp_path / "data").mkdir()
    e = data_error(LOADERS[loader], tmp_path / "data", tok)
    assert str(e).startswith(f"{tmp_path / 'data'}: is a directory; pass the data files themselves")


def test_assistant_first_and_repeated_roles_are_counted_and_strict_refuses(tok, write_jsonl):
    rows = [GOOD,
            {"messages": [a("Hello."), u("q?"), a("x.")]},
            {"messages": [s("S."), a("Hello."), u("q?"), a("x.")]},
            {"messages": [u("q?"), u("and?"), a("x.")]},
            {"messages": [u("q?"), a("x."), a("y.")]}]
    p = write_jsonl(rows)
    exs, stats = load_sft([str(p)], tok, max_length=256)
    assert len(exs) == 5
    assert stats.reasons == {"conversation starts with an assistant turn (kept)": 2,
                             "conversation repeats a role in consecutive turns (kept)": 2}
    assert "conversation starts with an assistant turn (kept): 2" in stats.warn()
    e = data_error(load_sft, [str(p)], tok, max_length=256, strict=True)
    assert str(e) == (f"{p}:2: conversation starts with an assistant turn (strict mode; without it the "
                      "conversation is kept and counted)")
    p = write_jsonl([GOOD, rows[3]], name="repeat.jsonl")
    assert str(data_error(load_sft, [str(p)], tok, max_length=256, strict=True)) == (
        f"{p}:2: conversation has two user turns in a row (strict mode; without it the conversation is kept "
        "and counted)")
    # preference and prompt data too
    p = write_jsonl([{"prompt": [u("q?"), u("more?")], "chosen": [a("y")], "rejected": [a("n")]}], name="pr.jsonl")
    assert load_preference([str(p)], tok, max_length=256)[1].reasons == {
        "conversation repeats a role in consecutive turns (kept)": 2}
    assert load_prompts([str(p)], tok)[1].reasons == {"conversation repeats a role in consecutive turns (kept)": 1}
    with pytest.raises(DataError, match=r"pr.jsonl:1: conversation has two user turns in a row"):
        load_prompts([str(p)], tok, strict=True)


def test_cli_prints_one_line_for_bad_data(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]}\n'
                   '{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]}\n')
    r = run_cli("sft", "--model", str(tiny_model), "--data", str(bad), "--output", str(tmp_path / "out"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {bad}:2: messages[1] has role 'robot'; allowed roles: system, user, assistant"


def test_cli_names_an_empty_data_file(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = run_cli("sft", "--model", str(tiny_model), "--data", str(empty), "--output", str(tmp_path / "out"))
    assert (r.returncode, r.stderr.strip()) == (
        1, f"error: {empty}: has no records (the file is empty or has only blank lines)")


def test_unpaired_surrogate_escape_is_named(tok, write_jsonl):
    p = write_jsonl([GOOD, '{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", "content": "x"}]}',
                     '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "x"}]}'])
    e = data_error(load_sft, [str(p)], tok, max_length=256)
    assert str(e).startswith(f"{p}:2: has a \\uD800-\\uDFFF escape that is not part of a surrogate pair")
    p = write_jsonl([GOOD, '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, '
                           '{"role": "assistant", "content": "x"}]}'], name="emoji.jsonl")
    assert load_sft([str(p)], tok, max_length=256)[1].kept == 2  # a proper pair is an emoji


def test_unreadable_parquet_is_named(tok, tmp_path):
    pytest.importorskip("datasets")
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"not parquet at all")
    e = data_error(load_sft, [str(p)], tok, max_length=256)
    assert str(e).startswith(f"{p}: cannot be read as a .parquet file")
