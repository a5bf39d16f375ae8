"""A model as judge (RLAIF; the notes: once human labels are too slow, a strong LLM labels the comparisons,
Lee et al. 2023; GPT-4 agrees with humans about as often as humans agree with each other).

Any local causal LM judges through a Jinja prompt template rendered into its chat template. Its verdict is
read from its next-token probabilities of the answer labels, never from parsed free text:

    pairwise   P(a better) = mean over the two orders of showing a and b of the judge's probability of the
               label of a, renormalised over the labels; asking in both orders cancels position bias
               (Zheng et al. 2023, "Judging LLM-as-a-judge", §3.4; Lee et al. 2023, §2.1.2).
    pointwise  score = sum_k v_k * P(score label k), the expected value over the score tokens (G-Eval,
               Liu et al. 2023, eq. 1), the smooth version of Yuan et al. 2024's 5-point LLM-as-a-judge.

Labels that are not single tokens are scored as whole continuations (`alignkit.logprobs.option_logps`).
A reward model or reward functions can stand in for the LLM (`ScoreJudge`): P(a better) = sigmoid(r_a - r_b),
the Bradley-Terry reading of a reward model, and their score as the pointwise score.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from alignkit.config import Repeatable
from alignkit.errors import DataError, UserError, writing
from alignkit.train.tracking import progress_iter

# ----------------------------------------------------------------------------------------------
# Probability arithmetic (pure; hand-worked tests in tests/test_judge.py)
# ----------------------------------------------------------------------------------------------


def label_probs(label_logps: torch.Tensor) -> torch.Tensor:
    """(N, K) log-probs of the K labels -> (N, K) probabilities renormalised over the labels: the judge's
    belief among the answers it was told to give, whatever mass it put elsewhere."""
    return torch.softmax(label_logps, dim=-1)


def both_orders(p_first_ab: torch.Tensor, p_first_ba: torch.Tensor) -> dict[str, torch.Tensor]:
    """Combine a pairwise verdict asked in both orders.

    Args:
        p_first_ab: (N,) P(first-shown answer better) when a is shown first (= P(a better) in that order).
        p_first_ba: (N,) P(first-shown answer better) when b is shown first (= P(b better) in that order).

    Returns (each (N,)):
        prob: P(a better) = (p_first_ab + 1 - p_first_ba) / 2; a judge that only follows position gets 0.5.
        first: P(the first-shown answer wins), averaged over the two orders; 0.5 = no position bias.
        flip: 1.0 where the order decides the verdict ((p_first_ab > 1/2) != (1 - p_first_ba > 1/2)).
    """
    p_a_ba = 1 - p_first_ba
    return {"prob": (p_first_ab + p_a_ba) / 2, "first": (p_first_ab + p_first_ba) / 2,
            "flip": ((p_first_ab > 0.5) != (p_a_ba > 0.5)).to(p_first_ab.dtype)}


def expected_score(score_logps: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(N, K) log-probs of the K score labels, (K,) their values -> (N,) expected score
    sum_k values_k * softmax(score_logps)_k."""
    return (label_probs(score_logps) * values.to(score_logps.dtype)).sum(-1)


def bradley_terry_prob(score_a: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    """(N,), (N,) scalar rewards -> (N,) P(a better) = sigmoid(r_a - r_b) (Bradley & Terry 1952)."""
    return torch.sigmoid(score_a - score_b)


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------

DEFAULT_LABELS = ("A", "B")
DEFAULT_SCORES = ("1", "2", "3", "4", "5")


def default_template(kind: Literal["pairwise", "pointwise"]) -> Path:
    return Path(str(resources.files("alignkit") / "assets" / "judge" / f"{kind}.jinja"))


class Template:
    """A Jinja prompt template (sandboxed, strict about undefined names), rendered to the user turn the judge
    answers. Variables: prompt, answer (pointwise), answer_a and answer_b (pairwise), principle, labels, scores."""

    def __init__(self, path: str | Path, flag: str = "--template"):
        from jinja2 import StrictUndefined, TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{flag} {self.path}: no such file")
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)
        try:
            self.template = env.from_string(self.path.read_text())
        except TemplateSyntaxError as e:
            raise UserError(f"{self.path}:{e.lineno}: template syntax error: {e.message}") from None

    def render(self, **variables) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(**variables).strip()
        except TemplateError as e:
            raise UserError(f"{self.path}: cannot render: {e} (variables: {', '.join(sorted(variables))})") from None


