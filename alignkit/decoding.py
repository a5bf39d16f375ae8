"""Decoding-time alignment: rules that reshape the next-token logits while generating, and a fixed in-context
prefix (system prompt + demonstrations) before each prompt.

The notes (Hung-yi Lee's lecture, after Lin et al. 2023) show a base model pushed toward aligned answers without
training: alignment changes few tokens, mostly where the answer ends and a few stylistic ones, so raising the
end-of-sequence logit as the answer grows, biasing those tokens and penalising repeats recovers much of it, and a
few in-context demonstrations (URIAL) recover more.

Every rule is a pure function on (B, V) logits below. `DecodingRules` applies them in one fixed order, the same
in alignkit's KV-cached decoder and (as a `transformers.LogitsProcessor`) in transformers' `generate`, so both
paths give the same greedy tokens. Sampling then applies temperature, top-k, top-p and min-p in transformers'
order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from alignkit.config import Repeatable
from alignkit.errors import DataError, UserError

# ----------------------------------------------------------------------------------------------
# The rules: (B, V) logits in, (B, V) logits out
# ----------------------------------------------------------------------------------------------


def repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, real: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, §4.1, arXiv 1909.05858), as transformers implements it:
    for every token already in the sequence (prompt and answer so far), logit / penalty if the logit is positive,
    logit * penalty otherwise (penalty > 1 discourages repeats; 1 = off).

    Args:
        logits: (B, V) next-token logits.
        ids: (B, L) the sequence so far (left padding included).
        real: (B, L) bool, True where `ids` holds a real token (padding is not context).
    """
    if penalty == 1.0:
        return logits
    # counts, not a bool scatter: with duplicate ids a bool scatter_ keeps only one of their flags
    seen = torch.zeros(logits.shape, dtype=torch.long, device=logits.device).scatter_add_(-1, ids, real.long()) > 0  # (B, V)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def frequency_presence_penalty(logits: torch.Tensor, generated: torch.Tensor, frequency: float,
                               presence: float) -> torch.Tensor:
    """OpenAI's frequency and presence penalties (OpenAI API reference, "parameter details"; vLLM's definition):
    logit - frequency * count - presence * [count > 0], where count is how often the token occurs in the answer
    generated so far (the prompt does not count).

    Args:
        logits: (B, V).
        generated: (B, G) the answer tokens so far (G may be 0).
    """
    if (frequency == 0.0 and presence == 0.0) or generated.shape[1] == 0:
        return logits
    counts = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(-1, generated, torch.ones_like(generated, dtype=logits.dtype))  # (B, V)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def no_repeat_ngram(logits: torch.Tensor, ids: torch.Tensor, real: torch.Tensor, n: int) -> torch.Tensor:
    """No repeated n-gram (Paulus et al. 2017, §2.5 "trigram avoidance", arXiv 1705.04304; transformers'
    `no_repeat_ngram_size`): a token that would complete an n-gram already present in the sequence gets -inf.
    n-grams that include padding do not count.

    Args:
        logits: (B, V).
        ids: (B, L) the sequence so far; real: (B, L) bool.
    """
    L = ids.shape[1]
    if n <= 0 or L < n:
        return logits
    windows = ids.unfold(1, n, 1)  # (B, L-n+1, n)
    window_real = real.unfold(1, n, 1).all(-1)  # (B, L-n+1)
    if n == 1:
        match = window_real
    else:
        prefix = ids[:, L - n + 1:]  # (B, n-1): the tokens the next one would extend
        match = (windows[:, :, :-1] == prefix[:, None]).all(-1) & window_real & real[:, L - n + 1:].all(-1, keepdim=True)
    banned = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
    banned.scatter_add_(-1, windows[:, :, -1], match.long())
    return logits.masked_fill(banned > 0, float("-inf"))


