"""Turning records into token ids, and the loaders the recipes call.

Conversations go through the chat template (`alignkit.data.templates`: loss on the assistant turns and
their end-of-turn token only).  Plain-text prompt/completion pairs do not use the template:
``tokenizer(prompt)`` (with whatever special tokens the tokenizer adds, e.g. BOS) then
``tokenizer(completion, add_special_tokens=False)`` and the EOS token; loss on completion + EOS.  Prompt
and completion are tokenized separately, so the boundary is exact (no token merges across it).

Every loader reads its files through one skeleton (`_load`): per chunk of records, validate and render
each record to text (a bad record raises a `DataError` naming its file:line), tokenize the chunk's texts
in one batched call, then build each record's examples (again raising at the record).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from alignkit.errors import UserError

from .formats import (
    FORMATS,
    _json_type,
    DataError,
    DataStats,
    check_messages,
    describe_formats,
    detect_format,
    prompt_and_completions,
    read_records,
    require_ends_with_assistant,
    require_str,
    to_conversation,
)
from .templates import ChatRenderer, ChatTemplateError, Example, has_generation_markers

__all__ = [
    "Example",
    "PreferenceExample",
    "PromptExample",
    "UnpairedExample",
    "ChatTemplateError",
    "has_generation_markers",
    "render_messages",
    "render_prompt_completion",
    "render_prompt",
    "load_text",
    "load_sft",
    "load_preference",
    "load_prompts",
    "load_unpaired",
]

_CHUNK = 1024


@dataclass
class PreferenceExample:
    """Prompt and the two completions; completion ids end with the end-of-turn / EOS token (unless truncated)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


@dataclass
class PromptExample:
    """A prompt for generation (PPO/GRPO/online methods); ``columns`` holds the record's other fields
    (e.g. ``answer``) for reward functions."""

    prompt_ids: list[int]
    prompt: str | list[dict]
    columns: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Records to token ids: each helper renders a record's text now and returns a function that makes its
# token ids once the chunk's texts are tokenized (`ChatRenderer.flush`).
# --------------------------------------------------------------------------------------------------


def _zero_prompt(ex: Example, prompt_ids: list[int], r: ChatRenderer) -> Example:
    if ex.input_ids[:len(prompt_ids)] != prompt_ids:
        raise r.error("is not prefix-consistent: the prompt rendered with the generation prompt is not a "
                       "token prefix of prompt + completion")
    return Example(ex.input_ids, [0] * len(prompt_ids) + ex.loss_mask[len(prompt_ids):])


def _text_pair(r: ChatRenderer, prompt: str, completions: list[str]) -> Callable[[], tuple[list[int], list[list[int]]]]:
    """Plain-text prompt and completions -> (prompt ids, [completion ids + EOS])."""
    eos = r.eos
    r.want(prompt, True)
    for c in completions:
        r.want(c, False)
    return lambda: (r.text_ids(prompt), [r.ids(c) + [eos] for c in completions])


def _chat_pair(r: ChatRenderer, prompt: list[dict], completions: list[list[dict]]
               ) -> Callable[[], tuple[list[int], list[list[int]]]]:
    """Conversational prompt and completions -> (prompt ids, [completion ids through the last end-of-turn])."""
    p = r.prompt_text(prompt)
    rcs = [r.render_conversation(prompt + c, first=len(prompt)) for c in completions]

    def ids():
        pairs = [r.completion(p, rc) for rc in rcs]
        return pairs[0][0], [c for _, c in pairs]
    return ids


def _pair(r: ChatRenderer, item: tuple[Any, list[Any], bool]):
    prompt, completions, conversational = item
    return _chat_pair(r, prompt, completions) if conversational else _text_pair(r, prompt, completions)


def _sft_prompt_completion(r: ChatRenderer, item) -> Callable[[], Example]:
    prompt, (completion,), conversational = item
    if not conversational:
        pair = _text_pair(r, prompt, [completion])

        def text_example():
            p, (c,) = pair()
            return Example(p + c, [0] * len(p) + [1] * len(c))
        return text_example
    p = r.prompt_text(prompt)
    rc = r.render_conversation(prompt + completion, first=len(prompt))
    return lambda: _zero_prompt(r.example(rc), r.ids(p), r)


