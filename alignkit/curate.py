"""`alignkit curate`: choose what SFT is fed (the notes: a few good examples beat many — LIMA, 1,000 examples;
the longest 1,000 of Alpaca beat all 52k, Zhao et al. 2024; IFD-selected data beat the full set, Li et al. 2024).

Steps, each optional, in this order; a record removed by one is not seen by the later ones, and every removed
record is written to removed.jsonl with its reason:

    exact_duplicate     the same instruction and response (case and whitespace folded); the first is kept
    near_duplicate      MinHash LSH (datasketch) over word shingles: estimated Jaccard >= --near-dup-threshold
                        with an earlier kept record (Broder 1997)
    filters             empty_response, truncated_response (no sentence-final punctuation), min/max_response_words,
                        non_text_ratio, and Gopher's repetition and quality rules (Rae et al. 2021) through
                        datatrove (reasons "gopher:<its reason>")
    contaminated        shares a word n-gram (--decontam-ngram) with a record of a --decontaminate eval file
                        (GPT-3's decontamination, Brown et al. 2020, used 13-grams)
    category            its --category-field (probe-knowledge's SliCK category) is not one of --keep-category
    not_selected:<how>  left out by --select: the --k with the longest responses (Zhao et al. 2024), random, the
                        highest IFD below 1 (Li et al. 2024), the highest reward, or a diverse set (k-center greedy
                        on mean-pooled hidden states, Sener & Savarese 2018)

IFD (instruction-following difficulty, Li et al. 2024) = PPL(response | instruction) / PPL(response): how little
the instruction helps the model predict the response; at >= 1 the instruction does not help at all, and the paper
leaves those records out (reason ifd_above_1 when --select ifd).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from alignkit.config import Repeatable
from alignkit.errors import DataError, UserError

SENTENCE_END = re.compile(r"[.!?)\]\"'`*]\s*$|```\s*$")
NON_TEXT = re.compile(r"[^\w\s.,;:!?'\"()\[\]\-/%&+=*#@$`]")


@dataclass
class CurateConfig:
    """Deduplicate, filter, decontaminate and select SFT records; every removal counted and written with its reason."""

    OPTIONAL_MODEL: ClassVar[bool] = True  # --model only for the model-based scores

    data: Annotated[tuple[str, ...], Repeatable] = ()
    """SFT data files (messages, prompt/completion, alpaca, sharegpt or text records; repeatable)."""
    output: str = "runs/curated"
    """Output directory: kept.jsonl, removed.jsonl, scores.jsonl, summary.json/.md, lengths.png, scores.png, config.yaml."""
    overwrite: bool = False
    """Replace an earlier curate output in --output."""
    exact_dedup: bool = True
    """Remove exact duplicates (instruction and response, case and whitespace folded)."""
    near_dup_threshold: float = 0.8
    """Estimated Jaccard similarity of word shingles at which a record is a near duplicate of an earlier one (0 = off)."""
    shingle_size: int = 3
    """Words per shingle for near-duplicate detection."""
    num_perm: int = 128
    """MinHash permutations (more = a more exact Jaccard estimate, slower)."""
    filters: bool = True
    """Run the heuristic quality filters on the response (each also has its own flag)."""
    min_response_words: int = 1
    """Fewer words in the response is removed (min_response_words; 0 = off)."""
    max_response_words: int = 0
    """More words in the response is removed (max_response_words; 0 = off)."""
    require_final_punctuation: bool = True
    """A response that does not end like a sentence (., !, ?, a closing bracket or quote, a code fence) is truncated_response."""
    max_non_text_ratio: float = 0.3
    """Share of a response's characters that are not letters, digits, whitespace or common punctuation above which it is removed (1 = off)."""
    gopher: bool = True
    """Gopher's repetition rules (duplicate lines / paragraphs, top and duplicated n-gram fractions) and its
    symbol, ellipsis and non-alphabetic-word rules, through datatrove, with its thresholds."""
    decontaminate: Annotated[tuple[str, ...], Repeatable] = ()
    """Evaluation files (any prompt or SFT format): training records sharing a word n-gram with one are removed."""
    decontam_ngram: int = 8
    """Words per n-gram for decontamination."""
    keep_category: Annotated[tuple[str, ...], Repeatable] = ()
    """Keep only records whose --category-field is one of these (e.g. MaybeKnown from `alignkit probe-knowledge`)."""
    category_field: str = "category"
    """The record field --keep-category reads."""
    model: str = ""
    """Causal LM for the model-based scores: ppl (response given instruction), IFD and the hidden states of --select diverse."""
    reward_model: str = ""
    """Reward model (from `alignkit reward`) for the reward score."""
    reward: Annotated[tuple[str, ...], Repeatable] = ()
    """Reward function(s) MODULE:FUNCTION for the reward score (alignkit.rewards' signature)."""
    reward_weights: tuple[float, ...] = ()
    """Weights of the reward model and functions in the reward score (default: all 1)."""
    reward_timeout: float = 600.0
    """Seconds a reward function may take per call."""
    select: Literal["none", "longest", "random", "ifd", "reward", "diverse"] = "none"
    """Keep --k of the records left by the steps before: the longest responses, random, the highest IFD
    (below 1), the highest reward, or a diverse set (k-center greedy on the model's mean-pooled hidden states)."""
    k: int = 0
    """Records to keep with --select."""
    batch_size: int = 16
    """Records per model forward."""
    max_length: int = 1024
    """Tokens of a record the model scores (longer records are scored on their first --max-length tokens; counted)."""
    seed: int = 0
    """Seed of --select random."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Model weights' dtype for the scores."""
    progress: bool = True
    """Progress bars on a terminal."""
    trust_remote_code: bool = False
    """Allow model code shipped inside a model directory to run."""