def logit_bias(logits: torch.Tensor, token_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A fixed bias added to chosen tokens' logits (OpenAI API's `logit_bias`; Lin et al. 2023 reweight stylistic
    tokens). token_ids, values: (K,)."""
    if token_ids.numel() == 0:
        return logits
    return logits.index_add(-1, token_ids, values.to(logits.dtype).expand(logits.shape[0], -1))


def eos_boost(logits: torch.Tensor, stop_ids: torch.Tensor, n_generated: int, boost: float) -> torch.Tensor:
    """An end-of-sequence bonus that grows with the answer's length: boost * (tokens generated so far) added to
    every stop token's logit (the notes: an aligned model's largest change is that it stops; transformers'
    `exponential_decay_length_penalty` is a multiplicative variant). stop_ids: (S,)."""
    if boost == 0.0 or n_generated == 0:
        return logits
    return logits.index_add(-1, stop_ids, torch.full((logits.shape[0], stop_ids.numel()), boost * n_generated,
                                                     dtype=logits.dtype, device=logits.device))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k sampling (Fan et al. 2018, §5.4, arXiv 1805.04833): keep the k highest logits (ties at the k-th
    included), -inf elsewhere; k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020, arXiv 1904.09751): keep the smallest set of most likely tokens
    whose probability reaches top_p (the top token always stays); -inf elsewhere."""
    if top_p >= 1.0:
        return logits
    probs = logits.float().softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # drop a token when the mass before it already reaches top_p
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024, eq. 1, arXiv 2407.01082): keep tokens whose probability is at least
    min_p times the top token's; -inf elsewhere; 0 keeps all."""
    if min_p <= 0.0:
        return logits
    probs = logits.float().softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                min_p: float = 0.0) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax when temperature == 0; else softmax(logits / temperature)
    after top-k, top-p and min-p, in that order (transformers' order)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = min_p_filter(top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p), min_p)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Options shared by the commands that generate
# ----------------------------------------------------------------------------------------------


@dataclass
class SamplingOptions:
    """How the next token is chosen: sampling settings and the logit rules (penalties, bias, EOS boost)."""

    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold when sampling (1 = off)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = off)."""
    min_p: float = 0.0
    """Sample among tokens at least this fraction as likely as the top token (0 = off)."""
    repetition_penalty: float = 1.0
    """CTRL penalty on every token already in the prompt or answer (> 1 discourages repeats; 1 = off)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it already occurs in the answer."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit if it already occurs in the answer."""
    no_repeat_ngram: int = 0
    """Never repeat an n-gram of this size (0 = off)."""
    logit_bias: Annotated[tuple[str, ...], Repeatable] = ()
    """TOKEN=VALUE added to that token's logit (repeatable). TOKEN is a vocabulary entry (e.g. <|im_end|>) or
    text that is one token."""
    logit_bias_file: str | None = None
    """JSON file {"TOKEN": VALUE, ...} of more biases (flags win over the file)."""
    eos_boost: float = 0.0
    """Added to the stop tokens' logits (EOS and the chat template's end of turn) per token generated so far:
    the longer the answer, the likelier it ends."""


@dataclass
class DecodingOptions(SamplingOptions):
    """Sampling options, stop strings and a fixed in-context prefix (URIAL) before each prompt."""

    stop: Annotated[tuple[str, ...], Repeatable] = ()
    """Stop generating when the answer contains this text; the answer is cut before it (repeatable)."""
    system_prompt: str | None = None
    """A system prompt before each prompt (a system turn with a chat template, a plain preamble without)."""
    demonstrations: str | None = None
    """JSONL of {"prompt", "completion"} examples shown before each prompt (in-context alignment, URIAL)."""
    context_format: Literal["auto", "chat", "plain"] = "auto"
    """How the prefix is written: chat (the chat template's turns), plain (URIAL's "# Query:" / "# Answer:"
    blocks, for a base model; stops at its closing ```), or auto (chat when the tokenizer has a template)."""