def prompt_text(prompt) -> str:
    """What the judge is shown as the question: a string prompt as is; a message list's only user turn, or
    the whole conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ----------------------------------------------------------------------------------------------
# Judges
# ----------------------------------------------------------------------------------------------


@dataclass
class Verdicts:
    """Pairwise verdicts on N pairs (a, b), each (N,) float64: prob = P(a better), first = P(first-shown wins),
    flip = whether order decided the verdict, mass = probability the judge put on the labels at all (1 for
    a score judge), orders = (P(a better) asked a-first, asked b-first)."""

    prob: torch.Tensor
    first: torch.Tensor
    flip: torch.Tensor
    mass: torch.Tensor
    orders: tuple[torch.Tensor, torch.Tensor]


class LLMJudge:
    """A causal LM judging through templates; labels read from its next-token probabilities."""

    kind = "llm"

    def __init__(self, model_dir: str, pairwise_template: str | Path | None = None,
                 pointwise_template: str | Path | None = None, labels=DEFAULT_LABELS, scores=DEFAULT_SCORES,
                 principle: str | None = None, device="cpu", dtype: str = "float32",
                 trust_remote_code: bool = False, batch_size: int = 16, model=None, tokenizer=None):
        from alignkit.models import load_causal_lm, load_tokenizer

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir, trust_remote_code)
        self.model = (model if model is not None else load_causal_lm(model_dir, dtype, trust_remote_code, device)).eval()
        self.device = next(self.model.parameters()).device
        self.pairwise_template = Template(pairwise_template or default_template("pairwise"), "--pairwise-template")
        self.pointwise_template = Template(pointwise_template or default_template("pointwise"), "--pointwise-template")
        self.labels, self.scores, self.principle = tuple(labels), tuple(scores), principle
        if len(self.labels) != 2 or len(set(self.labels)) != 2:
            raise UserError(f"--labels needs two different labels, got {list(self.labels)}")
        if len(self.scores) < 2 or len(set(self.scores)) != len(self.scores):
            raise UserError(f"--scores needs at least two different score labels, got {list(self.scores)}")
        try:
            self.score_values = torch.tensor([float(s) for s in self.scores], dtype=torch.float64)
        except ValueError:
            raise UserError(f"--scores must be numbers (their values are averaged), got {list(self.scores)}") from None
        self.batch_size = batch_size
        self.label_ids = self.continuation_ids(self.labels, "--labels")
        self.score_ids = self.continuation_ids(self.scores, "--scores")

    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def judge_prompt(self, text: str) -> list[int]:
        """Token ids of the judge's turn: the rendered template as a user message through the chat template
        (or as plain text for a tokenizer without one), ending where the judge's answer starts."""
        from alignkit.data import render_prompt

        return render_prompt(self.tokenizer, [{"role": "user", "content": text}] if self.chat() else text)

    def continuation_ids(self, answers: tuple[str, ...], flag: str) -> list[list[int]]:
        """Token ids of each answer label as the judge would write it right after its prompt (its end-of-turn
        left out). Rendering in context matters: a BPE tokenizer may merge the label with what precedes it."""
        from alignkit.data import render_prompt_completion
        from alignkit.data.templates import end_of_turn_ids

        probe = "Which is better?"
        prompt = [{"role": "user", "content": probe}] if self.chat() else probe
        head = self.judge_prompt(probe)
        stops = end_of_turn_ids(self.tokenizer)
        out = []
        for a in answers:
            completion = [{"role": "assistant", "content": a}] if self.chat() else a
            ex = render_prompt_completion(self.tokenizer, prompt, completion)
            ids = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
            if ex.input_ids[:len(head)] != head:
                raise UserError(f"{flag}: the judge's chat template renders {a!r} so that the prompt's tokens change; "
                                "cannot read its probability")
            while ids and ids[-1] in stops:
                ids.pop()
            if not ids:
                raise UserError(f"{flag}: label {a!r} renders to no tokens with this tokenizer")
            out.append(ids)
        if len({tuple(i) for i in out}) != len(out):
            raise UserError(f"{flag}: labels {list(answers)} render to the same tokens with this tokenizer")
        return out

    @torch.no_grad()
    def answer_logps(self, texts: list[str], answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) log-probs of each answer label after each rendered template, and (N,) the probability mass
        on the labels. One forward per prompt when every label is one token; else whole continuations."""
        from alignkit.logprobs import option_logps
        from alignkit.train.batching import collate

        prompts = [self.judge_prompt(t) for t in texts]
        out = torch.zeros((len(prompts), len(answers)), dtype=torch.float64)
        if all(len(a) == 1 for a in answers):
            ids = torch.tensor([a[0] for a in answers])
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
            for s in range(0, len(order), self.batch_size):
                chunk = order[s:s + self.batch_size]
                batch = collate([prompts[i] for i in chunk], [[]] * len(chunk), pad, self.device)
                # right padding under a causal mask: each row's last real position sees only real tokens
                logits = self.model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
                last = torch.tensor([len(prompts[i]) - 1 for i in chunk], device=logits.device)
                logps = torch.log_softmax(logits[torch.arange(len(chunk)), last].double(), -1)  # (B, V)
                out[chunk] = logps[:, ids.to(logps.device)].cpu()
        else:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            out = torch.tensor(option_logps(self.model, prompts, [answers] * len(prompts), pad,
                                            batch_size=self.batch_size), dtype=torch.float64)
        return out, out.exp().sum(-1)

    def pairwise(self, prompts: list, answers_a: list[str], answers_b: list[str], columns=None,
                 principles: list[str | None] | None = None) -> Verdicts:
        """Verdicts on pairs (a, b), asked in both orders, each judged by its principle (default --principle);
        `columns` are for score judges."""
        n = len(prompts)
        principles = principles or [self.principle] * n
        texts = []
        for first, second in ((answers_a, answers_b), (answers_b, answers_a)):
            texts += [self.pairwise_template.render(prompt=prompt_text(p), answer_a=x, answer_b=y, principle=c,
                                                    labels=self.labels, scores=self.scores)
                      for p, x, y, c in zip(prompts, first, second, principles)]
        logps, mass = self.answer_logps(texts, self.label_ids)  # (2N, 2), (2N,)
        p_first = label_probs(logps)[:, 0]  # (2N,)
        combined = both_orders(p_first[:n], p_first[n:])
        return Verdicts(combined["prob"], combined["first"], combined["flip"], (mass[:n] + mass[n:]) / 2,
                        (p_first[:n], 1 - p_first[n:]))

    def pointwise(self, prompts: list, answers: list[str], columns=None,
                  principles: list[str | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) expected scores and (N,) the probability mass on the score labels."""
        principles = principles or [self.principle] * len(prompts)
        texts = [self.pointwise_template.render(prompt=prompt_text(p), answer=a, principle=c, labels=self.labels,
                                                scores=self.scores)
                 for p, a, c in zip(prompts, answers, principles)]
        logps, mass = self.answer_logps(texts, self.score_ids)
        return expected_score(logps, self.score_values), mass


