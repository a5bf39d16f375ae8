"""Reading data files and recognising the record formats people already have.

Every record format uses the same field names as the Hugging Face ecosystem (TRL):

    text                 {"text": str}                                    language modelling
    alpaca               {"instruction", "input"?, "output"}              -> converted to messages
    messages             {"messages": [{"role", "content"}, ...]}         conversational
    sharegpt             {"conversations": [{"from", "value"}, ...]}      -> converted to messages
    prompt_completion    {"prompt", "completion"}                         both str, or both message lists
    preference           {"prompt"?, "chosen", "rejected"}                no prompt = implicit prompt
    unpaired_preference  {"prompt", "completion", "label": bool}
    prompt_only          {"prompt", ...extra columns}

Nothing here tokenizes: this module only reads records, recognises their format, validates fields
and converts Alpaca / ShareGPT / implicit-prompt records into the canonical shapes that
`alignkit.data.render` turns into token ids.  Problems raise `ValueError` with a message that says
what is wrong; the loaders wrap it into a `DataError` (`alignkit.errors`) carrying the file and line, which
the CLI prints as one line.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from alignkit.errors import DataError

logger = logging.getLogger("alignkit.data")

__all__ = [
    "DataError",
    "DataStats",
    "FORMATS",
    "ROLES",
    "read_records",
    "detect_format",
    "check_messages",
    "to_conversation",
    "split_implicit_prompt",
]


# --------------------------------------------------------------------------------------------------
# Statistics of a load
# --------------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What was read and what happened to it.

    read       records read from the files
    kept       examples produced (an unpaired load of a paired file produces two per record)
    truncated  examples kept but cut to fit the length limit
    dropped    examples not kept (see ``reasons``)
    reasons    counters for everything noteworthy, e.g. {"nothing trainable left after truncation": 3}
    """

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def note(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + n

    def summary(self) -> str:
        s = f"read {self.read} records, kept {self.kept} examples, truncated {self.truncated}, dropped {self.dropped}"
        if self.reasons:
            s += " (" + "; ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) + ")"
        return s

    def warn(self) -> str | None:
        """Log a warning if anything was truncated, dropped or otherwise noteworthy; return its text (or None)."""
        if not (self.truncated or self.dropped or self.reasons):
            return None
        msg = "data: " + self.summary()
        logger.warning(msg)
        return msg


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------

_JSONL_SUFFIXES = {".jsonl", ".jsonlines", ".json-lines", ".ndjson", ".json"}
_HF_SUFFIXES = {".parquet", ".arrow"}


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each record of a data file; line numbers start at 1.

    ``.jsonl`` (also ``.jsonlines``, ``.json-lines``, ``.ndjson``): one JSON object per line, blank lines
    skipped.  ``.json``: either JSON lines or one JSON array of objects (then "line" is the index + 1).
    ``.parquet`` / ``.arrow``: read through the optional ``datasets`` package; "line" is the row index + 1.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():
        raise DataError(path, None, "is a directory; pass the data files themselves (.jsonl, .json, .parquet "
                                    "or .arrow), e.g. " + str(p / "*.jsonl"))
    if suffix not in _JSONL_SUFFIXES | _HF_SUFFIXES:
        raise DataError(path, None, f"unsupported file type {suffix or '(no extension)'!r}; expected "
                                    ".jsonl (JSON lines), .json, .parquet or .arrow")
    if not p.is_file():
        raise DataError(path, None, "no such file")
    if suffix in _HF_SUFFIXES:
        records = _read_hf(p, suffix)
    elif suffix == ".json" and _starts_with_bracket(p):
        records = _read_json_array(p)
    else:
        records = _read_jsonl(p)
    n = 0
    for n, rec in enumerate(records, 1):
        yield rec
    if n == 0:
        raise DataError(path, None, "has no records (the file is empty or has only blank lines)")


