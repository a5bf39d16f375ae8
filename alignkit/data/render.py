"""Turning records into token ids, and the loaders the recipes call.

The one rule for conversations: render through the tokenizer's chat template, and train
(``loss_mask == 1``) exactly on the assistant turns' tokens, including their end-of-turn token
(``<|im_end|>`` in ChatML), never on system/user turns nor on the ``<|im_start|>assistant\\n`` header.

Two ways to find the assistant tokens, giving identical masks on well-behaved templates:

* the template has ``{% generation %}`` markers: use transformers' own
  ``apply_chat_template(..., return_assistant_tokens_mask=True)``;
* otherwise render growing prefixes: ``messages[:i]`` with the generation prompt and ``messages[:i+1]``;
  the tokens between the two are assistant turn i.  Each rendering must be a token prefix of the next
  (otherwise the template is rejected with an explanation).

Both masks are then normalised the same way: a masked span directly followed by an end-of-turn token is
extended over it, and whitespace tokens after the end-of-turn token (ChatML's ``"\\n"`` between turns)
are not trained on.  The same trimming applies to conversational completions of preference data.

Plain-text prompt/completion pairs do not use the template: ``tokenizer(prompt)`` (with whatever
special tokens the tokenizer adds, e.g. BOS) then ``tokenizer(completion, add_special_tokens=False)``
and the EOS token; loss on completion + EOS.  Prompt and completion are tokenized separately, so the
boundary is exact (no token merges across it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

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


@dataclass
class Example:
    """One tokenized training sequence; ``loss_mask[i] == 1`` means token i is trained on (as a label)."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


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


class ChatTemplateError(ValueError):
    """The tokenizer's chat template is missing or cannot be used to find the assistant tokens."""


# --------------------------------------------------------------------------------------------------
# Tokenizer context: template, end-of-turn tokens, batched rendering
# --------------------------------------------------------------------------------------------------

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_EOT_NAMES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")
_CHUNK = 1024


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "(in-memory tokenizer)"


def _chat_template(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    if not t:
        raise ChatTemplateError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template, which conversational data needs; "
            "run `alignkit train-tokenizer` (it writes a tokenizer with a chat template) or set 'chat_template' "
            "in the tokenizer's tokenizer_config.json")
    return t


def has_generation_markers(tokenizer) -> bool:
    """True if the tokenizer's chat template marks assistant content with ``{% generation %}``."""
    return bool(_GENERATION_RE.search(_chat_template(tokenizer)))