class ScoreJudge:
    """A reward model and/or reward functions as a judge (`alignkit.rewards`): their weighted total is the
    pointwise score, sigmoid of the difference the pairwise verdict. Position cannot matter to them."""

    kind = "score"

    def __init__(self, fns: list, weights=(), timeout: float = 600.0):
        self.fns, self.weights, self.timeout = fns, tuple(weights), timeout

    def scores(self, prompts: list, answers: list, columns: dict[str, list] | None = None) -> torch.Tensor:
        from alignkit.rewards import score_completions

        completions = [a if isinstance(p, str) else [{"role": "assistant", "content": a}]
                       for p, a in zip(prompts, answers)]
        total, _ = score_completions(self.fns, list(prompts), completions, columns, self.weights or None,
                                     timeout=self.timeout)
        return total.double()

    def pairwise(self, prompts: list, answers_a: list[str], answers_b: list[str],
                 columns: dict[str, list] | None = None, principles=None) -> Verdicts:
        n = len(prompts)
        both = self.scores(list(prompts) * 2, list(answers_a) + list(answers_b),
                           {k: v * 2 for k, v in (columns or {}).items()})
        prob = bradley_terry_prob(both[:n], both[n:])
        half = torch.full((n,), 0.5, dtype=torch.float64)
        return Verdicts(prob, half, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64),
                        (prob, prob))

    def pointwise(self, prompts: list, answers: list[str], columns: dict[str, list] | None = None, principles=None):
        return self.scores(prompts, answers, columns), torch.ones(len(prompts), dtype=torch.float64)


