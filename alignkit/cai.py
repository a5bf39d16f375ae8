"""alignkit cai: Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

SL-CAI (§3.1). For each prompt the model answers, then for --revisions K rounds, in one conversation through
its chat template:

    user: PROMPT                      assistant: ANSWER
    user: CRITIQUE REQUEST (principle drawn at random)   assistant: CRITIQUE
    user: REVISION REQUEST (the same principle)          assistant: REVISION
    ... the next round's critique is about the last revision, under another drawn principle ...

The final revisions are fine-tuning data (OUTPUT/sl_cai.jsonl, `alignkit sft` input): the model learns to
answer as it would after criticising itself, with no human label of what is harmful.

RL-CAI (§4.1), with --pairs. Two fresh answers per prompt from --pair-model (usually the SL-CAI model) are
compared by a judge (by default the --model itself) against a preference principle drawn from the
constitution; the AI-labelled pairs (OUTPUT/pairs.jsonl) train a preference model (`alignkit reward`) or the
policy directly (`alignkit dpo`). Another pairing, not built here, is the initial answer (rejected) against
the final revision (chosen) of each chain: cheaper, but it teaches the difference between a first draft and
a revision rather than between two of the model's own answers; both are in chains.jsonl to build it from.

The notes' point: the principles replace the human labellers, so the values move to whoever writes the
constitution. That is why it is a plain, editable YAML file (alignkit/assets/constitution.yaml paraphrases
the paper's Appendix C), and why chains.jsonl records which principle each critique and revision followed.

chains.jsonl has a line per prompt: the answer, per round {principle (index into the constitution's
critiques), critique_request, critique, revision_request, revision}, whether each generation ended with a stop
token, why a conversation stopped early ({reason: max_length | empty answer/critique/revision, round}; it stops
at its last complete round, whose revision is the one kept), and with --pairs the two answers and P(first better).

A string prompt is asked as a user turn; sl_cai.jsonl keeps the prompt as given, and `alignkit sft` reads a
string prompt as plain text, so give message-list prompts to fine-tune through the chat template.

Runs under torchrun: prompt batch b goes to process b % world_size and is sampled with a seed derived from
(seed, b), and principles are drawn per prompt from (seed, prompt index), so the output does not depend on the
number of processes; process 0 merges the shards.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import torch

from alignkit.config import Repeatable
from alignkit.errors import UserError, writing
from alignkit.judge import JudgeOptions, Template, prompt_text


@dataclass
class CAIConfig(JudgeOptions):
    """Constitutional AI: critique -> revision chains as SFT data (SL-CAI), and with --pairs AI-labelled
    preference pairs (RL-CAI)."""

    model: str = ""
    """Local Hugging Face model directory (with a chat template): answers, critiques and revises."""
    constitution: str = ""
    """YAML file {critiques: [{critique, revision}, ...], preferences: [str, ...]}; default: the shipped
    alignkit/assets/constitution.yaml (principles paraphrased from Bai et al. 2022)."""
    data: Annotated[tuple[str, ...], Repeatable] = ()
    """Prompt file(s): records with a 'prompt' field (string or messages); other fields are kept."""
    output: str = "runs/cai"
    """Output directory: sl_cai.jsonl, chains.jsonl, pairs.jsonl (--pairs), metrics.jsonl, config.yaml."""
    config: str | None = None
    """YAML file of defaults for these fields; command-line flags override it."""
    revisions: int = 1
    """Critique -> revision rounds per prompt, each under a freshly drawn principle (0 with --pairs: only
    the pairs, e.g. of an SL-CAI --pair-model judged by --model)."""
    critique_template: str | None = None
    """Jinja file of the critique user turn (variables request, prompt, answer); default
    alignkit/assets/cai/critique.jinja, the constitution's request as is."""
    revision_template: str | None = None
    """Jinja file of the revision user turn (variables request, prompt, answer, critique); default
    alignkit/assets/cai/revision.jinja, the constitution's request as is."""
    pairs: bool = False
    """Also write OUTPUT/pairs.jsonl: two fresh answers per prompt from --pair-model, judged against a drawn
    preference principle (RL-CAI's AI feedback)."""
    pair_model: str | None = None
    """Model directory the pairs are sampled from (default --model; typically the SL-CAI model)."""
    principle: str | None = None
    """Pairs: judge every pair by this principle instead of one drawn from the constitution's preferences."""
    min_confidence: float = 0.5
    """Pairs: a verdict whose confidence max(P, 1 - P) is at most this is a tie, left out and counted."""
    batch_size: int = 8
    """Prompts per batch (a batch's generations run together; batches are shared out under torchrun)."""
    max_prompts: int = -1
    """Use only the first N prompts of the data (-1 = all)."""
    max_new_tokens: int = 128
    """Token budget of each answer, critique and revision."""
    max_length: int = 1024
    """Longest conversation: a prompt whose answer does not fit is dropped, and a conversation stops at the
    last round whose critique and revision fit (both counted)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy; --pairs needs > 0 for two different answers)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    generation_batch_size: int = 64
    """Sequences per generate call."""
    seed: int = 0
    """Sampling and principle-drawing seed (per prompt batch and per prompt: the output does not depend on
    the number of processes)."""
    overwrite: bool = False
    """Replace the outputs of an earlier cai run in --output (without it such a directory is refused)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run."""
    progress: bool = True
    """Show progress: a bar on a terminal, else a plain line every few steps or 30 s."""


OUTPUTS = ("sl_cai.jsonl", "chains.jsonl", "pairs.jsonl", "metrics.jsonl", "config.yaml")

# ----------------------------------------------------------------------------------------------
# The constitution and the templates
# ----------------------------------------------------------------------------------------------


@dataclass
class Principle:
    critique: str
    revision: str


@dataclass
class Constitution:
    critiques: list[Principle]
    preferences: list[str]


def default_constitution() -> Path:
    return Path(str(resources.files("alignkit") / "assets" / "constitution.yaml"))


def default_template(kind: Literal["critique", "revision"]) -> Path:
    return Path(str(resources.files("alignkit") / "assets" / "cai" / f"{kind}.jinja"))


def load_constitution(path: str | Path, need_preferences: bool = False) -> Constitution:
    """Read and check a constitution file; any problem is one line naming the file and the entry."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--constitution {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    shape = "a constitution is a mapping {critiques: [{critique, revision}, ...], preferences: [str, ...]}"
    if not isinstance(data, dict):
        raise UserError(f"{p}: {shape}")
    unknown = sorted(set(data) - {"critiques", "preferences"})
    if unknown:
        raise UserError(f"{p}: unknown key {unknown[0]!r}; {shape}")
    critiques = data.get("critiques")
    if not isinstance(critiques, list) or not critiques:
        raise UserError(f"{p}: 'critiques' must be a non-empty list of {{critique, revision}} entries")
    principles = []
    for i, entry in enumerate(critiques):
        if not isinstance(entry, dict):
            raise UserError(f"{p}: critiques[{i}] must be a mapping {{critique: str, revision: str}}, "
                            f"got {type(entry).__name__}")
        for key in ("critique", "revision"):
            if key not in entry:
                raise UserError(f"{p}: critiques[{i}] is missing key {key!r}")
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise UserError(f"{p}: critiques[{i}].{key} must be a non-empty string, got {entry[key]!r}")
        extra = sorted(set(entry) - {"critique", "revision"})
        if extra:
            raise UserError(f"{p}: critiques[{i}] has unknown key {extra[0]!r} (keys: critique, revision)")
        principles.append(Principle(entry["critique"].strip(), entry["revision"].strip()))
    preferences = data.get("preferences")
    if preferences is None and not need_preferences:
        preferences = []
    elif not isinstance(preferences, list) or not preferences:
        raise UserError(f"{p}: 'preferences' must be a non-empty list of principles (strings) to judge pairs by")
    for i, text in enumerate(preferences):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{p}: preferences[{i}] must be a non-empty string, got {text!r}")
    return Constitution(principles, [t.strip() for t in preferences])


