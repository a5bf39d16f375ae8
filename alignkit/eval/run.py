"""`alignkit eval`: judge one or more models against a baseline on a prompt set, with intervals.

Each --model (or a file of its --completions) answers every prompt of --data; the judge (an LLM, a reward model
or reward functions, as in `alignkit judge`) gives P(model's answer better than the baseline's) per prompt; the
report has per model the win rate (ties half) with its bootstrap 95% interval, the length-controlled win rate
(AlpacaEval 2), lengths, distinct-n, self-BLEU, the garbled and repeated-4-gram rates, how often answers ended,
and with --base the token distribution shift of the model's answers under the base model (Lin et al. 2023).
The metrics are `alignkit.eval.metrics`; this module reads, generates, judges and writes.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from alignkit.config import Repeatable
from alignkit.decoding import DecodingOptions
from alignkit.engines import EngineOptions
from alignkit.errors import DataError, UserError, writing
from alignkit.eval import metrics as M
from alignkit.judge import JudgeOptions


@dataclass
class EvalConfig(EngineOptions, JudgeOptions, DecodingOptions):
    """Judge models against a baseline on a prompt set: win rate with a bootstrap interval, length-controlled
    win rate, length, diversity, degenerate answers and token shift; results.json, report.md/html, plots."""

    OPTIONAL_MODEL: ClassVar[bool] = True  # --completions can stand in for every --model

    model: Annotated[tuple[str, ...], Repeatable] = ()
    """A model directory to evaluate, or NAME=DIR to name it in the report (repeatable; default name: the
    directory's name)."""
    completions: Annotated[tuple[str, ...], Repeatable] = ()
    """A JSONL of {"prompt", "completion"} answers to evaluate instead of generating, in --data's order (an
    optional "ended": false marks an answer cut by the token limit), or NAME=FILE (repeatable; default name:
    the file's stem)."""
    baseline: str | None = None
    """Model directory whose answers every model is judged against."""
    baseline_completions: str | None = None
    """A JSONL of the baseline's answers instead of --baseline (same layout as --completions)."""
    baseline_decoding: bool = False
    """Generate the baseline with the decoding options too (default: greedy, no logit rules, no stop strings,
    no in-context prefix, so that the options change only the evaluated models)."""
    base: str | None = None
    """Base model directory for the token distribution shift of each model's answers (Lin et al. 2023): the
    share of answer tokens it ranks below its top 3, overall, at the answer's end and by position."""
    data: str = ""
    """Prompt JSONL: "prompt" a string or messages; its other fields (e.g. "meta", "answer") go to the judge's
    reward functions as columns."""
    max_prompts: int = -1
    """Evaluate only the first N prompts (-1 = all)."""
    max_new_tokens: int = 128
    """Tokens to generate at most per answer (an answer that reaches it has not ended)."""
    batch_size: int = 32
    """Prompts per generate call."""
    seed: int = 0
    """RNG seed of sampling (reset before each model generates) and of the bootstrap resamples."""
    bootstrap: int = M.N_BOOTSTRAP
    """Bootstrap resamples of the prompts for each interval."""
    length_unit: Literal["words", "characters"] = "words"
    """Unit of answer lengths (mean length, length control): words (whitespace-separated), the same whatever
    model or tokenizer wrote the answer, as the judge command's length statistics; or characters."""
    self_bleu_max: int = 1000
    """Self-BLEU over at most this many answers per model (a seeded random sample beyond it)."""
    position_bins: int = 10
    """Bins of relative answer position in the token-shift profile."""
    output: str = "runs/eval"
    """Output directory: results.json, report.md, report.html, plots/*.png, rows/NAME.jsonl, config.yaml."""
    overwrite: bool = False
    """Replace an earlier eval output in --output (otherwise a non-empty --output is refused)."""
    config: str | None = None
    """YAML file of defaults for these fields; command-line flags override it."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the generating models, the base model and an LLM judge."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""
    progress: bool = True
    """Show progress: a bar on a terminal, else a plain line every few steps or 30 s."""


@dataclass
class Answers:
    """One answerer's answers to the prompts, in order."""

    name: str
    source: str  # the model directory or completions file
    generated: bool
    texts: list[str]
    ended: list[bool]
    prompt_ids: list[list[int]] | None = None  # what the model was given, when it generated
    ids: list[list[int]] | None = None  # its answer tokens, when it generated
    vocab: dict | None = None  # its tokenizer's vocabulary, when it generated


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def named(spec: str, kind: str) -> tuple[str, str]:
    """NAME=PATH -> (NAME, PATH); PATH -> (its directory name or file stem, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and name and path and not Path(spec).exists():
        return name, path
    p = Path(spec)
    return (p.name if kind == "model" else p.stem), spec


def read_prompts(path: str, max_prompts: int) -> tuple[list[dict], list[str]]:
    """The prompt records of --data (a "prompt" string or message list each) and their file:line."""
    from alignkit.data import read_records

    records, where = [], []
    for line, rec in read_records(path):
        if 0 <= max_prompts <= len(records):
            break
        prompt = rec.get("prompt") if isinstance(rec, dict) else None
        ok = isinstance(prompt, str) and prompt.strip() or (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        for m in prompt))
        if not ok:
            raise DataError(path, line, 'a prompt record needs "prompt": a non-empty string or a list of messages')
        records.append(rec)
        where.append(f"{path}:{line}")
    if not records:
        raise UserError(f"--data {path}: no prompts")
    return records, where


def read_completions(path: str, flag: str, records: list[dict], where: list[str]) -> tuple[list[str], list[bool]]:
    """(texts, ended) of a completions file whose records answer --data's prompts in order (checked)."""
    from alignkit.data import read_records
    from alignkit.rewards import completion_text

    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file")
    texts, ended = [], []
    for (line, rec), want, at in zip(read_records(path), records, where):
        if not isinstance(rec, dict) or "completion" not in rec or not isinstance(rec["completion"], (str, list)):
            raise DataError(path, line, 'a completion record needs "prompt" and "completion" (a string or messages)')
        if rec.get("prompt") != want["prompt"]:
            raise DataError(path, line, f"its prompt differs from --data's prompt {len(texts) + 1} ({at}); the "
                                        "completions must answer --data's prompts in order")
        texts.append(completion_text(rec["completion"]).strip())
        ended.append(bool(rec.get("ended", True)))
    if len(texts) < len(records):
        raise DataError(path, len(texts), f"{len(texts)} completions for {len(records)} prompts of --data")
    return texts, ended


def check_flags(cfg: EvalConfig) -> Path:
    if not cfg.data:
        raise UserError("alignkit eval needs --data FILE (the prompts)")
    if not cfg.model and not cfg.completions:
        raise UserError("alignkit eval needs --model DIR or --completions FILE (what to evaluate)")
    if bool(cfg.baseline) == bool(cfg.baseline_completions):
        raise UserError("give the baseline as --baseline DIR or --baseline-completions FILE (one of them)")
    for flag, v, least in (("--bootstrap", cfg.bootstrap, 1), ("--self-bleu-max", cfg.self_bleu_max, 2),
                           ("--position-bins", cfg.position_bins, 1)):
        if v < least:
            raise UserError(f"{flag} must be >= {least}, got {v}")
    for flag, path in ([("--model", p) for _, p in (named(s, "model") for s in cfg.model)]
                       + [("--baseline", cfg.baseline), ("--base", cfg.base), ("--judge-model", cfg.judge_model),
                          ("--reward-model", cfg.reward_model)]):
        if path and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: no such model directory")
    if not Path(cfg.data).is_file():
        raise UserError(f"--data {cfg.data}: no such file")
    out = Path(cfg.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise UserError(f"--output {cfg.output} is not empty; replace it with --overwrite or choose another --output")
    return out


# ----------------------------------------------------------------------------------------------
# Generating
# ----------------------------------------------------------------------------------------------


def device_of(cfg: EvalConfig) -> str:
    import torch

    return cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def generate_answers(cfg: EvalConfig, name: str, model_dir: str, records: list[dict], rules_on: bool) -> Answers:
    """Answers of a model directory: each prompt (after the in-context prefix when `rules_on`) generated with
    the decoding options (or greedily and plainly when not `rules_on`)."""
    from alignkit.decoding import context_prompt, decode_completion, decoding_rules
    from alignkit.engines import build_engine
    from alignkit.models import load_causal_lm, load_tokenizer, stop_token_ids

    opts = cfg if rules_on else DecodingOptions()
    tok = load_tokenizer(model_dir, cfg.trust_remote_code)
    model = load_causal_lm(model_dir, cfg.dtype, cfg.trust_remote_code, device_of(cfg))
    rules = decoding_rules(opts, tok, model)
    prompts = [context_prompt(tok, r["prompt"], opts) for r in records]
    engine = build_engine(cfg, model, tok, model_dir, max_model_len=max(map(len, prompts)) + cfg.max_new_tokens,
                          seed=cfg.seed)
    t0 = time.perf_counter()
    ids = engine.generate(prompts, 1, cfg.max_new_tokens, opts.temperature, opts.top_p, rules, seed=cfg.seed,
                          batch_size=cfg.batch_size).completion_ids
    stops = stop_token_ids(tok, model)
    decoded = [decode_completion(tok, c, rules, stops) for c in ids]
    print(f"eval: {name} answered {len(ids)} prompts in {time.perf_counter() - t0:.1f}s", flush=True)
    del model, engine
    return Answers(name, model_dir, True, [t for t, _ in decoded], [e for _, e in decoded], prompts, ids,
                   tok.get_vocab())


# ----------------------------------------------------------------------------------------------
# Judging
# ----------------------------------------------------------------------------------------------


def judge_probs(judge, records: list[dict], answers: Answers, baseline: Answers, columns: dict,
                cache: dict) -> list[float]:
    """P(answers better than the baseline's) per prompt. A score judge scores each side with its own "ended"
    column (the baseline once, cached); an LLM judge is asked both orders (`LLMJudge.pairwise`)."""
    from alignkit.judge import bradley_terry_prob

    prompts = [r["prompt"] for r in records]
    if judge.kind == "score":
        if "baseline" not in cache:
            cache["baseline"] = judge.scores(prompts, baseline.texts, {**columns, "ended": list(baseline.ended)})
        mine = judge.scores(prompts, answers.texts, {**columns, "ended": list(answers.ended)})
        return bradley_terry_prob(mine, cache["baseline"]).tolist()
    return judge.pairwise(prompts, answers.texts, baseline.texts, columns).prob.tolist()


def prompt_columns(records: list[dict]) -> dict[str, list]:
    """The prompt records' other fields as reward-function columns (a field missing from a record is None)."""
    names = dict.fromkeys(k for r in records for k in r if k not in ("prompt", "prompts", "completions", "ended"))
    return {k: [r.get(k) for r in records] for k in names}


# ----------------------------------------------------------------------------------------------
# Token shift
# ----------------------------------------------------------------------------------------------


def token_shift(cfg: EvalConfig, all_answers: list[Answers], records: list[dict]) -> dict[str, dict]:
    """Per answerer, `shift_summary` of its answers under --base plus the by-position profile. A model that
    generated is ranked on its own tokens and context (its tokenizer must be --base's); a completions file's
    answers are rendered after the prompt by the base tokenizer (the end-of-turn token kept when it ended)."""
    from alignkit.data import render_prompt, render_prompt_completion
    from alignkit.eval.token_shift import answer_ranks, shift_by_position, shift_summary
    from alignkit.models import load_causal_lm, load_tokenizer, stop_token_ids

    tok = load_tokenizer(cfg.base, cfg.trust_remote_code)
    model = load_causal_lm(cfg.base, cfg.dtype, cfg.trust_remote_code, device_of(cfg))
    stops = set(stop_token_ids(tok, model))
    vocab = tok.get_vocab()
    out = {}
    for a in all_answers:
        if a.generated:
            if a.vocab != vocab:
                raise UserError(f"--base {cfg.base}: its tokenizer is not {a.name}'s ({a.source}); token shift ranks "
                                "the model's own tokens, so the base model must share its vocabulary")
            pairs = [(p, c) for p, c in zip(a.prompt_ids, a.ids) if c]
        else:
            pairs = []
            for r, text, ended in zip(records, a.texts, a.ended):
                if not text:
                    continue
                comp = text if isinstance(r["prompt"], str) else [{"role": "assistant", "content": text}]
                ex = render_prompt_completion(tok, r["prompt"], comp)
                ids = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
                while not ended and ids and ids[-1] in stops:
                    ids.pop()
                pairs.append((render_prompt(tok, r["prompt"]), ids))
        pairs = [(p, c) for p, c in pairs if c]
        if not pairs:
            out[a.name] = {"note": "no answer tokens"}
            continue
        ranks = answer_ranks(model, [p for p, _ in pairs], [c for _, c in pairs], tok.pad_token_id,
                             batch_size=cfg.batch_size)
        summary = shift_summary(ranks, [c for _, c in pairs], stops, tok.decode)
        out[a.name] = {**summary, "answers": len(pairs), "by_position": shift_by_position(ranks, cfg.position_bins)}
    del model
    return out


# ----------------------------------------------------------------------------------------------
# Metrics of one answerer
# ----------------------------------------------------------------------------------------------


def lengths(texts: list[str], unit: str) -> list[int]:
    return [len(M.words(t)) if unit == "words" else len(t) for t in texts]


def answer_stats(a: Answers, cfg: EvalConfig) -> dict:
    """Length, diversity and degenerate-answer figures of one answerer's texts."""
    ls = lengths(a.texts, cfg.length_unit)
    return {"mean_length": sum(ls) / len(ls), "distinct_1": M.distinct_n(a.texts, 1),
            "distinct_2": M.distinct_n(a.texts, 2),
            "self_bleu": M.self_bleu(a.texts, 4, cfg.self_bleu_max, cfg.seed),
            "self_bleu_texts": min(len(a.texts), cfg.self_bleu_max),
            "garbled_rate": sum(M.garbled(t, e) for t, e in zip(a.texts, a.ended)) / len(a.texts),
            "repetition_rate": M.repetition_rate(a.texts, 4),
            "ended_rate": sum(a.ended) / len(a.ended)}


def compare(a: Answers, baseline: Answers, probs: list[float], cfg: EvalConfig) -> tuple[dict, list[float]]:
    w = M.wins(probs)
    lm, lb = lengths(a.texts, cfg.length_unit), lengths(baseline.texts, cfg.length_unit)
    return {"win_rate": M.win_rate(w, cfg.bootstrap, cfg.seed),
            "lc_win_rate": M.length_controlled_win_rate(w, lm, lb, cfg.bootstrap, cfg.seed),
            "wins": sum(x == 1.0 for x in w), "ties": sum(x == 0.5 for x in w), "losses": sum(x == 0.0 for x in w),
            "mean_prob": sum(probs) / len(probs)}, w


def prompt_rows(records, a: Answers, baseline: Answers, probs, w, cfg: EvalConfig) -> list[dict]:
    lm, lb = lengths(a.texts, cfg.length_unit), lengths(baseline.texts, cfg.length_unit)
    return [{"prompt": r["prompt"], "completion": t, "baseline_completion": bt, "prob": p, "win": x,
             "length": m, "baseline_length": b, "ended": e, "baseline_ended": be, "garbled": M.garbled(t, e),
             "baseline_garbled": M.garbled(bt, be)}
            for r, t, bt, p, x, m, b, e, be in zip(records, a.texts, baseline.texts, probs, w, lm, lb, a.ended,
                                                   baseline.ended)]


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def _num(x) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def _ci(d: dict, key: str) -> str:
    lo, hi = d["ci95"]
    return f"{_num(d[key])} [{_num(lo)}, {_num(hi)}]"


def model_table(name: str, m: dict, base: dict, unit: str) -> list[list[str]]:
    """Rows (metric, model, baseline) of one model's table."""
    rows = [["win rate vs baseline (95% CI)", _ci(m["win_rate"], "win_rate"), ""],
            ["length-controlled win rate (95% CI)", _ci(m["lc_win_rate"], "lc_win_rate"), ""],
            ["wins / ties / losses", f"{m['wins']} / {m['ties']} / {m['losses']}", ""],
            [f"mean length ({unit})", _num(m["mean_length"]), _num(base["mean_length"])]]
    for key, label in (("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU-4"),
                       ("garbled_rate", "garbled rate"), ("repetition_rate", "repeated 4-gram rate"),
                       ("ended_rate", "ended rate")):
        rows.append([label, _num(m[key]), _num(base[key])])
    shift = m.get("token_shift")
    if shift and "shifted" in shift:
        rows += [["token shift: shifted (rank > 3)", _num(shift["shifted"]), ""],
                 ["token shift: shifted at the end-of-turn token", _num(shift["shifted_at_end"]), ""],
                 ["token shift: shifted elsewhere", _num(shift["shifted_elsewhere"]), ""]]
    return rows


def notes(results: dict) -> list[str]:
    out = [f"Judge: {results['judge']}; {results['prompts']} prompts from {results['data']}; "
           f"baseline {results['baseline']['name']} ({results['baseline']['source']}).",
           "Ties count half. Intervals: percentile bootstrap over prompts "
           f"({results['bootstrap']} resamples). The length-controlled win rate is AlpacaEval 2's logistic fit "
           "of the verdicts on tanh(length difference / its std), read at equal length, without the "
           "per-instruction difficulty term."]
    sampled = [n for n, m in results["models"].items() if m["self_bleu_texts"] < results["prompts"]]
    if sampled:
        out.append(f"Self-BLEU over a random sample of {results['self_bleu_max']} answers for: {', '.join(sampled)}.")
    return out


def report_markdown(results: dict) -> str:
    lines = ["# alignkit eval", ""] + [n + "  " for n in notes(results)] + [""]
    for name, m in results["models"].items():
        lines += [f"## {name}", "", f"{m['source']}", "", "| metric | model | baseline |", "|---|---|---|"]
        table = model_table(name, m, results["baseline"], results["length_unit"])
        lines += [f"| {a} | {b} | {c} |" for a, b, c in table]
        lines.append("")
    return "\n".join(lines)


def report_html(results: dict, plots: list[str]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>alignkit eval</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px}td+td{text-align:right}img{margin:4px}</style></head><body>",
             "<h1>alignkit eval</h1>"] + [f"<p>{html.escape(n)}</p>" for n in notes(results)]
    for name, m in results["models"].items():
        parts += [f"<h2>{html.escape(name)}</h2>", f"<p>{html.escape(m['source'])}</p>",
                  "<table><tr><th>metric</th><th>model</th><th>baseline</th></tr>"]
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                  for row in model_table(name, m, results["baseline"], results["length_unit"])]
        parts.append("</table>")
    parts += ["<h2>Plots</h2>"] + [f"<img src='plots/{html.escape(p)}' alt='{html.escape(p)}'>" for p in plots]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_plots(out: Path, results: dict, lengths_of: dict[str, list[int]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir()
    names = list(results["models"])
    made = []
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 2), 3.5))
    for k, (key, label) in enumerate((("win_rate", "win rate"), ("lc_win_rate", "LC win rate"))):
        xs = [i + (k - 0.5) * 0.35 for i in range(len(names))]
        vals = [results["models"][n][key][key] for n in names]
        err = [[v - results["models"][n][key]["ci95"][0] for n, v in zip(names, vals)],
               [results["models"][n][key]["ci95"][1] - v for n, v in zip(names, vals)]]
        ax.bar(xs, vals, 0.35, yerr=err, capsize=4, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xticks=range(len(names)), xticklabels=names, ylim=(0, 1), ylabel="vs baseline (95% CI)",
           title=f"win rate vs {results['baseline']['name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots" / "win_rate.png", dpi=90)
    plt.close(fig)
    made.append("win_rate.png")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, ls in lengths_of.items():
        ax.hist(ls, bins=30, alpha=0.5, label=label)
    ax.set(xlabel=f"answer length ({results['length_unit']})", ylabel="answers", title="answer lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots" / "lengths.png", dpi=90)
    plt.close(fig)
    made.append("lengths.png")
    shifted = {n: m["token_shift"]["by_position"] for n, m in results["models"].items()
               if "by_position" in m.get("token_shift", {})}
    if shifted:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for n, prof in shifted.items():
            edges = prof["edges"]
            ax.plot([(a + b) / 2 for a, b in zip(edges, edges[1:])], prof["shifted"], marker="o", label=n)
        ax.set(xlabel="relative position in the answer", ylabel="share shifted (base rank > 3)", ylim=(0, 1),
               title="token shift by position")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "plots" / "token_shift.png", dpi=90)
        plt.close(fig)
        made.append("token_shift.png")
    return made


