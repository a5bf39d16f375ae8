"""Chat templates: conversations to token ids, and which of those tokens are trained on.

The one rule for conversations: render through the tokenizer's chat template, and train
(``loss_mask == 1``) exactly on the assistant turns' tokens, including their end-of-turn token
(``<|im_end|>`` in ChatML), never on system/user turns nor on the ``<|im_start|>assistant\\n`` header.

The assistant tokens are found from character spans of the rendered text, mapped to tokens through the
fast tokenizer's offsets (a token is trained on if it overlaps a span):

* the template has ``{% generation %}`` markers: the spans are the generation blocks, exactly as
  transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` finds them;
* otherwise each assistant message's content is located in the rendered text (rendered once more with
  placeholders in place of the assistant contents, so a content that also appears elsewhere is never
  mistaken), and its span runs on through the end-of-turn token that follows it.  This works for every
  template that renders the content verbatim (or trimmed), including templates whose rendering of a
  shorter conversation is not a prefix of a longer one (EOS only after the last message, ...).

Without markers every assistant turn is also checked against generation: the turns before it rendered
with the generation prompt must be a token prefix of the whole conversation's tokens, or the model would
be trained on one prompt and asked with another (a template that drops or moves a system message
depending on which turn is last does this).  The turn is trained on from the end of that prompt (so
whatever the template writes before the content, e.g. Mistral's space, is learned too) through the
end-of-turn token after its content; a template that writes none is refused.

Both sources of spans are closed the same way: a span not ending with an end-of-turn token runs on over
whitespace to the end-of-turn token that follows, and whitespace after that token (ChatML's ``"\\n"``
between turns) is not trained on.
"""

from __future__ import annotations

import bisect
import re
import weakref
from dataclasses import dataclass, field

from transformers.utils.chat_template_utils import render_jinja_template

from alignkit.errors import UserError

# The end-of-turn tokens of the common chat formats (ChatML, Llama 3, Gemma, Phi-3, Llama 2 / Mistral);
# `end_of_turn_ids` adds EOS and whatever token the tokenizer's own template ends an assistant turn with.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Private-use characters: no real conversation contains them, and templates pass them through untouched.
_PLACEHOLDER = "\ue000alignkit-assistant-{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000alignkit-assistant-(\\d+)\ue001")


class ChatTemplateError(UserError, ValueError):
    """The tokenizer's chat template is missing or cannot be used to find the assistant tokens."""


@dataclass
class Example:
    """One tokenized training sequence; ``loss_mask[i] == 1`` means token i is trained on (as a label)."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "(in-memory tokenizer)"


def chat_template(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    if not t:
        raise ChatTemplateError(
            f"tokenizer {tokenizer_name(tokenizer)!r} has no chat template, which conversational data needs; "
            "run `alignkit train-tokenizer` (it writes a tokenizer with a chat template) or set 'chat_template' "
            "in the tokenizer's tokenizer_config.json")
    return t


def has_generation_markers(tokenizer) -> bool:
    """True if the tokenizer's chat template marks assistant content with ``{% generation %}``."""
    return bool(_GENERATION_RE.search(chat_template(tokenizer)))


def _token_id(tokenizer, name: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(name)
    if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id and \
            tokenizer.convert_ids_to_tokens(tid) == name:
        return tid
    return None


def _is_whitespace(tokenizer, tid: int) -> bool:
    return tid not in tokenizer.all_special_ids and tokenizer.decode([tid]).strip() == ""


def template_end_of_turn_id(tokenizer) -> int | None:
    """The added token the chat template writes right after an assistant message's content (skipping
    whitespace), e.g. Gemma's ``<end_of_turn>``; None without a template or if none follows."""
    t = getattr(tokenizer, "chat_template", None)
    if not t or isinstance(t, dict) and not t.get("default"):
        return None
    probe = _PLACEHOLDER.format(0)
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi."},
                                              {"role": "assistant", "content": probe}], tokenize=False)
    except Exception:  # a template that refuses this conversation says nothing about its end-of-turn token
        return None
    i = text.find(probe)
    if i < 0:
        return None
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    for tid in tokenizer(text[i + len(probe):], add_special_tokens=False)["input_ids"]:
        if tid in added:
            return tid
        if not _is_whitespace(tokenizer, tid):
            return None
    return None