def load_judge(cfg, policy_tokenizer=None, model=None, tokenizer=None):
    """The judge a config names: --judge-model (an LLM), else --reward-model and/or --reward functions.
    `model`/`tokenizer` reuse an already loaded LLM (the policy judging itself)."""
    from alignkit.rewards import load_rewards

    llm = getattr(cfg, "judge_model", None)
    others = bool(getattr(cfg, "reward_model", None) or getattr(cfg, "reward", ()))
    if llm and others:
        raise UserError("give --judge-model or --reward-model/--reward as the judge, not both")
    if llm or model is not None:
        return LLMJudge(llm, cfg.pairwise_template, cfg.pointwise_template, cfg.labels, cfg.scores, cfg.principle,
                        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
                        cfg.dtype, cfg.trust_remote_code, cfg.judge_batch_size, model=model, tokenizer=tokenizer)
    if not others:
        raise UserError("give a judge: --judge-model DIR (an LLM), --reward-model DIR or --reward MODULE:FUNCTION")
    tok = policy_tokenizer
    if tok is None and cfg.reward_model:
        from alignkit.models import load_tokenizer

        tok = load_tokenizer(cfg.reward_model, cfg.trust_remote_code)
    fns = load_rewards(cfg.reward, cfg.reward_model, tok, "cpu" if cfg.device == "auto" else cfg.device,
                       cfg.trust_remote_code, cfg.dtype)
    return ScoreJudge(fns, cfg.reward_weights, cfg.reward_timeout)


# ----------------------------------------------------------------------------------------------
# The judge's options, shared by every command that takes a judge (judge, cai, self-reward)
# ----------------------------------------------------------------------------------------------


