"""`alignkit probe-knowledge`: what a model already knows, question by question (SliCK, Gekhman et al. 2024,
"Does Fine-Tuning LLMs on New Knowledge Encourage Hallucinations?", §3).

The notes: SFT draws out knowledge pretraining put in rather than injecting it. Gekhman et al. ask each
question under several few-shot prompts (exemplar sets drawn from other questions) and classify it by
P_correct, the fraction of the model's answers that are correct:

    HighlyKnown   greedy answer correct under every prompt variant     P_correct(greedy) = 1
    MaybeKnown    greedy answer correct under some                     0 < P_correct(greedy) < 1
    WeaklyKnown   greedy never correct, a sampled answer sometimes is  P_correct(greedy) = 0 < P_correct(T > 0)
    Unknown       no answer ever correct                               P_correct(greedy) = P_correct(T > 0) = 0

They sample 16 answers at T = 0.5 per question; here `--samples` per variant (default 8, i.e. 32 at the default
4 variants), and only for questions whose greedy answers are never correct (the others' category does not
depend on the samples). Fine-tuning on MaybeKnown examples helped most in their study; Unknown examples were
learned slowly and made the model hallucinate more.

Correctness (`--match`):
    contains    (default) the normalised reference is a whole-word span of the normalised answer: answers are
                often full sentences ("Ada Brook lives in Marlow.") while references are entities ("Marlow")
    normalized  the normalised answer equals the normalised reference (SQuAD's normalisation: lowercase, no
                punctuation, no articles a/an/the, single spaces; Rajpurkar et al. 2016)
    exact       the answer equals the reference after stripping surrounding whitespace
A reference may list aliases; any one counts. The answer is the first non-empty line of the completion.
`--reward MODULE:FUNCTION` replaces the matcher: correct = reward > `--reward-threshold`.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from alignkit.config import Repeatable
from alignkit.errors import DataError, UserError, writing
from alignkit.generation import generate

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
# Fields this command adds to every record (an input that already has them, e.g. an earlier run's output, gets
# them replaced).
ADDED_FIELDS = ("category", "greedy_correct", "sampled_correct", "p_correct_greedy", "p_correct_sampled",
                "greedy_answers")


# ----------------------------------------------------------------------------------------------
# Correctness and category (pure; hand-worked tests in tests/test_probe.py)
# ----------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016): lowercase, punctuation removed, articles a/an/the
    removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(completion: str) -> str:
    """The answer part of a completion: its first non-empty line, stripped (a few-shot plain prompt goes on
    with the next "Q:" block)."""
    return completion.strip().split("\n", 1)[0].strip()


def first_sentence(completion: str) -> str:
    """The answer part of a cloze completion: its first line up to the end of its first sentence."""
    line = first_line(completion)
    end = re.search(r"[.!?](\s|$)", line)
    return line[:end.start() + 1] if end else line


def matches(answer: str, references: list[str], how: Literal["normalized", "exact", "contains"]) -> bool:
    """Whether `answer` is correct for any of the reference aliases (see the module doc for `how`)."""
    if how == "exact":
        return any(answer.strip() == r.strip() for r in references)
    got = normalize(answer)
    if how == "normalized":
        return any(got == normalize(r) for r in references)
    return any(f" {normalize(r)} " in f" {got} " for r in references if normalize(r))


def category(greedy_correct: int, variants: int, sampled_correct: int | None) -> str:
    """SliCK category from k of `variants` greedy answers correct and m sampled answers correct (None: not
    sampled, allowed only when k > 0)."""
    if greedy_correct == variants:
        return "HighlyKnown"
    if greedy_correct > 0:
        return "MaybeKnown"
    if sampled_correct is None:
        raise ValueError("a question whose greedy answers are never correct needs its sampled answers")
    return "WeaklyKnown" if sampled_correct > 0 else "Unknown"


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------


@dataclass
class Question:
    """One record as a question: `text` (the last user turn), its reference aliases, and the answer an
    exemplar built from it shows (the record's own assistant text, else its first reference)."""

    where: str  # path:line
    record: dict
    text: str
    references: list[str]
    shown: str
    prompt: Any  # what a --reward function receives as the prompt (the record's prompt, TRL's convention)


def lookup(record: dict, dotted: str):
    """record["a"]["b"] for "a.b"; KeyError when a part is missing."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def last_user_turn(messages: list[dict], where: str) -> int:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"{where} has no user turn to ask as the question")
    return users[-1]


def as_question(record: dict, answer_field: str, path, line: int) -> Question:
    """Read `record` (at path:line) as a question: {"prompt": str | messages, "answer"?, "completion"?} or a
    conversation (messages / sharegpt / alpaca) whose last user turn is the question (its system and earlier
    turns are not shown to the model); the reference is `answer_field` if the record has it, else the assistant
    text after the question."""
    from alignkit.data.formats import check_messages, detect_format, to_conversation
    from alignkit.rewards import completion_text

    try:
        if "prompt" in record and "messages" not in record:
            prompt = record["prompt"]
            if isinstance(prompt, str):
                text = prompt
            else:
                messages = check_messages(prompt, "prompt")
                text = messages[last_user_turn(messages, "prompt")]["content"]
            completion = record.get("completion")
            assistant = completion_text(completion).strip() if isinstance(completion, (str, list)) else ""
        else:
            try:
                fmt = detect_format(record)
            except ValueError:
                fmt = None
            if fmt not in ("messages", "sharegpt", "alpaca"):
                raise ValueError('no question: expected {"prompt": str | messages, "answer": str | [aliases]} or '
                                 '{"messages": [..., user, assistant]}')
            messages = to_conversation(record, fmt)
            q = last_user_turn(messages, "the conversation")
            text = messages[q]["content"]
            after = [m["content"] for m in messages[q + 1:] if m["role"] == "assistant"]
            assistant = after[-1].strip() if after else ""
            prompt = messages[:q + 1]
        if not text.strip():
            raise ValueError("the question is empty")
        references = reference_aliases(record, answer_field, assistant)
    except ValueError as e:
        raise DataError(path, line, str(e)) from None
    return Question(f"{path}:{line}", record, text.strip(), references, assistant or references[0], prompt)


def reference_aliases(record: dict, answer_field: str, assistant: str) -> list[str]:
    try:
        value = lookup(record, answer_field)
    except KeyError:
        if not assistant:
            raise ValueError(f"no reference answer: no {answer_field!r} field (--answer-field) and no assistant "
                             "turn after the question") from None
        return [assistant]
    aliases = value if isinstance(value, list) else [value]
    if not aliases or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in aliases):
        raise ValueError(f"field {answer_field!r} must be a string, a number or a non-empty list of them (aliases)")
    aliases = [str(a) for a in aliases]
    if any(not normalize(a) for a in aliases):
        raise ValueError(f"field {answer_field!r} has an alias with nothing left to match once normalised "
                         f"(lowercase, no punctuation, no articles): {aliases}")
    return aliases


def read_questions(paths, answer_field: str, flag: str = "--data") -> list[Question]:
    from alignkit.data import read_records

    out = []
    for path in paths:
        for line, rec in read_records(path):
            out.append(as_question(rec, answer_field, path, line))
    if not out:
        raise UserError(f"{flag}: no records")
    return out


# ----------------------------------------------------------------------------------------------
# Prompt variants
# ----------------------------------------------------------------------------------------------


def exemplar_sets(questions: list[Question], pool: list[Question] | None, variants: int, shots: int,
                  seed: int) -> list[list[list[Question]]]:
    """Per question, `variants` lists of `shots` exemplars drawn (seeded per question and variant) from `pool`
    (default: the other questions), never the question itself nor a record asking the same question."""
    own = pool is None
    pool = questions if own else pool
    keys = [normalize(e.text) for e in pool]
    out = []
    for i, q in enumerate(questions):
        key = normalize(q.text)
        others = [e for j, e in enumerate(pool) if not (own and j == i) and keys[j] != key]
        if len(others) < shots:
            source = "other records in --data" if own else "records in --exemplars"
            raise UserError(f"--shots {shots}: {q.where} has only {len(others)} {source} with a different question "
                            "to draw exemplars from; lower --shots or give more records (or --exemplars FILE)")
        out.append([random.Random(f"{seed}:{i}:{v}").sample(others, shots) for v in range(variants)])
    return out


def plain_prompt(exemplars: list[Question], question: str) -> str:
    """Few-shot text for a base model: "Q: ...\\nA: ...\\n\\n" per exemplar, then "Q: question\\nA:"."""
    return "".join(f"Q: {e.text}\nA: {e.shown}\n\n" for e in exemplars) + f"Q: {question}\nA:"


def cloze_prompt(exemplars: list[Question], question: str) -> str:
    """Few-shot text in a pretraining corpus's own form (LAMA-style cloze probing, Petroni et al. 2019): each
    exemplar's question (a statement to complete) and answer, then the question; for base models too small to
    take up a "Q: / A:" format."""
    return " ".join(f"{e.text} {e.shown}" for e in exemplars) + f" {question}"


def chat_prompt(exemplars: list[Question], question: str) -> list[dict]:
    """Few-shot conversation: each exemplar a previous user/assistant exchange, the question the last user turn."""
    turns = []
    for e in exemplars:
        turns += [{"role": "user", "content": e.text}, {"role": "assistant", "content": e.shown}]
    return turns + [{"role": "user", "content": question}]


def resolve_format(fmt: str, tokenizer) -> Literal["chat", "plain", "cloze"]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "auto":
        return "chat" if has_template else "plain"
    if fmt == "chat" and not has_template:
        raise UserError("--format chat: the model's tokenizer has no chat template; use --format plain")
    return fmt


# ----------------------------------------------------------------------------------------------
# alignkit probe-knowledge
# ----------------------------------------------------------------------------------------------


@dataclass
class ProbeConfig:
    """Classify each question of a QA file by what the model knows (SliCK: HighlyKnown, MaybeKnown, WeaklyKnown,
    Unknown; Gekhman et al. 2024) from its few-shot answers; writes the records with their category."""

    model: str = ""
    """Local Hugging Face model directory to probe."""
    data: Annotated[tuple[str, ...], Repeatable] = ()
    """QA file(s): {"prompt": str | messages, "answer": str | [aliases], ...} or {"messages": [..., user,
    assistant], ...} (the question is the last user turn). Other fields are kept. Repeatable."""
    output: str = "runs/probe"
    """Output directory: categories.jsonl, summary.json, summary.md, config.yaml."""
    overwrite: bool = False
    """Replace the outputs of an earlier probe at --output."""
    config: str | None = None
    """YAML file of defaults for these fields; command-line flags override it."""
    answer_field: str = "answer"
    """Field with the reference answer (a string, or a list of aliases); a dotted path reaches into nested
    fields (meta.answer). A record without it is scored against its assistant text after the question."""
    exemplars: str | None = None
    """File of (question, answer) records, read like --data, to draw the few-shot exemplars from instead of
    the other --data records."""
    variants: int = 4
    """Few-shot prompt variants per question (different exemplar sets); greedy is asked under each."""
    shots: int = 4
    """Exemplars per prompt variant, drawn from the other records (never the question itself or a record with
    the same question). Fewer available is an error."""
    format: Literal["auto", "chat", "plain", "cloze"] = "auto"
    """chat: exemplars as earlier user/assistant turns under the tokenizer's chat template; plain: "Q: ...\\nA:
    ..." blocks for base models; cloze: statements to complete ("Ada Brook lives in") with their answers, the
    answer being the completion's first sentence; auto: chat if the tokenizer has a chat template, else plain."""
    samples: int = 8
    """Sampled answers per variant at --temperature, drawn only for questions whose greedy answers are never
    correct (Gekhman et al. draw 16 per question; fewer keeps CPU runs short)."""
    temperature: float = 0.5
    """Sampling temperature (Gekhman et al.: 0.5)."""
    match: Literal["contains", "normalized", "exact"] = "contains"
    """contains: the normalised reference is a whole-word span of the normalised answer (answers are often
    sentences); normalized: equal after normalising (lowercase, no punctuation, no articles); exact: equal.
    The answer is the completion's first non-empty line."""
    reward: str | None = None
    """Reward function MODULE:FUNCTION or path/file.py:FUNCTION that judges correctness instead of --match
    (TRL's convention; the record's fields arrive as keyword arguments, and a record without an "answer" field
    gets its reference as `answer`)."""
    reward_threshold: float = 0.5
    """With --reward: an answer is correct when its reward is above this."""
    reward_timeout: float = 600.0
    """Seconds one call of the --reward function may take before the run stops naming it (0 = no limit)."""
    group_by: Annotated[tuple[str, ...], Repeatable] = ()
    """Record field (dotted path, e.g. meta.bio_style) whose values get category shares of their own in the
    summary. Repeatable."""
    max_new_tokens: int = 32
    """Tokens generated at most per answer."""
    batch_size: int = 32
    """Prompts per generate call."""
    seed: int = 0
    """Seed of the exemplar draws and of sampling."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""
    progress: bool = True
    """Show progress: a bar on a terminal, else a plain line every few steps or 30 s."""


def check_flags(cfg: ProbeConfig) -> None:
    if not cfg.data:
        raise UserError("alignkit probe-knowledge needs --data FILE (questions with reference answers)")
    for name, low in (("variants", 1), ("shots", 0), ("samples", 1)):
        if getattr(cfg, name) < low:
            raise UserError(f"--{name} must be >= {low} (got {getattr(cfg, name)})")
    if cfg.shots == 0 and cfg.variants > 1:
        raise UserError(f"--shots 0 makes all --variants {cfg.variants} the same prompt; use --variants 1")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature must be > 0: it is the sampling temperature (got {cfg.temperature})")
    if cfg.reward_timeout < 0:
        raise UserError(f"--reward-timeout must be >= 0 (got {cfg.reward_timeout})")


def output_files(out: Path) -> dict[str, Path]:
    return {name: out / name for name in ("categories.jsonl", "summary.json", "summary.md", "config.yaml")}


class Answerer:
    """Generates answers to rendered prompts in chunks, with a progress line; counts the answers that ran into
    --max-new-tokens before their line ended (they may be cut short)."""

    def __init__(self, model, tokenizer, cfg: ProbeConfig):
        from alignkit.models import stop_token_ids

        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.stops = set(stop_token_ids(tokenizer, model))
        self.extract = first_sentence if cfg.format == "cloze" else first_line
        self.cut = 0

    def __call__(self, prompts: list[list[int]], temperature: float, what: str) -> list[str]:
        from alignkit.train.tracking import progress_iter

        step = self.cfg.batch_size * 4
        texts: list[str] = []
        for s in progress_iter(range(0, len(prompts), step), self.cfg.progress, what):
            ids = generate(self.model, self.tok, prompts[s:s + step], self.cfg.max_new_tokens, temperature,
                           1.0, self.cfg.batch_size)
            decoded = self.tok.batch_decode(ids, skip_special_tokens=True)
            answers = [self.extract(d) for d in decoded]
            self.cut += sum(not (c and c[-1] in self.stops) and a == d.strip() for c, d, a in zip(ids, decoded, answers))
            texts += answers
        return texts


def correctness(cfg: ProbeConfig, scorer, questions: list[Question], answers: list[str]) -> list[bool]:
    """Whether answer i is correct for question i: the --match rule, or --reward above --reward-threshold."""
    if scorer is None:
        return [matches(a, q.references, cfg.match) for q, a in zip(questions, answers)]
    if not answers:  # nothing sampled: a reward function need not handle empty batches
        return []
    from alignkit.rewards import score_completions

    completions = [a if isinstance(q.prompt, str) else [{"role": "assistant", "content": a}]
                   for q, a in zip(questions, answers)]
    names = dict.fromkeys(k for q in questions for k in q.record if k not in ("prompt", "messages", "completion"))
    columns = {k: [q.record.get(k) for q in questions] for k in names}
    if "answer" not in columns:  # the reference, under the name reward functions such as numeric_match read
        columns["answer"] = [q.references[0] if len(q.references) == 1 else q.references for q in questions]
    rewards, _ = score_completions([scorer], [q.prompt for q in questions], completions, columns,
                                   timeout=cfg.reward_timeout or None)
    return [bool(r > cfg.reward_threshold) for r in rewards.tolist()]


def group_key(record: dict, field: str) -> str:
    try:
        value = lookup(record, field)
    except KeyError:
        return "(missing)"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def tally(rows: list[dict]) -> dict:
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    return {"questions": len(rows), "categories": counts,
            "shares": {c: counts[c] / len(rows) if rows else math.nan for c in CATEGORIES}}


def summary_markdown(summary: dict) -> str:
    lines = [f"# probe-knowledge: {summary['questions']} questions", "",
             f"{summary['variants']} prompt variants of {summary['shots']} exemplars ({summary['format']}), greedy; "
             f"{summary['samples']} samples per variant at T = {summary['temperature']} for the "
             f"{summary['sampled_questions']} questions never right greedily; correct = {summary['match']}; "
             f"{summary['answers_cut']} answers reached the token limit before their line ended.", "",
             "| category | questions | share |", "|---|---|---|"]
    lines += [f"| {c} | {summary['categories'][c]} | {summary['shares'][c]:.3f} |" for c in CATEGORIES]
    for field, groups in summary["by_group"].items():
        lines += ["", f"## by {field}", "", "| " + field + " | questions | " + " | ".join(CATEGORIES) + " |",
                  "|---" * (len(CATEGORIES) + 2) + "|"]
        lines += [f"| {value} | {g['questions']} | " + " | ".join(f"{g['shares'][c]:.3f}" for c in CATEGORIES) + " |"
                  for value, g in groups.items()]
    return "\n".join(lines) + "\n"


def write_outputs(cfg: ProbeConfig, out: Path, rows: list[dict], summary: dict) -> None:
    """Every file written beside its final name, then renamed over it."""
    from alignkit.commands import write_jsonl
    from alignkit.config import save_config

    files = output_files(out)
    with writing(out, "probe outputs to"):
        write_jsonl(str(files["categories.jsonl"]), rows)
        save_config(cfg, out, "probe-knowledge")
        texts = {"summary.json": json.dumps(summary, indent=1) + "\n", "summary.md": summary_markdown(summary)}
        for name, text in texts.items():
            tmp = files[name].with_name(f".{name}.tmp")
            tmp.write_text(text)
            tmp.replace(files[name])


def render_all(tokenizer, fmt: str, questions: list[Question], sets: list[list[list[Question]]]) -> list[list[list[int]]]:
    """Token ids of every question's prompt variants."""
    from alignkit.data import render_prompt

    build: Callable = {"chat": chat_prompt, "plain": plain_prompt, "cloze": cloze_prompt}[fmt]
    return [[render_prompt(tokenizer, build(ex, q.text)) for ex in variants] for q, variants in zip(questions, sets)]


def main(cfg: ProbeConfig) -> dict:
    import torch

    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.rewards import load_reward_function

    check_flags(cfg)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {cfg.output} is a file; give a directory")
    if output_files(out)["categories.jsonl"].exists() and not cfg.overwrite:
        raise UserError(f"--output {cfg.output} already holds a probe (categories.jsonl); replace it with --overwrite "
                        "or choose another --output")
    questions = read_questions(cfg.data, cfg.answer_field)
    pool = read_questions([cfg.exemplars], cfg.answer_field, "--exemplars") if cfg.exemplars else None
    sets = exemplar_sets(questions, pool, cfg.variants, cfg.shots, cfg.seed)
    scorer = load_reward_function(cfg.reward) if cfg.reward else None
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    fmt = resolve_format(cfg.format, tok)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, device)
    answer = Answerer(model, tok, cfg)
    t0 = time.perf_counter()
    prompts = render_all(tok, fmt, questions, sets)
    V, S = cfg.variants, cfg.samples

    greedy = answer([p for variants in prompts for p in variants], 0.0, "greedy")
    greedy_ok = correctness(cfg, scorer, [q for q in questions for _ in range(V)], greedy)
    k = [sum(greedy_ok[i * V:(i + 1) * V]) for i in range(len(questions))]

    # Only questions never answered right greedily need samples: sampling cannot change the others' category.
    never = [i for i in range(len(questions)) if k[i] == 0]
    torch.manual_seed(cfg.seed)
    sampled = answer([p for i in never for p in prompts[i] for _ in range(S)], cfg.temperature, "sample")
    sampled_ok = correctness(cfg, scorer, [questions[i] for i in never for _ in range(V * S)], sampled)
    m: dict[int, int] = {i: sum(sampled_ok[j * V * S:(j + 1) * V * S]) for j, i in enumerate(never)}
    seconds = time.perf_counter() - t0

    rows = []
    for i, q in enumerate(questions):
        rec = {key: v for key, v in q.record.items() if key not in ADDED_FIELDS}
        rows.append({**rec, "category": category(k[i], V, m.get(i)), "greedy_correct": k[i],
                     "sampled_correct": m.get(i), "p_correct_greedy": k[i] / V,
                     "p_correct_sampled": m[i] / (V * S) if i in m else None,
                     "greedy_answers": greedy[i * V:(i + 1) * V]})
    assert len(rows) == len(questions)  # every input record is in categories.jsonl
    summary = {**tally(rows),
               "by_group": {f: {value: tally([r for r in rows if group_key(r, f) == value])
                                for value in sorted({group_key(r, f) for r in rows})} for f in cfg.group_by},
               "format": fmt, "variants": V, "shots": cfg.shots, "samples": S, "temperature": cfg.temperature,
               "match": f"reward > {cfg.reward_threshold} ({cfg.reward})" if cfg.reward else cfg.match,
               "sampled_questions": len(never), "sampling_skipped": len(questions) - len(never),
               "answers_cut": answer.cut, "seconds": seconds}
    write_outputs(cfg, out, rows, summary)
    shares = ", ".join(f"{c} {summary['categories'][c]} ({summary['shares'][c]:.0%})" for c in CATEGORIES)
    print(f"probe-knowledge: {len(rows)} questions -> {out / 'categories.jsonl'}: {shares}; sampled "
          f"{len(never)}, skipped sampling for {len(questions) - len(never)} ({seconds:.1f} s)")
    if answer.cut:
        print(f"note: {answer.cut} answers reached --max-new-tokens {cfg.max_new_tokens} before their line ended "
              "(they may be cut short and scored wrong); raise --max-new-tokens", file=sys.stderr)
    return summary