@dataclass
class Record:
    """One input record: where it is, the record verbatim, its prompt (messages or str), instruction and response text."""

    source: str
    record: dict
    prompt: Any
    instruction: str
    response: str
    conversational: bool
    scores: dict = field(default_factory=dict)
    reason: str | None = None
    detail: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def as_record(rec: dict, source: str) -> Record:
    """A record's prompt and response; raises ValueError for a record SFT cannot train on."""
    from alignkit.data.formats import check_messages, detect_format, prompt_and_completions, to_conversation

    fmt = detect_format(rec)
    if fmt in ("messages", "sharegpt", "alpaca"):
        # An empty answer is a record to remove (empty_response), not a malformed one.
        conv = (check_messages(rec["messages"], "messages", nonempty_assistant=False) if fmt == "messages"
                else to_conversation(rec, fmt))
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("the conversation has no assistant turn")
        prompt = conv[:last]
        return Record(source, rec, prompt, "\n".join(m["content"] for m in prompt), conv[last]["content"], True)
    if fmt == "prompt_completion":
        prompt, (completion,), chat = prompt_and_completions(rec, fmt, ("completion",))
        if chat:
            return Record(source, rec, prompt, "\n".join(m["content"] for m in prompt),
                          "\n".join(m["content"] for m in completion), True)
        return Record(source, rec, prompt, prompt, completion, False)
    if fmt == "text":
        if not isinstance(rec["text"], str):
            raise ValueError("field 'text' must be a string")
        return Record(source, rec, "", "", rec["text"], False)
    raise ValueError(f"a {fmt} record is not SFT data (curate takes messages, prompt/completion, alpaca, sharegpt "
                     "or text records)")


def eval_record(rec: dict, source: str) -> Record:
    """An eval record of any prompt or SFT format (a prompt-only record has no response)."""
    try:
        return as_record(rec, source)
    except ValueError:
        prompt = rec.get("prompt") if isinstance(rec, dict) else None
        if prompt is None:
            raise ValueError("an eval record needs a prompt or a conversation") from None
        text = prompt if isinstance(prompt, str) else "\n".join(m.get("content", "") for m in prompt)
        answer = rec.get("answer", rec.get("completion", ""))
        return Record(source, rec, prompt, text, answer if isinstance(answer, str) else "", False)


def read(paths, flag: str = "--data", parse=as_record) -> list[Record]:
    from alignkit.data import read_records

    out = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
        for line, rec in read_records(path):
            try:
                out.append(parse(rec, f"{path}:{line}"))
            except ValueError as e:
                raise DataError(path, line, str(e)) from None
    return out