@dataclass
class JudgeOptions:
    """Which judge and how it is asked."""

    judge_model: str | None = None
    """Causal LM directory that judges (an LLM-as-a-judge; any local Hugging Face model)."""
    reward_model: str | None = None
    """Sequence-classification reward model that judges instead (P(a better) = sigmoid(r_a - r_b))."""
    reward: Annotated[tuple[str, ...], Repeatable] = ()
    """Reward function MODULE:FUNCTION or path/file.py:FUNCTION that judges instead (repeatable; summed)."""
    reward_weights: tuple[float, ...] = ()
    """Weight per reward: one per --reward, in order, then one for --reward-model (default all 1)."""
    reward_timeout: float = 600.0
    """Seconds one call of a --reward function may take before the run stops naming it (0 = no limit)."""
    pairwise_template: str | None = None
    """Jinja file of the pairwise judge prompt (variables prompt, answer_a, answer_b, principle, labels);
    default alignkit/assets/judge/pairwise.jinja."""
    pointwise_template: str | None = None
    """Jinja file of the pointwise judge prompt (variables prompt, answer, principle, scores); default
    alignkit/assets/judge/pointwise.jinja."""
    labels: tuple[str, str] = DEFAULT_LABELS
    """The two answer labels of the pairwise prompt, first-shown first; read from the next-token probabilities."""
    scores: tuple[str, ...] = DEFAULT_SCORES
    """The pointwise score labels, lowest first; the score is their expected value."""
    principle: str | None = None
    """A principle to judge by, passed to the templates as `principle` (e.g. from a constitution)."""
    judge_batch_size: int = 16
    """Judge prompts per forward pass."""


# ----------------------------------------------------------------------------------------------
# alignkit judge
# ----------------------------------------------------------------------------------------------