def _turn_order(stats: DataStats, msgs: list[dict], strict: bool) -> None:
    """Count (or, strict, refuse) conversations that start with the assistant or repeat a role: both are
    legal for a chat template but usually a mistake in the data."""
    if next((m["role"] for m in msgs if m["role"] != "system"), None) == "assistant":
        if strict:
            raise ValueError("conversation starts with an assistant turn (strict mode; without it the "
                             "conversation is kept and counted)")
        stats.note("conversation starts with an assistant turn (kept)")
    repeat = next((m["role"] for m, n in zip(msgs, msgs[1:]) if m["role"] == n["role"]), None)
    if repeat is not None:
        if strict:
            raise ValueError(f"conversation has two {repeat} turns in a row (strict mode; without it the "
                             "conversation is kept and counted)")
        stats.note("conversation repeats a role in consecutive turns (kept)")


# --------------------------------------------------------------------------------------------------
# Public single-item rendering
# --------------------------------------------------------------------------------------------------


def render_messages(tokenizer, messages: list[dict], *, use_generation_markers: bool | None = None) -> Example:
    """Render a conversation with the chat template; ``loss_mask`` is 1 on every assistant turn's tokens
    (content + end-of-turn token).  ``use_generation_markers`` forces (True) or avoids (False) the
    ``{% generation %}`` path; by default it is used when the template has the markers."""
    r = ChatRenderer(tokenizer, use_generation_markers)
    return r.example(r.render_conversation(check_messages(messages)))


def render_prompt_completion(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> Example:
    """Strings: ``tokenizer(prompt) + tokenizer(completion) + [eos]``, loss on completion + eos.
    Message lists: rendered through the chat template, loss on the completion's assistant turn(s)."""
    item = prompt_and_completions({"prompt": prompt, "completion": completion}, "prompt_completion", ("completion",))
    return _sft_prompt_completion(ChatRenderer(tokenizer), item)()


def render_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt: a string is tokenized as is (with the tokenizer's usual special tokens), a
    message list is rendered with the chat template and the generation prompt (assistant header)."""
    r = ChatRenderer(tokenizer)
    if isinstance(prompt, str):
        return r.text_ids(prompt)
    return r.ids(r.prompt_text(check_messages(prompt, "prompt")))


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


@dataclass
class _Record:
    path: str
    line: int
    data: dict


@contextmanager
def _at(rec: _Record):
    """Report any problem raised while handling ``rec`` as a DataError at its file:line."""
    try:
        yield
    except DataError:
        raise
    except (ValueError, UserError) as e:
        raise DataError(rec.path, rec.line, str(e)) from None


def _records(paths) -> Iterator[_Record]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        for line, rec in read_records(p):
            yield _Record(str(p), line, rec)


def _chunks(it: Iterable, n: int = _CHUNK) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def _load(paths, r: ChatRenderer, stats: DataStats | None, read: Callable[[_Record], Any],
          build: Callable[[_Record, Any], Iterable]) -> Iterator:
    """The skeleton of every loader: ``read(record)`` validates a record and renders its text (returning
    whatever ``build`` needs); after the chunk's texts are tokenized, ``build(record, job)`` yields its
    examples.  Both run under the record's file:line."""
    for chunk in _chunks(_records(paths)):
        jobs = []
        for rec in chunk:
            if stats is not None:
                stats.read += 1
            with _at(rec):
                jobs.append((rec, read(rec)))
        r.flush()
        for rec, job in jobs:
            with _at(rec):
                yield from build(rec, job)


def _wrong_format(fmt: str, task: str, accepted: tuple[str, ...], hint: str = "") -> ValueError:
    return ValueError(f"a {fmt} record {FORMATS[fmt]} cannot be used for {task}{hint}; {task} data must be one "
                      f"of: {describe_formats(accepted)}")


def _too_long(n: int, max_length: int, strict: bool, what: str) -> bool:
    if n > max_length and strict:
        raise ValueError(f"{what} is {n} tokens, longer than max_length={max_length} "
                         "(strict mode; without it the example would be truncated)")
    return n > max_length


def load_text(paths: list[str] | str, tokenizer) -> Iterator[list[int]]:
    """Pretraining documents: for each ``{"text"}`` record, ``tokenizer(text)`` ids (with whatever special
    tokens the tokenizer itself adds, e.g. none for the alignkit tokenizer) followed by EOS (not doubled
    if the tokenizer already appends it).  Raises DataError on other records and empty texts."""
    r = ChatRenderer(tokenizer)
    eos = r.eos

    def read(rec):
        fmt = detect_format(rec.data)
        if fmt != "text":
            raise _wrong_format(fmt, "pretraining", ("text",))
        text = require_str(rec.data, "text")
        r.want(text, True)
        return text

    def build(rec, text):
        ids = r.text_ids(text)
        yield ids if ids and ids[-1] == eos else ids + [eos]

    yield from _load(paths, r, None, read, build)


SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")


def load_sft(paths: list[str] | str, tokenizer, max_length: int, strict: bool = False
             ) -> tuple[list[Example], DataStats]:
    """Supervised fine-tuning examples from messages / ShareGPT / Alpaca / prompt-completion records.

    Conversations must end with an assistant turn.  Over-long examples are cut to ``max_length`` (the
    prompt is kept, the end is cut); an example left with no trained token is dropped.  Both are counted
    in the returned `DataStats`, and so are conversations that start with the assistant or repeat a role.
    ``strict=True`` makes an over-long example or such a conversation a DataError instead.
    """
    r = ChatRenderer(tokenizer)
    stats = DataStats()

    def read(rec) -> Callable[[], Example]:
        fmt = detect_format(rec.data)
        if fmt in ("messages", "sharegpt", "alpaca"):
            conv = to_conversation(rec.data, fmt)
            require_ends_with_assistant(conv)
            _turn_order(stats, conv, strict)
            rc = r.render_conversation(conv)
            return lambda: r.example(rc)
        if fmt == "prompt_completion":
            item = prompt_and_completions(rec.data, fmt, ("completion",))
            if item[2]:
                _turn_order(stats, item[0] + item[1][0], strict)
            return _sft_prompt_completion(r, item)
        raise _wrong_format(fmt, "SFT", SFT_FORMATS, " (use it for pretraining)" if fmt == "text" else "")

    def build(rec, example):
        ex = example()
        if _too_long(len(ex), max_length, strict, "sequence"):
            ex = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length])
            if not any(ex.loss_mask):
                stats.dropped += 1
                stats.note("nothing trainable left after truncation to max_length")
                return
            stats.truncated += 1
        stats.kept += 1
        yield ex

    return list(_load(paths, r, stats, read, build)), stats