# ----------------------------------------------------------------------------------------------
# Steps (each takes the records still kept and marks the ones it removes)
# ----------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def remove(r: Record, reason: str, **detail) -> None:
    r.reason, r.detail = reason, detail


def exact_duplicates(records: list[Record]) -> None:
    first: dict[str, Record] = {}
    for r in records:
        key = " ".join(r.instruction.lower().split()) + "\0" + " ".join(r.response.lower().split())
        if key in first:
            remove(r, "exact_duplicate", duplicate_of=first[key].source)
        else:
            first[key] = r


def near_duplicates(records: list[Record], threshold: float, shingle: int, num_perm: int) -> None:
    """MinHash LSH (datasketch): each record is queried against the records kept before it."""
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        raise UserError("near-duplicate removal needs datasketch (pip install 'alignkit[curate]'), or give "
                        "--near-dup-threshold 0") from None
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes: dict[str, Any] = {}
    for i, r in enumerate(records):
        tokens = words(r.instruction + " " + r.response)
        grams = {" ".join(tokens[j:j + shingle]) for j in range(max(1, len(tokens) - shingle + 1))}
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([g.encode() for g in grams])
        match = [key for key in lsh.query(m) if hashes[key].jaccard(m) >= threshold]
        if match:
            best = max(match, key=lambda key: hashes[key].jaccard(m))
            remove(r, "near_duplicate", duplicate_of=records[int(best)].source,
                   jaccard=round(hashes[best].jaccard(m), 4))
            continue
        lsh.insert(str(i), m)
        hashes[str(i)] = m