@dataclass
class JudgeConfig(JudgeOptions):
    """Label preferences with a model: pairs {prompt, chosen, rejected}, lists {prompt, completions: [...]},
    or single answers {prompt, completion}; writes the records with the judge's verdicts and a summary."""

    data: Annotated[tuple[str, ...], Repeatable] = ()
    """Input file(s): pairs, lists or single answers (one kind per run)."""
    output: str = "runs/judge"
    """Output directory (judged.jsonl, metrics.jsonl with the summary as its final row, config.yaml), or a
    FILE.jsonl for the records with FILE.metrics.jsonl and FILE.config.yaml beside it."""
    overwrite: bool = False
    """Replace the outputs of an earlier judge run at --output."""
    config: str | None = None
    """YAML file of defaults for these fields; command-line flags override it."""
    mode: Literal["auto", "pairwise", "pointwise"] = "auto"
    """How items are judged: auto = pairs pairwise, lists and single answers pointwise; pairwise lists are
    judged round-robin."""
    relabel: bool = True
    """Pairs: write chosen/rejected in the judge's order (the output is AI-labelled dpo/reward data, with
    judge_agrees = whether it kept the input's order); --no-relabel keeps the input's order."""
    min_confidence: float = 0.5
    """Pairs: a verdict whose confidence max(P, 1 - P) is at most this is a tie (0.5: only exact ties, e.g.
    a judge that follows position alone)."""
    min_margin: float = 0.0
    """Lists: best minus worst score at most this is a tie."""
    ties: Literal["drop", "mark"] = "drop"
    """Ties are left out of the output (counted) or kept with judge_tie: true."""
    list_output: Literal["pair", "ranked"] = "pair"
    """Lists: write best (chosen) vs worst (rejected) as a pair, or the completions ranked best first."""
    max_items: int = -1
    """Judge only the first N records (-1 = all)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the judge."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""
    progress: bool = True
    """Show progress: a bar on a terminal, else a plain line every few steps or 30 s."""


@dataclass
class Item:
    """One input record: its prompt, its answers (2 for a pair, K for a list, 1 for a single answer)."""

    line: str  # path:line, for messages
    record: dict
    kind: Literal["pair", "list", "single"]
    prompt: Any
    answers: list[str]
    columns: dict = field(default_factory=dict)


ANSWER_FIELDS = ("chosen", "rejected", "completion", "completions")


def read_items(paths, max_items: int = -1) -> list[Item]:
    """Records -> Items; all of one kind, or a DataError naming the first record of another kind."""
    from alignkit.data.formats import (
        detect_format,
        prompt_and_completions,
        read_records,
    )
    from alignkit.rewards import completion_text

    items: list[Item] = []
    for path in paths:
        for line, rec in read_records(path):
            if 0 <= max_items <= len(items):
                break
            where = f"{path}:{line}"
            try:
                if isinstance(rec, dict) and "completions" in rec:
                    comps = rec["completions"]
                    if "prompt" not in rec or not isinstance(comps, list) or len(comps) < 2:
                        raise ValueError("a list record is {\"prompt\", \"completions\": [at least two answers]}")
                    kind, prompt = "list", rec["prompt"]
                    answers = [completion_text(c) if isinstance(c, (str, list)) else None for c in comps]
                    if any(a is None or not a.strip() for a in answers):
                        raise ValueError("every completion must be a non-empty string or assistant message list")
                else:
                    fmt = detect_format(rec)
                    if fmt == "preference":
                        prompt, comps, _ = prompt_and_completions(rec, fmt, ("chosen", "rejected"))
                        kind = "pair"
                    elif fmt in ("prompt_completion", "unpaired_preference"):
                        prompt, comps, _ = prompt_and_completions(rec, fmt, ("completion",))
                        kind = "single"
                    else:
                        raise ValueError(f"a {fmt} record has nothing to judge; give pairs {{prompt, chosen, rejected}}, "
                                         "lists {prompt, completions} or single answers {prompt, completion}")
                    answers = [completion_text(c) for c in comps]
                if items and kind != items[0].kind:
                    raise ValueError(f"a {kind} record among {items[0].kind} records ({items[0].line}); judge one "
                                     "kind per run")
            except ValueError as e:
                raise DataError(path, line, str(e)) from None
            columns = {k: v for k, v in rec.items() if k not in ("prompt", *ANSWER_FIELDS)}
            items.append(Item(where, rec, kind, prompt, answers, columns))
    if not items:
        raise UserError("no records to judge")
    return items


def words(text: str) -> int:
    return len(text.split())


def pair_summary(verdicts: Verdicts, items: list[Item], tie: torch.Tensor) -> dict:
    """Agreement with the input's labels (chosen first), the judge's position bias, and its length preference
    (the longer answer's win rate, and the same averaged over pairs whose input label favours the longer and
    those whose label favours the shorter: 0.5 when length adds nothing to the labels)."""
    prob, kept = verdicts.prob, ~tie
    judged_chosen = prob > 0.5
    la = torch.tensor([words(it.answers[0]) for it in items])
    lb = torch.tensor([words(it.answers[1]) for it in items])
    differ = (la != lb) & kept
    longer_won = torch.where(la > lb, judged_chosen, ~judged_chosen)  # the judge picked the longer answer
    def rate(mask):
        return float(longer_won[mask].double().mean()) if bool(mask.any()) else float("nan")
    strata = [rate(differ & (la > lb)), rate(differ & (la < lb))]
    strata = [s for s in strata if not math.isnan(s)]
    agree = torch.where(tie, 0.5, judged_chosen.double())
    return {"agreement": float(judged_chosen[kept].double().mean()) if bool(kept.any()) else float("nan"),
            "agreement_ties_half": float(agree.mean()),
            "first_position_win_rate": float(verdicts.first.mean()), "order_flip_rate": float(verdicts.flip.mean()),
            "longer_win_rate": rate(differ), "longer_win_rate_label_balanced": sum(strata) / len(strata) if strata else float("nan"),
            "label_mass": float(verdicts.mass.mean())}


def judge_pairs(judge, items: list[Item], chunk: int, progress: bool) -> Verdicts:
    parts = []
    for s in progress_iter(range(0, len(items), chunk), progress, "judge"):
        part = items[s:s + chunk]
        parts.append(judge.pairwise([it.prompt for it in part], [it.answers[0] for it in part],
                                    [it.answers[1] for it in part], columns=columns_of(part)))
    return Verdicts(*(torch.cat([getattr(p, f) for p in parts]) for f in ("prob", "first", "flip", "mass")),
                    tuple(torch.cat([p.orders[j] for p in parts]) for j in (0, 1)))


def score_items(judge, items: list[Item], mode: str, chunk: int, progress: bool) -> list[tuple[list[float], float]]:
    """Per item, a score per answer and the judge's mean label mass: pointwise scores, or for a list judged
    pairwise, each answer's mean P(better) against every other answer of the list (round robin)."""
    out = []
    for s in progress_iter(range(0, len(items), chunk), progress, "judge"):
        part = items[s:s + chunk]
        if mode == "pointwise":
            flat = [(it, a) for it in part for a in it.answers]
            scores, mass = judge.pointwise([it.prompt for it, _ in flat], [a for _, a in flat],
                                           columns=columns_of([it for it, _ in flat]))
            k = 0
            for it in part:
                n = len(it.answers)
                out.append(([float(x) for x in scores[k:k + n]], float(mass[k:k + n].mean())))
                k += n
            continue
        for it in part:
            pairs = [(x, y) for x in range(len(it.answers)) for y in range(x + 1, len(it.answers))]
            v = judge.pairwise([it.prompt] * len(pairs), [it.answers[x] for x, _ in pairs],
                               [it.answers[y] for _, y in pairs], columns=columns_of([it] * len(pairs)))
            wins = [0.0] * len(it.answers)
            for (x, y), p in zip(pairs, v.prob.tolist()):
                wins[x] += p
                wins[y] += 1 - p
            out.append(([w / (len(it.answers) - 1) for w in wins], float(v.mass.mean())))
    return out


