"""A user error below the CLI is one line on stderr and exit status 1; ALIGNKIT_DEBUG=1 shows the traceback."""

import pytest

from alignkit import cli
from alignkit.errors import DataError


def test_user_error_is_one_line(monkeypatch, capsys):
    def fail(argv):
        raise DataError("train.jsonl", 7, "expected a JSON object")

    monkeypatch.setattr(cli, "run", fail)
    assert cli.main(["sft"]) == 1
    err = capsys.readouterr().err
    assert err == "error: train.jsonl:7: expected a JSON object\n"


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(cli, "run", lambda argv: (_ for _ in ()).throw(DataError("f.jsonl", 0, "empty")))
    monkeypatch.setenv("ALIGNKIT_DEBUG", "1")
    with pytest.raises(DataError, match="^f.jsonl: empty$"):
        cli.main(["sft"])