def regex_word_tokenizer():
    """datatrove's word tokenizer interface on a regex: its English tokenizer needs NLTK or spaCy data that
    is not installed (and nothing is downloaded at run time)."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWords(WordTokenizer):
        def __init__(self):
            super().__init__("en")

        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+|[^\w\s]", text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"[^.!?]+[.!?]?", text)]

    return RegexWords()


def gopher_filters():
    """datatrove's Gopher rules that suit short responses: duplicate lines, paragraphs and n-grams; hashes and
    ellipses per word; bullet and ellipsis lines. Its top-n-gram rule counts an n-gram seen once (every short
    sentence fails it), and its document-length, word-length, alphabetic-word and stop-word rules are for web
    pages, so they are off."""
    try:
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    except ImportError:
        raise UserError("the Gopher rules need datatrove (pip install 'alignkit[curate]'), or give --no-gopher") from None
    tok = regex_word_tokenizer()
    return [GopherRepetitionFilter(top_n_grams=(), language=tok),
            GopherQualityFilter(min_doc_words=None, max_doc_words=None, min_avg_word_length=None,
                                max_avg_word_length=None, max_non_alpha_words_ratio=None, min_stop_words=None,
                                language=tok)]


def quality(records: list[Record], cfg: CurateConfig) -> None:
    gopher = gopher_filters() if cfg.gopher else []
    if gopher:
        from datatrove.data import Document
    for r in records:
        text = r.response.strip()
        n = len(words(text))
        if not text:
            remove(r, "empty_response")
        elif cfg.min_response_words and n < cfg.min_response_words:
            remove(r, "min_response_words", words=n)
        elif cfg.max_response_words and n > cfg.max_response_words:
            remove(r, "max_response_words", words=n)
        elif cfg.require_final_punctuation and not SENTENCE_END.search(text):
            remove(r, "truncated_response", end=text[-20:])
        elif len(NON_TEXT.findall(text)) / len(text) > cfg.max_non_text_ratio:
            remove(r, "non_text_ratio", ratio=round(len(NON_TEXT.findall(text)) / len(text), 4))
        else:
            for f in gopher:
                verdict = f.filter(Document(text=text, id=r.source))
                if verdict is not True and not (isinstance(verdict, tuple) and verdict[0]):
                    remove(r, f"gopher:{verdict[1] if isinstance(verdict, tuple) else f.name}")
                    break


def ngrams(text: str, n: int) -> set[str]:
    tokens = words(text)
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def decontaminate(records: list[Record], evals: list[Record], n: int) -> None:
    index: dict[str, str] = {}
    for e in evals:
        for g in ngrams(e.instruction + " " + e.response, n):
            index.setdefault(g, e.source)
    for r in records:
        hit = next((g for g in ngrams(r.instruction + " " + r.response, n) if g in index), None)
        if hit is not None:
            remove(r, "contaminated", eval_record=index[hit], ngram=hit)


def categories(records: list[Record], keep: tuple[str, ...], name: str) -> None:
    seen = set()
    for r in records:
        if name not in r.record:
            path, line = r.source.rsplit(":", 1)
            raise DataError(path, int(line), f"no {name!r} field for --keep-category (write it with "
                                             "`alignkit probe-knowledge`, or name the field with --category-field)")
        seen.add(r.record[name])
        if r.record[name] not in keep:
            remove(r, "category", category=r.record[name])
    missing = [c for c in keep if c not in seen]
    if missing:
        raise UserError(f"--keep-category {' '.join(missing)}: no record has that {name!r} (found: "
                        f"{', '.join(sorted(map(str, seen))) or 'none'})")


# ----------------------------------------------------------------------------------------------
# Model-based scores
# ----------------------------------------------------------------------------------------------


def _examples(tok, r: Record, max_length: int):
    """(ids, loss mask) of the response after the instruction, and of the same response tokens alone (after the
    tokenizer's BOS, else EOS, token): IFD compares the perplexities of the same tokens (Li et al. 2024)."""
    from alignkit.data import render_prompt_completion

    if r.conversational:
        ex = render_prompt_completion(tok, r.prompt or [{"role": "user", "content": ""}],
                                      [{"role": "assistant", "content": r.response}])
        ids, mask = list(ex.input_ids), list(ex.loss_mask)
    elif r.prompt:
        ex = render_prompt_completion(tok, r.prompt, r.response)
        ids, mask = list(ex.input_ids), list(ex.loss_mask)
    else:
        ids = tok(r.response, add_special_tokens=False)["input_ids"]
        mask = [1] * len(ids)
    response = [t for t, m in zip(ids, mask) if m]
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:  # nothing to condition on: the first response token goes unscored
        alone, alone_mask = response, [0] + [1] * (len(response) - 1)
    else:
        alone, alone_mask = [start] + response, [0] + [1] * len(response)
    if not r.conversational and not r.prompt:  # no instruction: conditioned on the start token as well
        ids, mask = alone, alone_mask
    return ids[:max_length], mask[:max_length], alone[:max_length], alone_mask[:max_length]


def _mean_nll(model, seqs, masks, pad_id, device):
    import torch

    from alignkit.logprobs import next_token_logps
    from alignkit.train.batching import collate

    batch = collate(seqs, masks, pad_id, device)
    logps, mask = next_token_logps(model, **batch)
    return ((-logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist(), mask.sum(-1).tolist()


def model_scores(records: list[Record], cfg: CurateConfig, need_hidden: bool) -> int:
    """ppl, ifd (and the mean-pooled last hidden state, for --select diverse) of every kept record; returns how
    many records were longer than --max-length (scored on their first tokens)."""
    import torch

    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.train.dist import pick_device
    from alignkit.train.tracking import progress_iter

    device = pick_device(cfg.device)
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, device).eval()
    cut = 0
    with torch.no_grad():
        for s in progress_iter(range(0, len(records), cfg.batch_size), cfg.progress, "curate: scoring"):
            chunk = records[s:s + cfg.batch_size]
            parts = [_examples(tok, r, cfg.max_length) for r in chunk]
            cut += sum(len(p[0]) == cfg.max_length for p in parts)
            cond, n_tokens = _mean_nll(model, [p[0] for p in parts], [p[1] for p in parts], tok.pad_token_id, device)
            alone, _ = _mean_nll(model, [p[2] for p in parts], [p[3] for p in parts], tok.pad_token_id, device)
            for r, c, a, n in zip(chunk, cond, alone, n_tokens):
                r.scores.update(ppl=math.exp(c), ifd=math.exp(c) / math.exp(a), response_tokens=int(n))
            if need_hidden:
                from alignkit.train.batching import collate

                batch = collate([p[0] for p in parts], [[1] * len(p[0]) for p in parts], tok.pad_token_id, device)
                mask = batch["loss_mask"].unsqueeze(-1).to(torch.float32)
                hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True, use_cache=False).hidden_states[-1].float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                for r, h in zip(chunk, torch.nn.functional.normalize(pooled, dim=-1)):
                    r.scores["_embedding"] = h
    return cut


def reward_scores(records: list[Record], cfg: CurateConfig) -> None:
    from alignkit.judge import load_judge
    from alignkit.train.tracking import progress_iter

    judge = load_judge(cfg)
    for s in progress_iter(range(0, len(records), cfg.batch_size), cfg.progress, "curate: rewards"):
        chunk = records[s:s + cfg.batch_size]
        scores = judge.scores([r.prompt for r in chunk], [r.response for r in chunk])
        for r, v in zip(chunk, scores.tolist()):
            r.scores["reward"] = float(v)


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def k_center_greedy(points, k: int) -> list[int]:
    """Sener & Savarese 2018's greedy k-center: start from the point nearest the mean, then repeatedly add the
    point farthest from every point chosen so far. `points`: (N, D) tensor. Returns indices in order chosen."""
    import torch

    first = int(torch.cdist(points.mean(0, keepdim=True), points)[0].argmin())
    chosen = [first]
    nearest = torch.cdist(points[first:first + 1], points)[0]  # (N,) distance to the chosen set
    while len(chosen) < min(k, len(points)):
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, torch.cdist(points[nxt:nxt + 1], points)[0])
    return chosen