def _fit(stats: DataStats, prompt_ids: list[int], comps: list[list[int]], max_length: int, strict: bool
         ) -> list[list[int]] | None:
    """Cut completions (keeping the prompt) so that prompt + longest completion <= max_length; None = drop."""
    if not _too_long(len(prompt_ids) + max(len(c) for c in comps), max_length, strict, "prompt + longest completion"):
        return comps
    budget = max_length - len(prompt_ids)
    if budget <= 0:
        stats.dropped += 1
        stats.note("prompt alone fills max_length")
        return None
    stats.truncated += 1
    return [c[:budget] for c in comps]


def _paired(rec: dict, fmt: str, keys: tuple[str, ...], stats: DataStats, strict: bool):
    item = prompt_and_completions(rec, fmt, keys)
    if item[2]:
        for c in item[1]:
            _turn_order(stats, item[0] + c, strict)
    if len(item[1]) == 2 and item[1][0] == item[1][1]:
        stats.note("chosen identical to rejected (kept)")
    return item


def load_preference(paths: list[str] | str, tokenizer, max_length: int, strict: bool = False
                    ) -> tuple[list[PreferenceExample], DataStats]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` (strings or message lists) or TRL's implicit-prompt
    form ``{"chosen", "rejected"}`` (full conversations; the common leading turns are the prompt).

    Over-long pairs: completions are cut (prompt kept) so prompt + longest completion fits ``max_length``;
    a pair whose prompt alone fills ``max_length`` is dropped.  Pairs with chosen == rejected are kept
    (they carry no preference signal) and counted in ``stats.reasons``."""
    r = ChatRenderer(tokenizer)
    stats = DataStats()

    def read(rec):
        fmt = detect_format(rec.data)
        if fmt != "preference":
            hint = " (load_unpaired reads it)" if fmt == "unpaired_preference" else ""
            raise _wrong_format(fmt, "preference training", ("preference",), hint)
        return _pair(r, _paired(rec.data, fmt, ("chosen", "rejected"), stats, strict))

    def build(rec, pair):
        p_ids, comps = pair()
        comps = _fit(stats, p_ids, comps, max_length, strict)
        if comps is not None:
            stats.kept += 1
            yield PreferenceExample(p_ids, comps[0], comps[1])

    return list(_load(paths, r, stats, read, build)), stats


def load_unpaired(paths: list[str] | str, tokenizer, max_length: int, strict: bool = False
                  ) -> tuple[list[UnpairedExample], DataStats]:
    """Unpaired preference (KTO-style) ``{"prompt", "completion", "label": bool}``.  Paired preference records
    are unpaired automatically: chosen -> label True, rejected -> label False (two examples per record).
    Over-long examples: the completion is cut (prompt kept); dropped if the prompt alone fills max_length."""
    r = ChatRenderer(tokenizer)
    stats = DataStats()

    def read(rec):
        fmt = detect_format(rec.data)
        if fmt == "unpaired_preference":
            label = rec.data["label"]
            if not isinstance(label, bool):
                raise ValueError(f"field 'label' must be true or false, got {label!r}")
            return _pair(r, _paired(rec.data, fmt, ("completion",), stats, strict)), [label]
        if fmt == "preference":
            return _pair(r, _paired(rec.data, fmt, ("chosen", "rejected"), stats, strict)), [True, False]
        raise _wrong_format(fmt, "unpaired preference training", ("unpaired_preference", "preference"))

    def build(rec, job):
        pair, labels = job
        p_ids, comps = pair()
        for c, label in zip(comps, labels):
            fitted = _fit(stats, p_ids, [c], max_length, strict)
            if fitted is not None:
                stats.kept += 1
                yield UnpairedExample(p_ids, fitted[0], label)

    return list(_load(paths, r, stats, read, build)), stats


PROMPT_FORMATS = ("prompt_only", "prompt_completion", "preference", "unpaired_preference")


def load_prompts(paths: list[str] | str, tokenizer, max_prompt_length: int | None = None, strict: bool = False
                 ) -> tuple[list[PromptExample], DataStats]:
    """Prompts for generation: any record with a ``"prompt"`` field (string, or message list ending with a
    user/system turn, rendered with the generation prompt).  All other fields are kept in
    ``PromptExample.columns`` (e.g. ``answer`` for a reward function).

    A prompt longer than ``max_prompt_length`` is dropped (counted in the stats), since a cut prompt
    would no longer match its columns (e.g. the answer); ``strict=True`` makes it a DataError."""
    r = ChatRenderer(tokenizer)
    stats = DataStats()

    def read(rec) -> Callable[[], list[int]]:
        fmt = detect_format(rec.data)
        if fmt not in PROMPT_FORMATS or "prompt" not in rec.data:
            raise _wrong_format(fmt, "prompt-only (generation) training", PROMPT_FORMATS,
                                " (it has no 'prompt' field)")
        prompt = rec.data["prompt"]
        if isinstance(prompt, str):
            r.want(require_str(rec.data, "prompt"), True)
            return lambda: r.text_ids(prompt)
        if not isinstance(prompt, list):
            raise ValueError(f"field 'prompt' must be a string or a list of messages, got a JSON "
                             f"{_json_type(prompt)}")
        msgs = check_messages(prompt, "prompt")
        if msgs[-1]["role"] == "assistant":
            raise ValueError("prompt ends with an assistant turn; a prompt must end with a user (or system) turn")
        _turn_order(stats, msgs, strict)
        text = r.prompt_text(msgs)
        return lambda: r.ids(text)

    def build(rec, prompt_ids):
        ids = prompt_ids()
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if strict:
                raise ValueError(f"prompt is {len(ids)} tokens, longer than max_prompt_length={max_prompt_length} "
                                 "(strict mode; without it the prompt is dropped)")
            stats.dropped += 1
            stats.note("prompt longer than max_prompt_length")
            return
        stats.kept += 1
        columns = {k: v for k, v in rec.data.items() if k != "prompt"}
        yield PromptExample(ids, rec.data["prompt"], columns)  # the field as written in the file

    return list(_load(paths, r, stats, read, build)), stats