_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn, shared by rendering (the loss mask runs through them) and
    generation (it stops at them): EOS, the known end-of-turn tokens the vocabulary has, and the token
    the tokenizer's chat template ends an assistant turn with. Remembered per tokenizer (probing the
    template costs more than rendering one short conversation) until its template, vocabulary or EOS changes."""
    state = (getattr(tokenizer, "chat_template", None), len(tokenizer), tokenizer.eos_token_id)
    try:
        known = _END_OF_TURN.get(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced
        known = None
    if known is not None and known[0] == state:
        return set(known[1])
    ids = _probe_end_of_turn_ids(tokenizer)
    try:
        _END_OF_TURN[tokenizer] = (state, frozenset(ids))
    except TypeError:
        pass
    return ids


def _probe_end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids.update(tid for tid in (_token_id(tokenizer, n) for n in END_OF_TURN_TOKENS) if tid is not None)
    tid = template_end_of_turn_id(tokenizer)
    if tid is not None:
        ids.add(tid)
    return ids


@dataclass
class AssistantTurn:
    """Where one assistant message is in a rendered conversation: its content's characters, and the turns
    before it rendered with the generation prompt (the prompt it would be generated from)."""

    index: int  # in the message list
    start: int
    end: int
    prompt: str


@dataclass
class RenderedConversation:
    """A conversation rendered to text, before tokenization.  With generation markers ``blocks`` are the
    character spans to train on; otherwise ``turns`` locate the assistant messages."""

    text: str
    turns: list[AssistantTurn] = field(default_factory=list)
    blocks: list[tuple[int, int]] | None = None


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template and tokenizes them.

    Rendering (`render_conversation`, `prompt_text`, `want`) only makes text; `flush` then tokenizes every
    text queued since the last flush in one batched call, so that `example`, `ids` and `completion` (which
    would otherwise tokenize one text at a time) read the cached encodings."""

    def __init__(self, tokenizer, use_generation_markers: bool | None = None):
        self.tok = tokenizer
        self._use_markers = use_generation_markers
        self._eot: set[int] | None = None
        self._ws: dict[int, bool] = {}
        self._pending: list[tuple[str, bool]] = []
        self._cache: dict[tuple[str, bool], tuple[list[int], list[tuple[int, int]] | None]] = {}

    # --- template and token classes ---------------------------------------------------------------
    @property
    def template(self) -> str:
        return chat_template(self.tok)

    @property
    def markers(self) -> bool:
        if self._use_markers is None:
            self._use_markers = bool(_GENERATION_RE.search(self.template))
        return self._use_markers

    @property
    def eos(self) -> int:
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {tokenizer_name(self.tok)!r} has no eos token; "
                             "plain-text data needs one to mark the end of a completion/document")
        return eos

    @property
    def eot(self) -> set[int]:
        if self._eot is None:
            self._eot = end_of_turn_ids(self.tok)
        return self._eot

    def is_ws(self, tid: int) -> bool:
        r = self._ws.get(tid)
        if r is None:
            r = self._ws[tid] = tid not in self.eot and _is_whitespace(self.tok, tid)
        return r

    def error(self, why: str) -> ChatTemplateError:
        return ChatTemplateError(f"the chat template of tokenizer {tokenizer_name(self.tok)!r} {why}")

    # --- text --------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool = False, blocks: bool = False):
        """The text of ``messages`` (and, ``blocks``, the character spans of its generation blocks), rendered
        the way `apply_chat_template` renders it, without its per-call overhead."""
        try:
            texts, spans = render_jinja_template(
                conversations=[messages], chat_template=self.template, add_generation_prompt=generation_prompt,
                return_assistant_tokens_mask=blocks, **self.tok.special_tokens_map)
        except Exception as e:  # jinja errors, raise_exception() in templates, ...
            raise ChatTemplateError(f"the chat template of tokenizer {tokenizer_name(self.tok)!r} failed on this "
                                    f"conversation: {type(e).__name__}: {e}") from None
        return (texts[0], spans[0]) if blocks else texts[0]

    def want(self, text: str, special: bool = False) -> str:
        """Queue ``text`` for the next `flush` (``special``: with the tokenizer's own special tokens)."""
        self._pending.append((text, special))
        return text

    def prompt_text(self, messages: list[dict]) -> str:
        """``messages`` rendered with the generation prompt (the assistant header)."""
        return self.want(self._render(messages, True))

    def render_conversation(self, messages: list[dict], first: int = 0) -> RenderedConversation:
        """Render ``messages`` for training on its assistant turns; without generation markers only those at
        index >= ``first`` (a prompt's own assistant turns are context) are located and checked, so callers
        zero the loss mask over the prompt tokens either way."""
        if self.markers:
            return self._render_marked(messages)
        text = self.want(self._render(messages))
        turns = [a for a, m in enumerate(messages) if m["role"] == "assistant" and a >= first]
        if turns and turns[0] == 0:
            raise ChatTemplateError(
                f"conversation starts with an assistant turn; the chat template of tokenizer "
                f"{tokenizer_name(self.tok)!r} has no {{% generation %}} markers, so each assistant turn is checked "
                "against the prompt it would be generated from (the turns before it) and a system or user turn "
                "must come first")
        spans = self._locate(messages, text)
        return RenderedConversation(text, [AssistantTurn(a, *spans[a], self.want(self._render(messages[:a], True)))
                                           for a in turns])

    def _render_marked(self, messages: list[dict]) -> RenderedConversation:
        text, blocks = self._render(messages, blocks=True)
        if not blocks and any(m["role"] == "assistant" for m in messages):
            raise self.error("marked no generation block in this conversation; put {% generation %}..."
                             "{% endgeneration %} around the assistant content and end-of-turn token")
        return RenderedConversation(self.want(text), blocks=[tuple(b) for b in blocks])

    def _locate(self, messages: list[dict], text: str) -> dict[int, tuple[int, int]]:
        """Character span of each assistant message's content (as rendered, maybe trimmed) in ``text``."""
        if not any(m["role"] == "assistant" for m in messages):
            return {}
        holes = [{**m, "content": _PLACEHOLDER.format(a)} if m["role"] == "assistant" else m
                 for a, m in enumerate(messages)]
        pieces = _PLACEHOLDER_RE.split(self._render(holes))
        # pieces alternate: text, placeholder number, text, ...; every assistant turn exactly once, in order
        if [int(x) for x in pieces[1::2]] != [a for a, m in enumerate(messages) if m["role"] == "assistant"]:
            raise self.error("does not render each assistant message's content exactly once, so the "
                              "assistant tokens cannot be located; add {% generation %} markers to it")
        spans, pos, n = {}, 0, len(pieces) // 2
        for k in range(n):
            a, seg, after = int(pieces[2 * k + 1]), pieces[2 * k], pieces[2 * k + 2]
            if not text.startswith(seg, pos):
                raise self.error(f"renders the conversation differently depending on the content of its "
                                  f"assistant turns (before messages[{a}]), so the assistant tokens cannot be "
                                  "located; add {% generation %} markers to it")
            pos += len(seg)
            c = messages[a]["content"]
            for v in dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip())):
                rest = pos + len(v)
                if text.startswith(v, pos) and (text[rest:] == after if k == n - 1 else text.startswith(after, rest)):
                    break
            else:
                raise self.error(f"does not render the content of messages[{a}] (assistant) verbatim, so "
                                  "its tokens cannot be located; add {% generation %} markers to it")
            spans[a] = (pos, pos + len(v))
            pos += len(v)
        return spans

    # --- tokens ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Tokenize every text rendered or requested since the last flush, in one batched call per kind."""
        pending, self._pending = self._pending, []
        self._cache = {}
        for special in (False, True):
            texts = list(dict.fromkeys(t for t, s in pending if s == special))
            if texts:
                self._encode(texts, special)

    def _encode(self, texts: list[str], special: bool) -> None:
        if getattr(self.tok, "is_fast", False):  # the Rust tokenizer itself: same ids, with character offsets
            for t, e in zip(texts, self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=special)):
                self._cache[(t, special)] = (e.ids, e.offsets)
            return
        for t, ids in zip(texts, self.tok(texts, add_special_tokens=special)["input_ids"]):
            self._cache[(t, special)] = (list(ids), None)

    def _encoding(self, text: str, special: bool = False):
        if (text, special) not in self._cache:
            self._encode([text], special)
        return self._cache[(text, special)]

    def ids(self, text: str, special: bool = False) -> list[int]:
        return list(self._encoding(text, special)[0])

    def text_ids(self, text: str) -> list[int]:
        """A plain-text prompt or document as the tokenizer itself encodes it (with its special tokens)."""
        return self.ids(text, special=True)

    # --- examples ----------------------------------------------------------------------------------
    def example(self, rc: RenderedConversation) -> Example:
        """Token ids of a rendered conversation, with the loss mask on its assistant turns."""
        ids, offsets = self._encoding(rc.text)
        if offsets is None:
            raise ChatTemplateError(f"tokenizer {tokenizer_name(self.tok)!r} is not a fast tokenizer; the "
                                    "assistant tokens are located through a fast tokenizer's offsets "
                                    "(a tokenizer.json)")
        mask = [0] * len(ids)
        if rc.blocks is not None:
            for start, end in rc.blocks:
                span = _token_span(offsets, start, end)
                if span is not None:
                    for i in range(span[0], self._close(ids, span[1]) + 1):
                        mask[i] = 1
            if rc.blocks and not any(mask):
                raise self.error(
                    "has {% generation %} markers but they marked no tokens of this conversation's assistant "
                    "turns; put {% generation %}...{% endgeneration %} around the assistant content and "
                    "end-of-turn token")
            return Example(list(ids), mask)
        for turn in rc.turns:
            # trained: from the end of the generation prompt (so whatever the template writes before the
            # content is learned too) through the end-of-turn token after the content
            p = self.ids(turn.prompt)
            span = _token_span(offsets, turn.start, turn.end)
            if ids[:len(p)] != p or span is None or span[0] < len(p):
                a = turn.index
                raise self.error(
                    f"is not prefix-consistent (rendering messages[:{a}] with the generation prompt is not a "
                    f"token prefix of messages[:{a + 1}] as rendered in the whole conversation), so the model "
                    "would be trained on one prompt and asked with another (does the template drop or move a "
                    "message, e.g. the system prompt, depending on which turn is last?); add {% generation %} "
                    "markers to the template or change the data so that it renders consistently")
            last = self._close(ids, span[1])
            if ids[last] not in self.eot:
                nxt = repr(self.tok.decode(ids[last + 1:last + 4])) if last + 1 < len(ids) else "the end of the text"
                names = ", ".join(self.tok.convert_ids_to_tokens(sorted(self.eot)))
                raise self.error(
                    f"writes no end-of-turn token after the content of messages[{turn.index}] (assistant) (it is "
                    f"followed by {nxt}); the loss runs through the token that ends each assistant turn, so that "
                    f"the model learns to stop (end-of-turn tokens: {names})")
            for i in range(len(p), last + 1):
                mask[i] = 1
        return Example(list(ids), mask)

    def _close(self, ids: list[int], last: int) -> int:
        """Index of the last token to train on for a span whose last token is ``last``: on through the
        end-of-turn token that follows (over whitespace), or back over whitespace after an end-of-turn token."""
        k = last
        while k > 0 and self.is_ws(ids[k]):
            k -= 1
        if ids[k] in self.eot:
            return k
        j = last + 1
        while j < len(ids) and self.is_ws(ids[j]):
            j += 1
        return j if j < len(ids) and ids[j] in self.eot else last

    def completion(self, prompt_text: str, rc: RenderedConversation) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of a conversational prompt + completion, the completion running from
        the end of the prompt through the end-of-turn token of its last assistant turn."""
        ex = self.example(rc)
        p = self.ids(prompt_text)
        if ex.input_ids[:len(p)] != p:
            raise self.error("is not prefix-consistent: the prompt rendered with the generation prompt is not "
                              "a token prefix of prompt + completion, so the completion tokens cannot be "
                              "separated from the prompt")
        last = max((i for i, m in enumerate(ex.loss_mask) if m), default=len(ex.input_ids) - 1)
        return p, ex.input_ids[len(p):last + 1]


def _token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """(first, last) index of the tokens overlapping characters [start, end), or None."""
    first = bisect.bisect_right([e for _, e in offsets], start)
    if first >= len(offsets) or offsets[first][0] >= end:
        return None
    last = first
    while last + 1 < len(offsets) and offsets[last + 1][0] < end:
        last += 1
    return first, last