def select(records: list[Record], how: str, k: int, seed: int) -> None:
    """Mark all but the chosen `k` of `records` not_selected:<how>."""
    import torch

    pool = records
    if how == "ifd":
        for r in records:
            if r.scores["ifd"] >= 1:
                remove(r, "ifd_above_1", ifd=r.scores["ifd"])
        pool = [r for r in records if r.reason is None]
        order = sorted(range(len(pool)), key=lambda i: -pool[i].scores["ifd"])
    elif how == "longest":
        key = "response_tokens" if all("response_tokens" in r.scores for r in pool) else None
        order = sorted(range(len(pool)), key=lambda i: -(pool[i].scores[key] if key else len(words(pool[i].response))))
    elif how == "reward":
        order = sorted(range(len(pool)), key=lambda i: -pool[i].scores["reward"])
    elif how == "random":
        order = random.Random(seed).sample(range(len(pool)), len(pool))
    else:  # diverse
        order = k_center_greedy(torch.stack([r.scores["_embedding"] for r in pool]), k) if pool else []
    chosen = set(order[:k])
    for i, r in enumerate(pool):
        if i not in chosen:
            remove(r, f"not_selected:{how}")


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def plots(out: Path, records: list[Record]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, rs in (("kept", [r for r in records if r.reason is None]), ("removed", [r for r in records if r.reason])):
        if rs:
            ax.hist([len(words(r.response)) for r in rs], bins=30, alpha=0.6, label=f"{label} ({len(rs)})")
    ax.set(xlabel="response words", ylabel="records", title="curate: response lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=90)
    plt.close(fig)
    names = [n for n in ("ppl", "ifd", "reward") if any(n in r.scores for r in records)]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
        for ax, n in zip(axes[0], names):
            values = [r.scores[n] for r in records if n in r.scores and math.isfinite(r.scores[n])]
            ax.hist(values, bins=30)
            ax.set(xlabel=n, ylabel="records", title=n)
        fig.tight_layout()
        fig.savefig(out / "scores.png", dpi=90)
        plt.close(fig)


def summary_markdown(summary: dict) -> str:
    lines = ["# alignkit curate", "", f"{summary['input']} records in, {summary['kept']} kept.", "",
             "| step | removed |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in summary["removed"].items()]
    return "\n".join(lines + [""])


def write_outputs(cfg: CurateConfig, records: list[Record], summary: dict) -> Path:
    import yaml

    from alignkit.config import to_dict

    out = Path(cfg.output)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "kept.jsonl", "w") as f:
        f.writelines(json.dumps(r.record) + "\n" for r in records if r.reason is None)
    with open(tmp / "removed.jsonl", "w") as f:
        f.writelines(json.dumps({"source": r.source, "reason": r.reason, "detail": r.detail, "record": r.record}) + "\n"
                     for r in records if r.reason is not None)
    with open(tmp / "scores.jsonl", "w") as f:
        for r in records:
            row = {"source": r.source, "kept": r.reason is None, "reason": r.reason,
                   "response_words": len(words(r.response))}
            row.update({n: r.scores.get(n) for n in ("response_tokens", "ppl", "ifd", "reward")})
            f.write(json.dumps(row) + "\n")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    (tmp / "summary.md").write_text(summary_markdown(summary))
    (tmp / "config.yaml").write_text("# alignkit curate\n" + yaml.safe_dump(
        {k: v for k, v in to_dict(cfg).items() if k not in ("config", "overwrite")}, sort_keys=False))
    plots(tmp, records)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def check_flags(cfg: CurateConfig) -> None:
    if not cfg.data:
        raise UserError("alignkit curate needs --data FILE")
    if not 0 <= cfg.near_dup_threshold <= 1:
        raise UserError(f"--near-dup-threshold must be in [0, 1], got {cfg.near_dup_threshold}")
    for flag, v in (("--shingle-size", cfg.shingle_size), ("--num-perm", cfg.num_perm),
                    ("--decontam-ngram", cfg.decontam_ngram), ("--batch-size", cfg.batch_size)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if cfg.select != "none" and cfg.k < 1:
        raise UserError(f"--select {cfg.select} needs --k N >= 1, got --k {cfg.k}")
    if cfg.select == "none" and cfg.k:
        raise UserError(f"--k {cfg.k} needs --select longest|random|ifd|reward|diverse")
    if cfg.select in ("ifd", "diverse") and not cfg.model:
        raise UserError(f"--select {cfg.select} needs --model DIR (a causal LM to score the records)")
    if cfg.select == "reward" and not (cfg.reward_model or cfg.reward):
        raise UserError("--select reward needs --reward-model DIR or --reward MODULE:FUNCTION")
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"--output {cfg.output} is not empty; replace it with --overwrite or choose another --output")


def main(cfg: CurateConfig) -> dict:
    check_flags(cfg)
    t0 = time.perf_counter()
    records = read(cfg.data)
    evals = read(cfg.decontaminate, "--decontaminate", eval_record) if cfg.decontaminate else []
    steps: list[dict] = []

    def step(name: str, fn, *args) -> None:
        left = [r for r in records if r.reason is None]
        fn(left, *args)
        steps.append({"step": name, "in": len(left), "removed": sum(r.reason is not None for r in left)})

    if cfg.exact_dedup:
        step("exact_dedup", exact_duplicates)
    if cfg.near_dup_threshold > 0:
        step("near_dedup", near_duplicates, cfg.near_dup_threshold, cfg.shingle_size, cfg.num_perm)
    if cfg.filters:
        step("filters", quality, cfg)
    if evals:
        step("decontaminate", decontaminate, evals, cfg.decontam_ngram)
    if cfg.keep_category:
        step("category", categories, cfg.keep_category, cfg.category_field)
    left = [r for r in records if r.reason is None]
    cut = model_scores(left, cfg, cfg.select == "diverse") if cfg.model else 0
    if cfg.reward_model or cfg.reward:
        reward_scores(left, cfg)
    if cfg.select != "none":
        step(f"select_{cfg.select}", select, cfg.select, cfg.k, cfg.seed)
    removed: dict[str, int] = {}
    for r in records:
        if r.reason is not None:
            removed[r.reason] = removed.get(r.reason, 0) + 1
    kept = sum(r.reason is None for r in records)
    assert kept + sum(removed.values()) == len(records)
    per_file: dict[str, int] = {}
    for r in records:
        per_file[r.source.rsplit(":", 1)[0]] = per_file.get(r.source.rsplit(":", 1)[0], 0) + 1
    summary = {"input": len(records), "files": per_file, "kept": kept, "removed": removed, "steps": steps,
               "selection": {"select": cfg.select, "k": cfg.k}, "scored_longer_than_max_length": cut,
               "seconds": time.perf_counter() - t0}
    out = write_outputs(cfg, records, summary)
    shown = ", ".join(f"{k} {v}" for k, v in removed.items()) or "nothing"
    print(f"curate: {kept} of {len(records)} records kept -> {out}/kept.jsonl (removed: {shown})")
    return summary