def _starts_with_bracket(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4096).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n").startswith("[")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _loads(p: Path, line: int | None, text: str):
    try:
        value = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):  # an escaped half of a UTF-16 pair is valid JSON but not text
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except UnicodeEncodeError:
        raise DataError(p, line, "has a \\uD800-\\uDFFF escape that is not part of a surrogate pair, so a "
                                 "string is not valid text") from None
    except json.JSONDecodeError as e:
        raise DataError(p, line or e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:  # Python's json parser recurses once per nesting level
        raise DataError(p, line, "JSON nested too deeply to read (more levels than Python's recursion "
                                 "limit)") from None


def _read_jsonl(p: Path) -> Iterator[tuple[int, dict]]:
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(p, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            rec = _loads(p, lineno, text)
            if not isinstance(rec, dict):
                raise DataError(p, lineno, f"expected a JSON object per line, got a JSON {_json_type(rec)}")
            yield lineno, rec


def _read_json_array(p: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = _loads(p, None, p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(p, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    for i, rec in enumerate(data, 1):
        if not isinstance(rec, dict):
            raise DataError(p, i, f"expected a JSON object as array element {i}, got a JSON {_json_type(rec)}")
        yield i, rec


def _read_hf(p: Path, suffix: str) -> Iterator[tuple[int, dict]]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(p, None, f"reading {suffix} files needs the optional 'datasets' package: "
                                 "pip install 'alignkit[datasets]' (or convert the file to .jsonl)") from None
    try:
        ds = datasets.Dataset.from_parquet(str(p)) if suffix == ".parquet" else datasets.Dataset.from_file(str(p))
    except Exception as e:  # pyarrow's errors for truncated or foreign files
        raise DataError(p, None, f"cannot be read as a {suffix} file: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if v is None:
        return "null"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(v), type(v).__name__)


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------

FORMATS: dict[str, str] = {
    "text": '{"text"}',
    "alpaca": '{"instruction", "input" (optional), "output"}',
    "messages": '{"messages": [{"role", "content"}]}',
    "sharegpt": '{"conversations": [{"from", "value"}]}',
    "prompt_completion": '{"prompt", "completion"}',
    "preference": '{"prompt" (optional), "chosen", "rejected"}',
    "unpaired_preference": '{"prompt", "completion", "label"}',
    "prompt_only": '{"prompt", ...extra columns}',
}


def describe_formats(names: list[str] | tuple[str, ...] | None = None) -> str:
    """Human-readable list of formats, e.g. for 'expected one of ...' messages."""
    names = list(FORMATS) if names is None else list(names)
    return ", ".join(f"{n} {FORMATS[n]}" for n in names)


def detect_format(record: dict) -> str:
    """Name the format of one record (see `FORMATS`).  Raises ValueError for unknown / incomplete records."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got a JSON {_json_type(record)}")
    keys = record.keys()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "chosen" in keys or "rejected" in keys:
        if "chosen" in keys and "rejected" in keys:
            return "preference"
        have, miss = ("chosen", "rejected") if "chosen" in keys else ("rejected", "chosen")
        raise ValueError(f"record has {have!r} but no {miss!r} field; a preference record is "
                         f"{FORMATS['preference']}")
    if "prompt" in keys:
        if "completion" in keys:
            return "unpaired_preference" if "label" in keys else "prompt_completion"
        if "label" in keys:
            raise ValueError(f"record has 'prompt' and 'label' but no 'completion' field; an unpaired preference "
                             f"record is {FORMATS['unpaired_preference']}")
        return "prompt_only"
    if "completion" in keys:
        raise ValueError(f"record has 'completion' but no 'prompt' field; a prompt-completion record is "
                         f"{FORMATS['prompt_completion']}")
    if "instruction" in keys or "output" in keys:
        if "instruction" in keys and "output" in keys:
            return "alpaca"
        have, miss = ("instruction", "output") if "instruction" in keys else ("output", "instruction")
        raise ValueError(f"record has {have!r} but no {miss!r} field; an Alpaca record is {FORMATS['alpaca']}")
    if "text" in keys:
        return "text"
    fields = ", ".join(repr(k) for k in keys) or "none"
    raise ValueError(f"unknown record format (fields: {fields}); expected one of: {describe_formats()}")


# --------------------------------------------------------------------------------------------------
# Field validation and conversion
# --------------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "system": "system",
}


def require_str(record: dict, key: str, *, allow_empty: bool = False) -> str:
    v = record[key]
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, got a JSON {_json_type(v)}")
    if not allow_empty and not v.strip():
        raise ValueError(f"field {key!r} is empty")
    return v


def check_messages(msgs: Any, where: str = "messages", *, nonempty_assistant: bool = True) -> list[dict]:
    """Validate a message list and return it as a list of plain ``{"role", "content"}`` dicts.

    ``where`` names the field in error messages (e.g. "chosen").  Roles must be one of `ROLES`, content a
    string; assistant content must not be empty (only whitespace counts as empty).
    """
    if not isinstance(msgs, list):
        raise ValueError(f"field {where!r} must be a list of messages, got a JSON {_json_type(msgs)}")
    if not msgs:
        raise ValueError(f"field {where!r} is an empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}] must be an object with 'role' and 'content', got a JSON {_json_type(m)}")
        for k in ("role", "content"):
            if k not in m:
                raise ValueError(f"{where}[{i}] has no {k!r} field")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"{where}[{i}] has role {role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content must be a string, got a JSON {_json_type(content)}")
        if nonempty_assistant and role == "assistant" and not content.strip():
            raise ValueError(f"{where}[{i}] (assistant) has empty content")
        out.append({"role": role, "content": content})
    return out


def to_conversation(record: dict, fmt: str) -> list[dict]:
    """Messages of a "messages", "sharegpt" or "alpaca" record (validated, canonical role/content dicts)."""
    if fmt == "messages":
        return check_messages(record["messages"], "messages")
    if fmt == "sharegpt":
        conv = record["conversations"]
        if not isinstance(conv, list):
            raise ValueError(f"field 'conversations' must be a list of turns, got a JSON {_json_type(conv)}")
        msgs = []
        for i, t in enumerate(conv):
            if not isinstance(t, dict):
                raise ValueError(f"conversations[{i}] must be an object with 'from' and 'value', "
                                 f"got a JSON {_json_type(t)}")
            for k in ("from", "value"):
                if k not in t:
                    raise ValueError(f"conversations[{i}] has no {k!r} field")
            who = t["from"]
            role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
            if role is None:
                raise ValueError(f"conversations[{i}] has from={who!r}; expected one of human/user (-> user), "
                                 "gpt/assistant/chatgpt/bot (-> assistant), system")
            msgs.append({"role": role, "content": t["value"]})
        return check_messages(msgs, "conversations")
    if fmt == "alpaca":
        instruction = require_str(record, "instruction")
        inp = record.get("input")
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            raise ValueError(f"field 'input' must be a string, got a JSON {_json_type(inp)}")
        output = require_str(record, "output")
        user = instruction + ("\n\n" + inp if inp.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise ValueError(f"a {fmt} record is not a conversation")


def require_ends_with_assistant(msgs: list[dict], where: str = "conversation") -> None:
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"{where} ends with a {msgs[-1]['role']!r} turn; it must end with an assistant turn "
                         "(the assistant turns are what is trained on)")


def prompt_and_completions(record: dict, fmt: str, keys: tuple[str, ...]) -> tuple[Any, list[Any], bool]:
    """Validate the prompt and the completion fields ``keys`` of a prompt_completion / preference /
    unpaired record.  Returns ``(prompt, [completion, ...], conversational)``; all are strings or all
    message lists.  Preference records without a prompt are split with `split_implicit_prompt`."""
    if fmt == "preference" and "prompt" not in record:
        chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
        prompt, comps = chosen[0], [chosen[1], rejected[1]]
        return prompt, comps, True
    fields = ("prompt",) + keys
    vals = [record[k] for k in fields]
    if all(isinstance(v, str) for v in vals):
        require_str(record, "prompt")
        for k in keys:
            require_str(record, k)
        return vals[0], vals[1:], False
    if all(isinstance(v, list) for v in vals):
        prompt = check_messages(vals[0], "prompt")
        if prompt[-1]["role"] == "assistant":
            raise ValueError("prompt ends with an assistant turn; the prompt must end with a user (or system) turn")
        comps = []
        for k, v in zip(keys, vals[1:]):
            c = check_messages(v, k)
            if c[0]["role"] != "assistant":
                raise ValueError(f"{k} starts with a {c[0]['role']!r} turn; it must start with an assistant turn")
            require_ends_with_assistant(c, k)
            comps.append(c)
        return prompt, comps, True
    kinds = ", ".join(f"{k}={_json_type(v)}" for k, v in zip(fields, vals))
    raise ValueError(f"fields {', '.join(repr(f) for f in fields)} must all be strings or all be message lists "
                     f"(got {kinds})")


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[tuple[list, list], tuple[list, list]]:
    """TRL's implicit-prompt preference form: ``chosen`` and ``rejected`` are full conversations; their
    common leading messages are the prompt.  The prompt is cut back so that it ends with a non-assistant
    turn and both completions start with an assistant turn.  Returns ``((prompt, chosen), (prompt, rejected))``.
    """
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise ValueError("preference record without 'prompt' needs 'chosen' and 'rejected' as full conversations "
                         "(message lists) sharing the prompt turns; for plain-text pairs add a 'prompt' field "
                         f"(got chosen={_json_type(chosen)}, rejected={_json_type(rejected)})")
    c = check_messages(chosen, "chosen")
    r = check_messages(rejected, "rejected")
    n = min(len(c), len(r))
    k = 0
    while k < n and c[k] == r[k]:
        k += 1
    k = min(k, n - 1)  # identical (or one a prefix of the other): the completions are at least the last turn
    while k > 0 and not (c[k - 1]["role"] != "assistant" and c[k]["role"] == "assistant"
                         and r[k]["role"] == "assistant"):
        k -= 1
    if k == 0:
        raise ValueError("preference record without 'prompt': 'chosen' and 'rejected' share no prompt turns "
                         "(a common prefix ending with a user turn, followed by an assistant turn in both)")
    require_ends_with_assistant(c[k:], "chosen")
    require_ends_with_assistant(r[k:], "rejected")
    return (c[:k], c[k:]), (r[:k], r[k:])