def file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def write_outputs(cfg: EvalConfig, out: Path, results: dict, rows: dict[str, list[dict]],
                  lengths_of: dict[str, list[int]]) -> None:
    """Everything into a fresh directory beside --output, then swapped in: nothing half-written on error."""
    import yaml

    from alignkit.config import to_dict

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(out, "eval outputs"):
        tmp.mkdir(parents=True)
        (tmp / "rows").mkdir()
        for name, rs in rows.items():
            with open(tmp / "rows" / f"{file_name(name)}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rs)
        (tmp / "results.json").write_text(json.dumps(results, indent=1))
        (tmp / "report.md").write_text(report_markdown(results))
        plots = write_plots(tmp, results, lengths_of)
        (tmp / "report.html").write_text(report_html(results, plots))
        (tmp / "config.yaml").write_text("# alignkit eval\n" + yaml.safe_dump(
            {k: v for k, v in to_dict(cfg).items() if k not in ("config", "overwrite")}, sort_keys=False))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)


# ----------------------------------------------------------------------------------------------
# alignkit eval
# ----------------------------------------------------------------------------------------------


def main(cfg: EvalConfig) -> dict:
    from alignkit.decoding import check_sampling, rules_record
    from alignkit.judge import load_judge

    t0 = time.perf_counter()
    from alignkit.engines import check_engine

    out = check_flags(cfg)
    check_sampling(cfg)
    check_engine(cfg.rollout_engine)
    records, where = read_prompts(cfg.data, cfg.max_prompts)
    specs = [named(s, "model") + (True,) for s in cfg.model] + [named(s, "file") + (False,) for s in cfg.completions]
    names = [n for n, _, _ in specs]
    for n in names:
        if names.count(n) > 1 or n == "baseline":
            raise UserError(f"two evaluated answer sets would be named {n!r} in the report; name them NAME=PATH")
    # files first: a mismatched file is reported before any model has generated
    given = {n: read_completions(p, "--completions", records, where) for n, p, is_model in specs if not is_model}
    if cfg.baseline_completions:
        texts, ended = read_completions(cfg.baseline_completions, "--baseline-completions", records, where)
        baseline = Answers("baseline", cfg.baseline_completions, False, texts, ended)
    judge = load_judge(cfg)
    if cfg.baseline:
        baseline = generate_answers(cfg, "baseline", cfg.baseline, records, cfg.baseline_decoding)
    answers = [generate_answers(cfg, n, p, records, True) if is_model else Answers(n, p, False, *given[n])
               for n, p, is_model in specs]
    columns = prompt_columns(records)
    cache: dict[str, Any] = {}
    base_stats = answer_stats(baseline, cfg)
    results: dict = {"prompts": len(records), "data": cfg.data, "judge": judge_name(cfg),
                     "length_unit": cfg.length_unit, "bootstrap": cfg.bootstrap, "self_bleu_max": cfg.self_bleu_max,
                     "decoding": {**rules_record(cfg), "stop": list(cfg.stop), "system_prompt": cfg.system_prompt,
                                  "demonstrations": cfg.demonstrations, "max_new_tokens": cfg.max_new_tokens,
                                  "baseline_decoding": cfg.baseline_decoding},
                     "baseline": {"name": Path(baseline.source).name if cfg.baseline else Path(baseline.source).stem,
                                  "source": baseline.source, "generated": baseline.generated, **base_stats},
                     "models": {}}
    rows: dict[str, list[dict]] = {}
    for a in answers:
        probs = judge_probs(judge, records, a, baseline, columns, cache)
        comparison, w = compare(a, baseline, probs, cfg)
        results["models"][a.name] = {"source": a.source, "generated": a.generated, **comparison,
                                     **answer_stats(a, cfg), "baseline_mean_length": base_stats["mean_length"]}
        rows[a.name] = prompt_rows(records, a, baseline, probs, w, cfg)
    if cfg.base:
        for name, shift in token_shift(cfg, answers, records).items():
            results["models"][name]["token_shift"] = shift
    results["seconds"] = time.perf_counter() - t0
    lengths_of = {"baseline": lengths(baseline.texts, cfg.length_unit),
                  **{a.name: lengths(a.texts, cfg.length_unit) for a in answers}}
    write_outputs(cfg, out, results, rows, lengths_of)
    for name, m in results["models"].items():
        print(f"eval: {name} vs {results['baseline']['name']}: win rate {_ci(m['win_rate'], 'win_rate')}, "
              f"LC {_ci(m['lc_win_rate'], 'lc_win_rate')}, mean length {m['mean_length']:.1f} "
              f"(baseline {base_stats['mean_length']:.1f}) {cfg.length_unit}")
    print(f"eval: {len(answers)} model(s) on {len(records)} prompts -> {out}/report.md")
    return results


def judge_name(cfg: EvalConfig) -> str:
    if cfg.judge_model:
        return f"LLM judge {cfg.judge_model}"
    parts = [f"reward function {r}" for r in cfg.reward]
    if cfg.reward_model:
        parts.append(f"reward model {cfg.reward_model}")
    return ", ".join(parts)