def check_templates(critique: Template, revision: Template) -> None:
    """Render both templates once with stand-in values, so a template naming a variable it does not get
    fails now, before any model is loaded."""
    critique.render(request="r", prompt="p", answer="a")
    revision.render(request="r", prompt="p", answer="a", critique="c")


def draw(seed: int, index: int, rounds: int, constitution: Constitution) -> tuple[list[int], int | None]:
    """The principles of prompt `index`: a critique/revision pair per round, and a preference principle."""
    rng = random.Random(seed * 1_000_003 + index)
    picks = [rng.randrange(len(constitution.critiques)) for _ in range(rounds)]
    preference = rng.randrange(len(constitution.preferences)) if constitution.preferences else None
    return picks, preference


# ----------------------------------------------------------------------------------------------
# Chains
# ----------------------------------------------------------------------------------------------


def as_messages(prompt) -> list[dict]:
    """The prompt as the conversation's opening: a string is the user's turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def conversation(prompt, answer: str, rounds: list[dict]) -> list[dict]:
    """The conversation of a chain so far: the prompt, the answer, then each round's critique request,
    critique, revision request and revision. The next critique request is appended to this."""
    msgs = as_messages(prompt) + [{"role": "assistant", "content": answer}]
    for r in rounds:
        msgs += [{"role": "user", "content": r["critique_request"]}, {"role": "assistant", "content": r["critique"]},
                 {"role": "user", "content": r["revision_request"]}, {"role": "assistant", "content": r["revision"]}]
    return msgs


class Sampler:
    """Generate the next assistant turn of many conversations at once; each text with whether it ended with
    a stop token."""

    def __init__(self, model, tokenizer, cfg: CAIConfig):
        from alignkit.models import stop_token_ids

        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.stops = set(stop_token_ids(tokenizer, model))

    def ids(self, messages: list[dict]) -> list[int]:
        from alignkit.data import render_prompt

        return render_prompt(self.tokenizer, messages)

    def fits(self, ids: list[int]) -> bool:
        return len(ids) + self.cfg.max_new_tokens <= self.cfg.max_length

    def __call__(self, prompt_ids: list[list[int]]) -> list[tuple[str, bool]]:
        from alignkit.generation import generate

        if not prompt_ids:
            return []
        c = self.cfg
        out = generate(self.model, self.tokenizer, prompt_ids, c.max_new_tokens, c.temperature, c.top_p,
                       c.generation_batch_size)
        return [(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), bool(ids) and ids[-1] in self.stops)
                for ids in out]


def run_chains(sample: Sampler, items: list[dict], cfg: CAIConfig, constitution: Constitution,
               critique_t: Template, revision_t: Template) -> list[dict]:
    """Answer, then --revisions rounds of critique and revision, for a batch of prompts. `items` are
    {index, prompt}; returns a chain per item. A conversation stops at its last complete round when the next
    request would not fit in --max-length or a generation comes back empty."""
    chains = []
    for it in items:
        picks, _ = draw(cfg.seed, it["index"], cfg.revisions, constitution)
        chains.append({"index": it["index"], "prompt": it["prompt"], "answer": None, "answer_ended": None,
                       "rounds": [], "stopped": None, "_picks": picks})
    if not cfg.revisions:  # pairs only
        for ch in chains:
            del ch["_picks"]
        return chains
    answers = sample([sample.ids(as_messages(ch["prompt"])) for ch in chains])
    active = []
    for ch, (text, ended) in zip(chains, answers):
        ch["answer"], ch["answer_ended"] = text, ended
        if text:
            active.append(ch)
        else:
            ch["stopped"] = {"reason": "empty answer", "round": 0}
    for r in range(cfg.revisions):
        asking = []
        for ch in active:
            principle = constitution.critiques[ch["_picks"][r]]
            current = ch["rounds"][-1]["revision"] if ch["rounds"] else ch["answer"]
            request = critique_t.render(request=principle.critique, prompt=prompt_text(ch["prompt"]), answer=current)
            msgs = conversation(ch["prompt"], ch["answer"], ch["rounds"]) + [{"role": "user", "content": request}]
            ids = sample.ids(msgs)
            if sample.fits(ids):
                asking.append((ch, request, ids))
            else:
                ch["stopped"] = {"reason": "max_length", "round": r + 1}
        critiques = sample([ids for _, _, ids in asking])
        revising = []
        for (ch, request, _), (critique, ended) in zip(asking, critiques):
            if not critique:
                ch["stopped"] = {"reason": "empty critique", "round": r + 1}
                continue
            principle = constitution.critiques[ch["_picks"][r]]
            current = ch["rounds"][-1]["revision"] if ch["rounds"] else ch["answer"]
            rev_request = revision_t.render(request=principle.revision, prompt=prompt_text(ch["prompt"]),
                                            answer=current, critique=critique)
            msgs = conversation(ch["prompt"], ch["answer"], ch["rounds"]) + [
                {"role": "user", "content": request}, {"role": "assistant", "content": critique},
                {"role": "user", "content": rev_request}]
            ids = sample.ids(msgs)
            if not sample.fits(ids):
                ch["stopped"] = {"reason": "max_length", "round": r + 1}
                continue
            revising.append((ch, {"principle": ch["_picks"][r], "critique_request": request, "critique": critique,
                                  "critique_ended": ended, "revision_request": rev_request}, ids))
        revisions = sample([ids for _, _, ids in revising])
        active = []
        for (ch, rnd, _), (revision, ended) in zip(revising, revisions):
            if not revision:
                ch["stopped"] = {"reason": "empty revision", "round": r + 1}
                continue
            ch["rounds"].append({**rnd, "revision": revision, "revision_ended": ended})
            active.append(ch)
    for ch in chains:
        del ch["_picks"]
    return chains


def run_pairs(pair_sample: Sampler, judge, items: list[dict], cfg: CAIConfig, constitution: Constitution
              ) -> list[dict]:
    """Two fresh answers per prompt, judged against the prompt's drawn preference principle: per item
    {principle, answers, ended, prob} (prob = P(first answer better)), or None where an answer is empty."""
    ids = [pair_sample.ids(as_messages(it["prompt"])) for it in items for _ in range(2)]
    samples = pair_sample(ids)
    out, judged = [], []
    for g, it in enumerate(items):
        (a, ea), (b, eb) = samples[2 * g], samples[2 * g + 1]
        _, pick = draw(cfg.seed, it["index"], cfg.revisions, constitution)
        rec = {"principle": pick, "answers": [a, b], "ended": [ea, eb], "prob": None}
        out.append(rec)
        if a and b:
            judged.append((it, rec))
    if judged:
        v = judge.pairwise([it["prompt"] for it, _ in judged], [rec["answers"][0] for _, rec in judged],
                           [rec["answers"][1] for _, rec in judged],
                           principles=[constitution.preferences[rec["principle"]] for _, rec in judged])
        for (_, rec), p in zip(judged, v.prob.tolist()):
            rec["prob"] = p
    return out


# ----------------------------------------------------------------------------------------------
# alignkit cai
# ----------------------------------------------------------------------------------------------


def claim_output(out: Path, overwrite: bool, d) -> None:
    """Lock OUTPUT (process 0) and refuse an earlier run's files in it, or delete cai's with --overwrite."""
    from alignkit.train.checkpoint import RUN_MARKERS, probe_writable
    from alignkit.train.run import lock_output, release_outputs

    failure = None
    if d.is_main:
        try:
            probe_writable(out)
            with writing(out, "--output"):
                out.mkdir(parents=True, exist_ok=True)
            if lock_output(out) is None:
                failure = f"--output {out} is in use by another alignkit run; wait for it or choose another --output"
            else:
                found = [n for n in dict.fromkeys(OUTPUTS + RUN_MARKERS) if (out / n).exists()]
                others = [n for n in found if n not in OUTPUTS]
                if others or found and not overwrite:
                    failure = (f"--output {out} already holds a run or model ({', '.join(found)}); "
                               + ("choose another --output" if others else
                                  "replace it with --overwrite or choose another --output"))
                else:
                    with writing(out, "--output"):
                        for name in found:
                            (out / name).unlink()
                    if found:
                        print(f"--overwrite: deleted the previous cai outputs in {out}")
        except UserError as e:
            failure = str(e)
    if d.any(failure is not None):
        release_outputs()
        raise UserError(failure or f"--output {out}: process 0 could not claim it")


def load_items(cfg: CAIConfig, tokenizer, sample_ids) -> tuple[list[dict], int]:
    """Prompt records -> [{index, prompt, columns}] whose answer fits in --max-length, and how many did not."""
    from alignkit.data import load_prompts

    examples, _ = load_prompts(list(cfg.data), tokenizer)
    items, dropped = [], 0
    for ex in examples:
        if 0 <= cfg.max_prompts <= len(items) + dropped:
            break
        if len(sample_ids(as_messages(ex.prompt))) + cfg.max_new_tokens > cfg.max_length:
            dropped += 1
            continue
        items.append({"index": len(items) + dropped, "prompt": ex.prompt, "columns": ex.columns})
    return items, dropped


def check_flags(cfg: CAIConfig) -> None:
    if not cfg.model:
        raise UserError("alignkit cai needs --model DIR")
    if not cfg.data:
        raise UserError("alignkit cai needs --data FILE (records with a 'prompt' field)")
    if cfg.revisions < 0 or cfg.revisions == 0 and not cfg.pairs:
        raise UserError(f"--revisions must be >= 1 (0 only with --pairs: pairs without SL-CAI data), "
                        f"got {cfg.revisions}")
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if cfg.pairs and cfg.temperature == 0:
        raise UserError("--pairs needs --temperature > 0: greedy decoding gives two identical answers")
    if not 0.5 <= cfg.min_confidence < 1:
        raise UserError(f"--min-confidence must be in [0.5, 1), got {cfg.min_confidence}")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be >= 1")


def main(cfg: CAIConfig) -> dict:
    from alignkit.judge import load_judge
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.train import dist as distributed
    from alignkit.train.run import release_outputs
    from alignkit.train.tracking import progress_iter

    check_flags(cfg)
    constitution = load_constitution(cfg.constitution or default_constitution(), need_preferences=cfg.pairs)
    if cfg.pairs and cfg.principle:
        constitution.preferences = [cfg.principle]
    critique_t = Template(cfg.critique_template or default_template("critique"), "--critique-template")
    revision_t = Template(cfg.revision_template or default_template("revision"), "--revision-template")
    check_templates(critique_t, revision_t)
    d = distributed.setup(cfg.device)
    out = Path(cfg.output)
    claim_output(out, cfg.overwrite, d)
    shard = out / f".cai-shard-{d.rank}.jsonl"
    try:
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"--model {cfg.model}: its tokenizer has no chat template; the critique and revision "
                            "are turns of a conversation")
        model = load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, d.device).eval()
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and cfg.max_length > positions:
            raise UserError(f"--max-length {cfg.max_length} is longer than --model's {positions} positions; "
                            f"give --max-length {positions} or less")
        sample = Sampler(model, tokenizer, cfg)
        items, dropped = load_items(cfg, tokenizer, sample.ids)
        if not items:
            raise UserError(f"no usable prompts in {', '.join(cfg.data)}: {dropped} dropped, their answer would not "
                            f"fit in --max-length {cfg.max_length}")
        pair_sample = judge = None
        if cfg.pairs:
            pair_sample = sample
            if cfg.pair_model and Path(cfg.pair_model).resolve() != Path(cfg.model).resolve():
                pair_tok = load_tokenizer(cfg.pair_model, cfg.trust_remote_code)
                pair_sample = Sampler(load_causal_lm(cfg.pair_model, cfg.dtype, cfg.trust_remote_code, d.device).eval(),
                                      pair_tok, cfg)
            if cfg.judge_model or cfg.reward_model or cfg.reward:
                judge = load_judge(cfg, policy_tokenizer=tokenizer)
            else:  # the model judges (Bai et al.: the feedback model is the assistant model itself)
                judge = load_judge(cfg, model=model, tokenizer=tokenizer)

        batches = [items[s:s + cfg.batch_size] for s in range(0, len(items), cfg.batch_size)]
        mine = list(range(d.rank, len(batches), d.world_size))
        t0 = time.perf_counter()
        with writing(shard, "a shard of"), shard.open("w") as f, torch.no_grad():
            for b in progress_iter(mine, cfg.progress and d.is_main, "cai"):
                torch.manual_seed(cfg.seed * 100003 + b)
                chains = run_chains(sample, batches[b], cfg, constitution, critique_t, revision_t)
                pairs = (run_pairs(pair_sample, judge, batches[b], cfg, constitution) if cfg.pairs
                         else [None] * len(chains))
                for ch, pair in zip(chains, pairs):
                    f.write(json.dumps({**ch, "batch": b, "pair": pair}) + "\n")
        d.barrier()
        final = {}
        if d.is_main:
            final = merge(cfg, out, items, constitution, d.world_size, dropped, time.perf_counter() - t0)
        d.barrier()
        return final
    finally:
        shard.unlink(missing_ok=True)
        release_outputs()
        distributed.teardown()


def completion(prompt, text: str):
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def summary(cfg: CAIConfig, chains: list[dict]) -> dict:
    """Counts and lengths of a set of chains (a metrics row)."""
    finals = [ch["rounds"][-1]["revision"] for ch in chains if ch["rounds"]]
    revised = [ch for ch in chains if ch["rounds"]]
    stopped = [ch["stopped"]["reason"] for ch in chains if ch["stopped"]]
    answered = [ch for ch in chains if ch["answer"] is not None]
    flat = [ch["answer_ended"] for ch in answered] + [
        x for ch in chains for r in ch["rounds"] for x in (r["critique_ended"], r["revision_ended"])]
    row = {"prompts": len(chains), "rounds": sum(len(ch["rounds"]) for ch in chains), "kept": len(finals),
           "unrevised": len(chains) - len(finals),
           "stopped_too_long": stopped.count("max_length"),
           "stopped_empty": sum(s.startswith("empty") for s in stopped),
           "empty_revisions": stopped.count("empty revision"),
           "truncated_generations": sum(not e for e in flat),
           "answer_words": sum(len(ch["answer"].split()) for ch in answered) / max(1, len(answered)),
           "revision_words": sum(len(t.split()) for t in finals) / max(1, len(finals)),
           "revised_differs": (sum(ch["rounds"][-1]["revision"] != ch["answer"] for ch in revised)
                               / max(1, len(revised)))}
    if cfg.pairs:
        judged = [ch["pair"] for ch in chains if ch["pair"]["prob"] is not None]
        ties = [p for p in judged if max(p["prob"], 1 - p["prob"]) <= cfg.min_confidence + 1e-9]
        row.update(pairs=len(judged) - len(ties), ties=len(ties), pairs_empty=len(chains) - len(judged),
                   judge_confidence=sum(max(p["prob"], 1 - p["prob"]) for p in judged) / max(1, len(judged)))
    return row


def merge(cfg: CAIConfig, out: Path, items: list[dict], constitution: Constitution, world_size: int,
          dropped: int, seconds: float) -> dict:
    """Process 0: shards -> sl_cai.jsonl, chains.jsonl, pairs.jsonl in prompt order; metrics.jsonl (a row per
    prompt batch, then the totals); config.yaml. Everything is written only once every row is ready."""
    from alignkit.commands import OTHER_COMPLETIONS, with_completion, write_jsonl
    from alignkit.config import save_config

    chains = []
    for r in range(world_size):
        chains += [json.loads(line) for line in (out / f".cai-shard-{r}.jsonl").read_text().splitlines()]
    chains.sort(key=lambda ch: ch["index"])
    columns = {it["index"]: it["columns"] for it in items}
    sl_rows, pair_rows = [], []
    for ch in chains:
        record = {"prompt": ch["prompt"], **columns[ch["index"]]}
        if ch["rounds"]:
            sl_rows.append(with_completion(record, ch["rounds"][-1]["revision"]))
        p = ch["pair"]
        if p is None or p["prob"] is None or max(p["prob"], 1 - p["prob"]) <= cfg.min_confidence + 1e-9:
            continue
        chosen, rejected = p["answers"] if p["prob"] >= 0.5 else p["answers"][::-1]
        pair_rows.append({"prompt": ch["prompt"], "chosen": completion(ch["prompt"], chosen),
                          "rejected": completion(ch["prompt"], rejected), "judge_prob": max(p["prob"], 1 - p["prob"]),
                          "principle": constitution.preferences[p["principle"]],
                          **{k: v for k, v in columns[ch["index"]].items() if k not in OTHER_COMPLETIONS}})
    n_batches = max(ch["batch"] for ch in chains) + 1
    rows = [{"step": b + 1, **summary(cfg, [ch for ch in chains if ch["batch"] == b])} for b in range(n_batches)]
    total = summary(cfg, chains)
    final = {"step": n_batches, "final": True, **total, "dropped_prompts": dropped, "seconds": seconds,
             "prompts_per_s": len(chains) / max(seconds, 1e-9)}
    with writing(out, "the cai outputs to"):
        write_jsonl(str(out / "chains.jsonl"), [{k: v for k, v in ch.items() if k != "batch"} for ch in chains])
        if cfg.pairs:
            write_jsonl(str(out / "pairs.jsonl"), pair_rows)
        write_jsonl(str(out / "metrics.jsonl"), rows + [final])
        save_config(cfg, out, "cai")
        if cfg.revisions:
            write_jsonl(str(out / "sl_cai.jsonl"), sl_rows)
    notes = [f"{k.replace('_', ' ')} {total[k]}" for k in ("unrevised", "stopped_too_long", "stopped_empty")
             if total[k] and cfg.revisions] + ([f"dropped {dropped} prompts too long"] if dropped else [])
    print(f"cai: {total['prompts']} prompts"
          + (f", {total['kept']} revised ({total['rounds']} rounds) -> {out / 'sl_cai.jsonl'}" if cfg.revisions else "")
          + (f", {total['pairs']} pairs ({total['ties']} ties) -> {out / 'pairs.jsonl'}" if cfg.pairs else "")
          + (f" ({'; '.join(notes)})" if notes else ""))
    return final