def columns_of(items: list[Item]) -> dict[str, list]:
    """The items' other fields as columns, for reward functions (a field missing from a record is None)."""
    names = dict.fromkeys(k for it in items for k in it.columns)
    return {k: [it.columns.get(k) for it in items] for k in names}


SWAPPED = (("chosen", "rejected"), ("score_chosen", "score_rejected"))


def pair_rows(cfg: JudgeConfig, items: list[Item], v: Verdicts) -> tuple[list[dict], dict]:
    tie = torch.maximum(v.prob, 1 - v.prob) <= cfg.min_confidence + 1e-9
    summary = {**pair_summary(v, items, tie), "ties": int(tie.sum())}
    rows = []
    for i, it in enumerate(items):
        p, is_tie = float(v.prob[i]), bool(tie[i])
        if is_tie and cfg.ties == "drop":
            continue
        rec = dict(it.record)
        swap = cfg.relabel and not is_tie and p < 0.5
        if swap:
            for x, y in SWAPPED:
                if x in rec and y in rec:
                    rec[x], rec[y] = it.record[y], it.record[x]
        rec["judge_prob"] = 1 - p if swap else p
        rec["judge_agrees"] = None if is_tie else p > 0.5
        rec["judge_orders"] = [float(v.orders[0][i]), float(v.orders[1][i])]
        if is_tie:
            rec["judge_tie"] = True
        rows.append(rec)
    return rows, summary


def scored_rows(cfg: JudgeConfig, items: list[Item], scored: list[tuple[list[float], float]]) -> tuple[list[dict], dict]:
    rows, ties = [], 0
    for it, (values, _) in zip(items, scored):
        rec = dict(it.record)
        if it.kind == "single":
            rows.append({**rec, "judge_score": values[0]})
            continue
        order = sorted(range(len(values)), key=lambda j: -values[j])  # best first; equal scores keep input order
        tie = values[order[0]] - values[order[-1]] <= cfg.min_margin + 1e-12
        ties += tie
        if tie and cfg.ties == "drop":
            continue
        comps = it.record["completions"]
        if cfg.list_output == "pair":
            rec = {k: x for k, x in rec.items() if k != "completions"}
            rec.update(chosen=comps[order[0]], rejected=comps[order[-1]], score_chosen=values[order[0]],
                       score_rejected=values[order[-1]])
        else:
            rec.update(completions=[comps[j] for j in order], ranking=order)
        rec["judge_scores"] = values
        if tie:
            rec["judge_tie"] = True
        rows.append(rec)
    every = [x for values, _ in scored for x in values]
    summary = {"ties": ties, "mean_score": sum(every) / len(every), "label_mass": sum(m for _, m in scored) / len(scored)}
    if items[0].kind == "single" and all(isinstance(it.record.get("label"), bool) for it in items):
        summary["label_auc"] = auc([values[0] for values, _ in scored], [it.record["label"] for it in items])
    return rows, summary