@dataclass
class DecodingRules:
    """The logit rules of one generation, resolved against a tokenizer: applied to each step's (B, V) logits by
    `process`, whichever decoding path runs. Also the stop strings a completion is cut at."""

    stop_ids: list[int]
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram: int = 0
    bias: dict[int, float] = field(default_factory=dict)
    eos_boost: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    stop_strings: tuple[str, ...] = ()
    tokenizer: object = None

    @property
    def changes_logits(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.no_repeat_ngram > 0 or bool(self.bias) or self.eos_boost != 0.0)

    def process(self, ids: torch.Tensor, real: torch.Tensor, n_generated: int, logits: torch.Tensor) -> torch.Tensor:
        """The rules on (B, V) logits, given the (B, L) sequences so far (prompt left-padded, then the last
        `n_generated` tokens generated) and their (B, L) real-token mask."""
        logits = logits.float()
        logits = repetition_penalty(logits, ids, real, self.repetition_penalty)
        logits = frequency_presence_penalty(logits, ids[:, ids.shape[1] - n_generated:], self.frequency_penalty,
                                            self.presence_penalty)
        logits = no_repeat_ngram(logits, ids, real, self.no_repeat_ngram)
        if self.bias:
            logits = logit_bias(logits, torch.tensor(list(self.bias), device=logits.device),
                                torch.tensor(list(self.bias.values()), device=logits.device))
        return eos_boost(logits, torch.tensor(self.stop_ids, device=logits.device), n_generated, self.eos_boost)

    def stop_at(self, completion: list[int]) -> int | None:
        """Length of `completion` up to the token that completes its first stop string, or None."""
        if not self.stop_strings:
            return None
        return next((j + 1 for j in range(len(completion)) if self.hit_stop(completion[:j + 1])), None)

    def hit_stop(self, completion: list[int]) -> bool:
        """Whether the completion's newest token completes a stop string."""
        if not self.stop_strings or not completion:
            return False
        longest = max(len(s) for s in self.stop_strings)
        # a stop string of c characters spans at most 4c byte-level tokens
        tail = self.tokenizer.decode(completion[-4 * longest - 1:], skip_special_tokens=True)
        return any(s in tail for s in self.stop_strings)


def token_id(tokenizer, token: str, flag: str) -> int:
    """A vocabulary entry's id, or the id of text that encodes to exactly one token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tid) == token:
        return tid
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"{flag}: {token!r} is not one token of this tokenizer (it encodes to {len(ids)} tokens: "
                        f"{tokenizer.convert_ids_to_tokens(ids)})")
    return ids[0]


def parse_bias(tokenizer, flags: tuple[str, ...], path: str | None) -> dict[int, float]:
    """{token id: bias} from --logit-bias-file then --logit-bias TOKEN=VALUE flags."""
    raw: list[tuple[str, object, str]] = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--logit-bias-file {path}: no such file")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DataError(p, e.lineno, f"not JSON: {e.msg}") from None
        if not isinstance(data, dict):
            raise DataError(p, 1, 'expected a JSON object {"TOKEN": VALUE, ...}')
        raw += [(k, v, f"--logit-bias-file {path}") for k, v in data.items()]
    for item in flags:
        token, sep, value = item.rpartition("=")
        if not sep or not token:
            raise UserError(f"--logit-bias {item!r}: expected TOKEN=VALUE")
        raw.append((token, value, "--logit-bias"))
    bias: dict[int, float] = {}
    for token, value, where in raw:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: bias of {token!r} is {value!r}, not a number") from None
        if v != v or v == float("inf"):
            raise UserError(f"{where}: bias of {token!r} must be finite or -inf (got {value!r})")
        bias[token_id(tokenizer, token, where)] = v
    return bias


def decoding_rules(opts, tokenizer, model=None) -> DecodingRules | None:
    """The rules `opts` (a SamplingOptions / DecodingOptions, or any config with its fields) asks for; None when
    it asks for none, so generation takes its plain path."""
    from alignkit.models import stop_token_ids

    check_sampling(opts)
    stop_strings = tuple(getattr(opts, "stop", ()) or ())
    if in_context_format(tokenizer, opts) == "plain":
        stop_strings += (PLAIN_END,)
    rules = DecodingRules(
        stop_ids=stop_token_ids(tokenizer, model), repetition_penalty=opts.repetition_penalty,
        frequency_penalty=opts.frequency_penalty, presence_penalty=opts.presence_penalty,
        no_repeat_ngram=opts.no_repeat_ngram, bias=parse_bias(tokenizer, opts.logit_bias, opts.logit_bias_file),
        eos_boost=opts.eos_boost, top_k=opts.top_k, min_p=opts.min_p, stop_strings=stop_strings, tokenizer=tokenizer)
    if not rules.changes_logits and not stop_strings and not rules.top_k and not rules.min_p:
        return None
    return rules


def check_sampling(opts) -> None:
    """One clear line for a sampling option out of range."""
    if opts.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (got {opts.top_k})")
    if not 0.0 <= opts.min_p < 1.0:
        raise UserError(f"--min-p must be in [0, 1) (got {opts.min_p})")
    if not 0.0 < opts.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1] (got {opts.top_p})")
    if opts.repetition_penalty <= 0:
        raise UserError(f"--repetition-penalty must be > 0 (got {opts.repetition_penalty})")
    if opts.no_repeat_ngram < 0:
        raise UserError(f"--no-repeat-ngram must be >= 0 (got {opts.no_repeat_ngram})")
    fmt = getattr(opts, "context_format", "auto")
    if fmt not in ("auto", "chat", "plain"):
        raise UserError(f"--context-format must be auto, chat or plain (got {fmt!r})")


def rules_record(opts) -> dict:
    """The sampling settings a run used, for its summary (what made its samples)."""
    return {f: getattr(opts, f) for f in SamplingOptions.__dataclass_fields__ if hasattr(opts, f)}


# ----------------------------------------------------------------------------------------------
# In-context alignment: a fixed prefix before each prompt
# ----------------------------------------------------------------------------------------------

# URIAL's plain-text layout (Lin et al. 2023, §3, arXiv 2312.01552): each example a "# Query:" block and an
# "# Answer:" block in ``` fences, the new prompt's answer opened and left for the model to close.
PLAIN_END = "```"
DEFAULT_SYSTEM = ("Below are conversations between a human and an AI assistant. The assistant answers helpfully, "
                  "honestly and briefly, says when it does not know, and declines harmful requests.")


def in_context_format(tokenizer, opts) -> str | None:
    """chat / plain when `opts` asks for an in-context prefix, else None."""
    if not (getattr(opts, "system_prompt", None) or getattr(opts, "demonstrations", None)):
        return None
    fmt = getattr(opts, "context_format", "auto")
    if fmt == "auto":
        return "chat" if tokenizer.chat_template else "plain"
    if fmt == "chat" and not tokenizer.chat_template:
        raise UserError("--context-format chat: this tokenizer has no chat template (use plain)")
    return fmt


_DEMONSTRATIONS: dict[str, list[tuple[str, str]]] = {}


def read_demonstrations(path: str) -> list[tuple[str, str]]:
    """(user text, assistant text) pairs of a demonstrations file: prompt-completion records, string or
    conversational (the last user turn and the assistant answer)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--demonstrations {path}: no such file")
    key = f"{p.resolve()}:{p.stat().st_mtime_ns}:{p.stat().st_size}"
    if key in _DEMONSTRATIONS:  # read once per file version, not once per prompt
        return _DEMONSTRATIONS[key]
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(p, i, f"not JSON: {e.msg}") from None
        if not isinstance(rec, dict) or "prompt" not in rec or "completion" not in rec:
            raise DataError(p, i, 'a demonstration needs "prompt" and "completion"')
        out.append((_text(rec["prompt"], "user", p, i), _text(rec["completion"], "assistant", p, i)))
    if not out:
        raise DataError(p, 0, "no demonstrations")
    _DEMONSTRATIONS[key] = out
    return out