class _Ctx:
    """Per-load helper around a tokenizer (caches the template check and token classes)."""

    def __init__(self, tokenizer, use_generation_markers: bool | None = None):
        self.tok = tokenizer
        self._use_markers = use_generation_markers
        self._checked = False
        self._eot: set[int] | None = None
        self._ws: dict[int, bool] = {}
        self._special: set[int] | None = None

    # --- template -------------------------------------------------------------------------------
    def check_template(self) -> None:
        if not self._checked:
            template = _chat_template(self.tok)
            if self._use_markers is None:
                self._use_markers = bool(_GENERATION_RE.search(template)) and getattr(self.tok, "is_fast", True)
            self._checked = True

    @property
    def markers(self) -> bool:
        self.check_template()
        return bool(self._use_markers)

    # --- token classes --------------------------------------------------------------------------
    @property
    def eos(self) -> int:
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {_tokenizer_name(self.tok)!r} has no eos token; "
                             "plain-text data needs one to mark the end of a completion/document")
        return eos

    @property
    def eot(self) -> set[int]:
        if self._eot is None:
            ids = set()
            if self.tok.eos_token_id is not None:
                ids.add(self.tok.eos_token_id)
            added = getattr(self.tok, "added_tokens_encoder", {}) or {}
            ids.update(added[n] for n in _EOT_NAMES if n in added)
            self._eot = ids
        return self._eot

    def is_ws(self, i: int) -> bool:
        r = self._ws.get(i)
        if r is None:
            if self._special is None:
                self._special = set(self.tok.all_special_ids)
            r = i not in self.eot and i not in self._special and self.tok.decode([i]).strip() == ""
            self._ws[i] = r
        return r

    def trim_after_eot(self, ids: list[int]) -> list[int]:
        """Drop whitespace tokens that follow a final end-of-turn token (e.g. ChatML's newline)."""
        k = len(ids)
        while k > 0 and self.is_ws(ids[k - 1]):
            k -= 1
        if 0 < k < len(ids) and ids[k - 1] in self.eot:
            return ids[:k]
        return ids

    def normalize_mask(self, ids: list[int], mask: list[int]) -> list[int]:
        """Extend each masked span over a directly following end-of-turn token; un-mask whitespace tokens
        at the end of a span that come after an end-of-turn token."""
        out = list(mask)
        n, i = len(ids), 0
        while i < n:
            if not out[i]:
                i += 1
                continue
            j = i
            while j < n and out[j]:
                j += 1
            if j < n and ids[j] in self.eot and ids[j - 1] not in self.eot:
                out[j] = 1
                j += 1
            k = i + len(self.trim_after_eot(ids[i:j]))
            for q in range(k, j):
                out[q] = 0
            i = j
        return out

    # --- batched rendering ----------------------------------------------------------------------
    def render_strings(self, convs: list[list[dict]], gen_prompt: bool) -> list[str | Exception]:
        """Render conversations to strings with the chat template (one batched call; per item on failure)."""
        if not convs:
            return []
        try:
            self.check_template()
        except ChatTemplateError as e:
            return [e] * len(convs)
        try:
            return list(self.tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=gen_prompt))
        except Exception:
            pass
        out: list[str | Exception] = []
        for c in convs:
            try:
                out.append(self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=gen_prompt))
            except Exception as e:  # jinja errors, raise_exception() in templates, ...
                out.append(ChatTemplateError(f"chat template failed on this conversation: {type(e).__name__}: {e}"))
        return out

    def encode(self, strings: list[str], special: bool = False) -> list[list[int]]:
        if not strings:
            return []
        return [list(x) for x in self.tok(strings, add_special_tokens=special)["input_ids"]]

    def encode_items(self, items: list[str | Exception]) -> list[list[int] | Exception]:
        """`encode` that passes Exception entries through in place."""
        strs = [s for s in items if not isinstance(s, Exception)]
        enc = iter(self.encode(strs))
        return [s if isinstance(s, Exception) else next(enc) for s in items]

    # --- conversations -> Example -----------------------------------------------------------------
    def render_convs(self, convs: list[list[dict]]) -> list[Example | Exception]:
        if not convs:
            return []
        try:
            self.check_template()
        except ChatTemplateError as e:
            return [e] * len(convs)
        if self.markers:
            return self._render_convs_markers(convs)
        return self._render_convs_prefix(convs)

    def _render_convs_markers(self, convs):
        try:
            enc = self.tok.apply_chat_template(convs, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
            pairs = list(zip(enc["input_ids"], enc["assistant_masks"]))
        except Exception:
            pairs = []
            for c in convs:
                try:
                    e = self.tok.apply_chat_template(c, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
                    pairs.append((e["input_ids"], e["assistant_masks"]))
                except Exception as ex:
                    pairs.append(ChatTemplateError(
                        f"chat template failed on this conversation: {type(ex).__name__}: {ex}"))
        out: list[Example | Exception] = []
        for c, p in zip(convs, pairs):
            if isinstance(p, Exception):
                out.append(p)
                continue
            ids, mask = list(p[0]), [int(m) for m in p[1]]
            mask = self.normalize_mask(ids, mask)
            if any(m["role"] == "assistant" for m in c) and not any(mask):
                out.append(ChatTemplateError(
                    "the chat template has {% generation %} markers but they marked no tokens of this "
                    "conversation's assistant turns; put {% generation %}...{% endgeneration %} around the "
                    "assistant content and end-of-turn token"))
                continue
            out.append(Example(ids, mask))
        return out

    def _render_convs_prefix(self, convs):
        # What to render: for every assistant turn a, messages[:a] + generation prompt and messages[:a+1];
        # plus the full conversation (== messages[:a+1] for the last turn).
        errors: dict[int, Exception] = {}
        pre_req, thr_req = [], []  # (conv index, a)
        for ci, c in enumerate(convs):
            turns = [a for a, m in enumerate(c) if m["role"] == "assistant"]
            if turns and turns[0] == 0:
                errors[ci] = ChatTemplateError(
                    "conversation starts with an assistant turn; without {% generation %} markers in the chat "
                    "template the assistant tokens are found by rendering the turns before it, so a system or "
                    "user turn must come first")
                continue
            for a in turns:
                pre_req.append((ci, a))
                if a + 1 < len(c):
                    thr_req.append((ci, a + 1))
            thr_req.append((ci, len(c)))
        pre = self.encode_items(self.render_strings([convs[ci][:a] for ci, a in pre_req], True))
        thr = self.encode_items(self.render_strings([convs[ci][:a] for ci, a in thr_req], False))
        pre_ids = dict(zip(pre_req, pre))
        thr_ids = dict(zip(thr_req, thr))
        out: list[Example | Exception] = []
        for ci, c in enumerate(convs):
            if ci in errors:
                out.append(errors[ci])
                continue
            full = thr_ids[(ci, len(c))]
            if isinstance(full, Exception):
                out.append(full)
                continue
            mask = [0] * len(full)
            err = None
            for a, m in enumerate(c):
                if m["role"] != "assistant":
                    continue
                p, t = pre_ids[(ci, a)], thr_ids[(ci, a + 1)]
                for x in (p, t):
                    if isinstance(x, Exception):
                        err = x
                if err is None and not (t[:len(p)] == p and full[:len(t)] == t):
                    bad = (f"messages[:{a}] with the generation prompt is not a token prefix of messages[:{a + 1}]"
                           if t[:len(p)] != p else
                           f"messages[:{a + 1}] is not a token prefix of the whole conversation")
                    err = ChatTemplateError(
                        f"the chat template of tokenizer {_tokenizer_name(self.tok)!r} is not prefix-consistent "
                        f"(rendering {bad}), so the assistant tokens cannot be located; add "
                        "{% generation %}...{% endgeneration %} markers around the assistant content (and its "
                        "end-of-turn token) in the template")
                if err is not None:
                    break
                for q in range(len(p), len(t)):
                    mask[q] = 1
            if err is not None:
                out.append(err)
                continue
            out.append(Example(list(full), self.normalize_mask(full, mask)))
        return out

    # --- prompts and completions ------------------------------------------------------------------
    def text_prompts(self, prompts: list[str]) -> list[list[int]]:
        return self.encode(prompts, special=True)

    def text_completions(self, comps: list[str]) -> list[list[int]]:
        eos = self.eos
        out = []
        for ids in self.encode(comps):
            out.append(ids + [eos])
        return out

    def chat_prompts(self, prompts: list[list[dict]]) -> list[list[int] | Exception]:
        return self.encode_items(self.render_strings(prompts, True))

    def chat_completions(self, prompts: list[list[dict]], comps: list[list[list[dict]]]):
        """For each prompt and its completions (message lists): (prompt_ids, [completion_ids, ...]) or an
        Exception.  completion_ids = tokens of rendering prompt+completion after those of the prompt with
        the generation prompt, with trailing whitespace after the end-of-turn token trimmed."""
        p_ids = self.chat_prompts(prompts)
        flat = [p + c for p, cs in zip(prompts, comps) for c in cs]
        full = iter(self.encode_items(self.render_strings(flat, False)))
        out = []
        for p, cs in zip(p_ids, comps):
            fs = [next(full) for _ in cs]
            if isinstance(p, Exception):
                out.append(p)
                continue
            bad = next((f for f in fs if isinstance(f, Exception)), None)
            if bad is not None:
                out.append(bad)
                continue
            if not all(f[:len(p)] == p for f in fs):
                out.append(ChatTemplateError(
                    f"the chat template of tokenizer {_tokenizer_name(self.tok)!r} is not prefix-consistent: the "
                    "prompt rendered with the generation prompt is not a token prefix of prompt + completion, so "
                    "the completion tokens cannot be separated from the prompt"))
                continue
            out.append((p, [self.trim_after_eot(f[len(p):]) for f in fs]))
        return out

    def prompt_completion_examples(self, prompts: list[list[dict]], comps: list[list[dict]]):
        """Conversational prompt-completion for SFT: loss on the completion's assistant turn(s) only."""
        exs = self.render_convs([p + c for p, c in zip(prompts, comps)])
        p_ids = self.chat_prompts(prompts)
        out = []
        for ex, p in zip(exs, p_ids):
            if isinstance(ex, Exception) or isinstance(p, Exception):
                out.append(ex if isinstance(ex, Exception) else p)
                continue
            if ex.input_ids[:len(p)] != p:
                out.append(ChatTemplateError(
                    f"the chat template of tokenizer {_tokenizer_name(self.tok)!r} is not prefix-consistent: the "
                    "prompt rendered with the generation prompt is not a token prefix of prompt + completion"))
                continue
            mask = [0] * len(p) + ex.loss_mask[len(p):]
            out.append(Example(ex.input_ids, mask))
        return out


def _raise_if_error(x):
    if isinstance(x, Exception):
        raise x
    return x


# --------------------------------------------------------------------------------------------------
# Public single-item rendering
# --------------------------------------------------------------------------------------------------


def render_messages(tokenizer, messages: list[dict], *, use_generation_markers: bool | None = None) -> Example:
    """Render a conversation with the chat template; ``loss_mask`` is 1 on every assistant turn's tokens
    (content + end-of-turn token).  ``use_generation_markers`` forces (True) or avoids (False) the
    ``{% generation %}`` path; by default it is used when the template has the markers."""
    msgs = check_messages(messages)
    return _raise_if_error(_Ctx(tokenizer, use_generation_markers).render_convs([msgs])[0])


def render_prompt_completion(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> Example:
    """Strings: ``tokenizer(prompt) + tokenizer(completion) + [eos]``, loss on completion + eos.
    Message lists: rendered through the chat template, loss on the completion's assistant turn(s)."""
    p, (c,), conv = prompt_and_completions({"prompt": prompt, "completion": completion},
                                           "prompt_completion", ("completion",))
    ctx = _Ctx(tokenizer)
    if conv:
        return _raise_if_error(ctx.prompt_completion_examples([p], [c])[0])
    p_ids, c_ids = ctx.text_prompts([p])[0], ctx.text_completions([c])[0]
    return Example(p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids))


def render_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt: a string is tokenized as is (with the tokenizer's usual special tokens), a
    message list is rendered with the chat template and the generation prompt (assistant header)."""
    ctx = _Ctx(tokenizer)
    if isinstance(prompt, str):
        return ctx.text_prompts([prompt])[0]
    return _raise_if_error(ctx.chat_prompts([check_messages(prompt, "prompt")])[0])


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def _records(paths) -> Iterator[tuple[str, int, dict]]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        for line, rec in read_records(p):
            yield str(p), line, rec


def _chunks(it: Iterable, n: int = _CHUNK) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def _wrong_format(fmt: str, task: str, accepted: tuple[str, ...], hint: str = "") -> ValueError:
    return ValueError(f"a {fmt} record {FORMATS[fmt]} cannot be used for {task}{hint}; {task} data must be one "
                      f"of: {describe_formats(accepted)}")


def load_text(paths: list[str] | str, tokenizer) -> Iterator[list[int]]:
    """Pretraining documents: for each ``{"text"}`` record, ``tokenizer(text)`` ids (with whatever special
    tokens the tokenizer itself adds, e.g. none for the alignkit tokenizer) followed by EOS (not doubled
    if the tokenizer already appends it).  Raises DataError on other records and empty texts."""
    ctx = _Ctx(tokenizer)
    eos = ctx.eos
    for chunk in _chunks(_records(paths)):
        texts = []
        for path, line, rec in chunk:
            try:
                fmt = detect_format(rec)
                if fmt != "text":
                    raise _wrong_format(fmt, "pretraining", ("text",))
                texts.append(require_str(rec, "text"))
            except ValueError as e:
                raise DataError(path, line, str(e)) from None
        for ids in ctx.encode(texts, special=True):
            if not ids or ids[-1] != eos:
                ids.append(eos)
            yield ids


SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")


def _check_length(path: str, line: int, n: int, max_length: int, strict: bool, what: str) -> None:
    if n > max_length and strict:
        raise DataError(path, line, f"{what} is {n} tokens, longer than max_length={max_length} "
                                    "(strict mode; without it the example would be truncated)")


def load_sft(paths: list[str] | str, tokenizer, max_length: int, strict: bool = False
             ) -> tuple[list[Example], DataStats]:
    """Supervised fine-tuning examples from messages / ShareGPT / Alpaca / prompt-completion records.

    Conversations must end with an assistant turn.  Over-long examples are cut to ``max_length`` (the
    prompt is kept, the end is cut); an example left with no trained token is dropped.  Both are counted
    in the returned `DataStats`.  ``strict=True`` makes an over-long example a DataError instead.
    """
    ctx = _Ctx(tokenizer)
    stats = DataStats()
    out: list[Example] = []
    for chunk in _chunks(_records(paths)):
        jobs = []  # (path, line, kind, payload)
        for path, line, rec in chunk:
            stats.read += 1
            try:
                fmt = detect_format(rec)
                if fmt in ("messages", "sharegpt", "alpaca"):
                    conv = to_conversation(rec, fmt)
                    require_ends_with_assistant(conv)
                    jobs.append((path, line, "conv", conv))
                elif fmt == "prompt_completion":
                    p, (c,), is_conv = prompt_and_completions(rec, fmt, ("completion",))
                    jobs.append((path, line, "pc_conv" if is_conv else "pc_text", (p, c)))
                else:
                    hint = " (use it for pretraining)" if fmt == "text" else ""
                    raise _wrong_format(fmt, "SFT", SFT_FORMATS, hint)
            except ValueError as e:
                raise DataError(path, line, str(e)) from None
        results: list[Any] = [None] * len(jobs)
        by_kind: dict[str, list[int]] = {}
        for i, j in enumerate(jobs):
            by_kind.setdefault(j[2], []).append(i)
        if "conv" in by_kind:
            idx = by_kind["conv"]
            for i, r in zip(idx, ctx.render_convs([jobs[i][3] for i in idx])):
                results[i] = r
        if "pc_conv" in by_kind:
            idx = by_kind["pc_conv"]
            rs = ctx.prompt_completion_examples([jobs[i][3][0] for i in idx], [jobs[i][3][1] for i in idx])
            for i, r in zip(idx, rs):
                results[i] = r
        if "pc_text" in by_kind:
            idx = by_kind["pc_text"]
            ps = ctx.text_prompts([jobs[i][3][0] for i in idx])
            cs = ctx.text_completions([jobs[i][3][1] for i in idx])
            for i, p, c in zip(idx, ps, cs):
                results[i] = Example(p + c, [0] * len(p) + [1] * len(c))
        for (path, line, _, _), ex in zip(jobs, results):
            if isinstance(ex, Exception):
                raise DataError(path, line, str(ex)) from None
            n = len(ex.input_ids)
            if n > max_length:
                _check_length(path, line, n, max_length, strict, "sequence")
                ex = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length])
                if not any(ex.loss_mask):
                    stats.dropped += 1
                    stats.note("nothing trainable left after truncation to max_length")
                    continue
                stats.truncated += 1
            stats.kept += 1
            out.append(ex)
    return out, stats


def _pairs_to_ids(ctx: _Ctx, items: list[tuple[Any, list[Any], bool]]) -> list[Any]:
    """items: (prompt, [completions], conversational) -> (prompt_ids, [completion_ids]) or Exception."""
    results: list[Any] = [None] * len(items)
    conv = [i for i, it in enumerate(items) if it[2]]
    text = [i for i, it in enumerate(items) if not it[2]]
    if conv:
        for i, r in zip(conv, ctx.chat_completions([items[i][0] for i in conv], [items[i][1] for i in conv])):
            results[i] = r
    if text:
        ps = ctx.text_prompts([items[i][0] for i in text])
        flat = ctx.text_completions([c for i in text for c in items[i][1]])
        k = 0
        for i, p in zip(text, ps):
            n = len(items[i][1])
            results[i] = (p, flat[k:k + n])
            k += n
    return results


def _fit(stats: DataStats, path: str, line: int, prompt_ids: list[int], comps: list[list[int]], max_length: int,
         strict: bool) -> list[list[int]] | None:
    """Cut completions (keeping the prompt) so that prompt + longest completion <= max_length; None = drop."""
    longest = max(len(c) for c in comps)
    n = len(prompt_ids) + longest
    if n <= max_length:
        return comps
    _check_length(path, line, n, max_length, strict, "prompt + longest completion")
    budget = max_length - len(prompt_ids)
    if budget <= 0:
        stats.dropped += 1
        stats.note("prompt alone fills max_length")
        return None
    stats.truncated += 1
    return [c[:budget] for c in comps]


def load_preference(paths: list[str] | str, tokenizer, max_length: int, strict: bool = False
                    ) -> tuple[list[PreferenceExample], DataStats]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` (strings or message lists) or TRL's implicit-prompt
    form ``{"chosen", "rejected"}`` (full conversations; the common leading turns are the prompt).

    Over-long pairs: completions are cut (prompt kept) so prompt + longest completion fits ``max_length``;
    a pair whose prompt alone fills ``max_length`` is dropped.  Pairs with chosen == rejected are kept
    (they carry no preference signal) and counted in ``stats.reasons``."""
    ctx = _Ctx(tokenizer)
    stats = DataStats()
    out: list[PreferenceExample] = []
    for chunk in _chunks(_records(paths)):
        jobs = []
        for path, line, rec in chunk:
            stats.read += 1
            try:
                fmt = detect_format(rec)
                if fmt != "preference":
                    hint = " (load_unpaired reads it)" if fmt == "unpaired_preference" else ""
                    raise _wrong_format(fmt, "preference training", ("preference",), hint)
                jobs.append((path, line, prompt_and_completions(rec, fmt, ("chosen", "rejected"))))
            except ValueError as e:
                raise DataError(path, line, str(e)) from None
        for (path, line, item), r in zip(jobs, _pairs_to_ids(ctx, [j[2] for j in jobs])):
            if isinstance(r, Exception):
                raise DataError(path, line, str(r)) from None
            if item[1][0] == item[1][1]:
                stats.note("chosen identical to rejected (kept)")
            p_ids, comps = r
            comps = _fit(stats, path, line, p_ids, comps, max_length, strict)
            if comps is None:
                continue
            stats.kept += 1
            out.append(PreferenceExample(p_ids, comps[0], comps[1]))
    return out, stats


def load_unpaired(paths: list[str] | str, tokenizer, max_length: int, strict: bool = False
                  ) -> tuple[list[UnpairedExample], DataStats]:
    """Unpaired preference (KTO-style) ``{"prompt", "completion", "label": bool}``.  Paired preference records
    are unpaired automatically: chosen -> label True, rejected -> label False (two examples per record).
    Over-long examples: the completion is cut (prompt kept); dropped if the prompt alone fills max_length."""
    ctx = _Ctx(tokenizer)
    stats = DataStats()
    out: list[UnpairedExample] = []
    for chunk in _chunks(_records(paths)):
        jobs = []  # (path, line, (prompt, comps, conv), labels)
        for path, line, rec in chunk:
            stats.read += 1
            try:
                fmt = detect_format(rec)
                if fmt == "unpaired_preference":
                    label = rec["label"]
                    if not isinstance(label, bool):
                        raise ValueError(f"field 'label' must be true or false, got {label!r}")
                    jobs.append((path, line, prompt_and_completions(rec, fmt, ("completion",)), [label]))
                elif fmt == "preference":
                    item = prompt_and_completions(rec, fmt, ("chosen", "rejected"))
                    if item[1][0] == item[1][1]:
                        stats.note("chosen identical to rejected (kept)")
                    jobs.append((path, line, item, [True, False]))
                else:
                    raise _wrong_format(fmt, "unpaired preference training", ("unpaired_preference", "preference"))
            except ValueError as e:
                raise DataError(path, line, str(e)) from None
        for (path, line, _, labels), r in zip(jobs, _pairs_to_ids(ctx, [j[2] for j in jobs])):
            if isinstance(r, Exception):
                raise DataError(path, line, str(r)) from None
            p_ids, comps = r
            for c, label in zip(comps, labels):
                fitted = _fit(stats, path, line, p_ids, [c], max_length, strict)
                if fitted is None:
                    continue
                stats.kept += 1
                out.append(UnpairedExample(p_ids, fitted[0], label))
    return out, stats


PROMPT_FORMATS = ("prompt_only", "prompt_completion", "preference", "unpaired_preference")


def load_prompts(paths: list[str] | str, tokenizer, max_prompt_length: int | None = None, strict: bool = False
                 ) -> tuple[list[PromptExample], DataStats]:
    """Prompts for generation: any record with a ``"prompt"`` field (string, or message list ending with a
    user/system turn, rendered with the generation prompt).  All other fields are kept in
    ``PromptExample.columns`` (e.g. ``answer`` for a reward function).

    A prompt longer than ``max_prompt_length`` is dropped (counted in the stats), since a cut prompt
    would no longer match its columns (e.g. the answer); ``strict=True`` makes it a DataError."""
    ctx = _Ctx(tokenizer)
    stats = DataStats()
    out: list[PromptExample] = []
    for chunk in _chunks(_records(paths)):
        jobs = []
        for path, line, rec in chunk:
            stats.read += 1
            try:
                fmt = detect_format(rec)
                if fmt not in PROMPT_FORMATS or "prompt" not in rec:
                    raise _wrong_format(fmt, "prompt-only (generation) training", PROMPT_FORMATS,
                                        " (it has no 'prompt' field)")
                original = prompt = rec["prompt"]
                if isinstance(prompt, str):
                    require_str(rec, "prompt")
                elif isinstance(prompt, list):
                    prompt = check_messages(prompt, "prompt")
                    if prompt[-1]["role"] == "assistant":
                        raise ValueError("prompt ends with an assistant turn; a prompt must end with a user "
                                         "(or system) turn")
                else:
                    raise ValueError(f"field 'prompt' must be a string or a list of messages, got a JSON "
                                     f"{_json_type(prompt)}")
                jobs.append((path, line, prompt, original, {k: v for k, v in rec.items() if k != "prompt"}))
            except ValueError as e:
                raise DataError(path, line, str(e)) from None
        ids: list[Any] = [None] * len(jobs)
        ti = [i for i, j in enumerate(jobs) if isinstance(j[2], str)]
        ci = [i for i, j in enumerate(jobs) if not isinstance(j[2], str)]
        for i, r in zip(ti, ctx.text_prompts([jobs[i][2] for i in ti])):
            ids[i] = r
        for i, r in zip(ci, ctx.chat_prompts([jobs[i][2] for i in ci])):
            ids[i] = r
        for (path, line, _, original, cols), p_ids in zip(jobs, ids):
            if isinstance(p_ids, Exception):
                raise DataError(path, line, str(p_ids)) from None
            if max_prompt_length is not None and len(p_ids) > max_prompt_length:
                if strict:
                    raise DataError(path, line, f"prompt is {len(p_ids)} tokens, longer than max_prompt_length="
                                                f"{max_prompt_length} (strict mode; without it the prompt is dropped)")
                stats.dropped += 1
                stats.note("prompt longer than max_prompt_length")
                continue
            stats.kept += 1
            out.append(PromptExample(p_ids, original, cols))  # the field as written in the file
    return out, stats