def output_paths(output: str) -> tuple[Path, Path, Path]:
    """(records, metrics, config) paths of --output: a FILE.jsonl with sidecars, or a directory."""
    out = Path(output)
    if out.suffix.lower() in (".jsonl", ".json"):
        stem = out.with_suffix("")
        return out, Path(f"{stem}.metrics.jsonl"), Path(f"{stem}.config.yaml")
    return out / "judged.jsonl", out / "metrics.jsonl", out / "config.yaml"


def main(cfg: JudgeConfig) -> dict:

    import yaml

    from alignkit.commands import write_jsonl
    from alignkit.config import to_dict

    if not cfg.data:
        raise UserError("alignkit judge needs --data FILE (pairs, lists or single answers)")
    if not 0.5 <= cfg.min_confidence < 1:
        raise UserError(f"--min-confidence must be in [0.5, 1), got {cfg.min_confidence}")
    if cfg.min_margin < 0:
        raise UserError(f"--min-margin must be >= 0, got {cfg.min_margin}")
    out, metrics_path, config_path = output_paths(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--output {cfg.output} already holds judged records ({out}); replace them with --overwrite "
                        "or choose another --output")
    judge = load_judge(cfg)
    items = read_items(cfg.data, cfg.max_items)
    kind = items[0].kind
    mode = cfg.mode if cfg.mode != "auto" else ("pairwise" if kind == "pair" else "pointwise")
    if kind == "single" and mode == "pairwise":
        raise UserError("--mode pairwise needs pairs or lists; single answers are scored pointwise")
    if kind == "pair" and mode == "pointwise":
        items = [Item(it.line, it.record, "list", it.prompt, it.answers, it.columns) for it in items]
    t0 = time.perf_counter()
    chunk = max(1, cfg.judge_batch_size * 4)
    if kind == "pair" and mode == "pairwise":
        rows, summary = pair_rows(cfg, items, judge_pairs(judge, items, chunk, cfg.progress))
    else:
        if kind == "pair":  # pairs scored pointwise: the better-scored answer is chosen
            cfg = dataclasses.replace(cfg, list_output="pair")
            for it in items:
                it.record = {**{k: x for k, x in it.record.items() if k not in ("chosen", "rejected")},
                             "completions": [it.record["chosen"], it.record["rejected"]]}
        rows, summary = scored_rows(cfg, items, score_items(judge, items, mode, chunk, cfg.progress))
    seconds = time.perf_counter() - t0
    summary = {"items": len(items), "written": len(rows), "kind": kind, "mode": mode, "judge": judge.kind,
               **summary, "seconds": seconds, "items_per_s": len(items) / max(seconds, 1e-9)}
    with writing(out, "judged records"):
        write_jsonl(str(out), rows)
        config_path.write_text("# alignkit judge\n" + yaml.safe_dump(
            {k: x for k, x in to_dict(cfg).items() if k not in ("config", "overwrite")}, sort_keys=False))
        write_jsonl(str(metrics_path), [{"step": 1, "final": True, **summary}])
    shown = ", ".join(f"{k}={x:.3f}" if isinstance(x, float) else f"{k}={x}" for k, x in summary.items())
    print(f"judge: {len(rows)} of {len(items)} records -> {out} ({shown})")
    return summary


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(a desirable answer outscores an undesirable one), ties half (the Mann-Whitney statistic)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