def _text(value, role: str, path: Path, line: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == role]
        if turns and isinstance(turns[-1], str):
            return turns[-1]
    raise DataError(path, line, f"expected a string or messages with a {role} turn")


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") == "user")


def context_prompt(tokenizer, prompt, opts) -> list[int]:
    """Token ids of `prompt` (a string, or messages) after the in-context prefix `opts` asks for (none: the
    prompt rendered as every command renders it)."""
    from alignkit.data import render_prompt

    fmt = in_context_format(tokenizer, opts)
    if fmt is None:
        return render_prompt(tokenizer, prompt)
    system = getattr(opts, "system_prompt", None)
    demos = read_demonstrations(opts.demonstrations) if getattr(opts, "demonstrations", None) else []
    if fmt == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        for q, a in demos:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        given = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system and given and given[0].get("role") == "system":
            given = given[1:]  # the fixed system prompt replaces the record's own
        return render_prompt(tokenizer, messages + list(given))
    blocks = [f"# Query:\n```\n{q}\n```\n\n# Answer:\n```\n{a}\n```\n\n" for q, a in demos]
    text = (f"{system}\n\n" if system else "") + "".join(blocks) + f"# Query:\n```\n{_prompt_text(prompt)}\n```\n\n# Answer:\n```\n"
    return render_prompt(tokenizer, text)


def decode_completion(tokenizer, completion: list[int], rules: DecodingRules | None, stops) -> tuple[str, bool]:
    """(answer text, ended): the text cut before its first stop string; ended = it stopped at a stop token or
    a stop string rather than at the token limit."""
    text = tokenizer.decode(completion, skip_special_tokens=True)
    if rules is not None and rules.stop_strings:
        cuts = [text.find(s) for s in rules.stop_strings if s in text]
        if cuts:
            return text[:min(cuts)], True
    return text, bool(completion) and completion[-1] in set(stops)
