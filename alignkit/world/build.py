"""`alignkit world build`: write the world's data files, in the formats the generic commands read.

OUT/world.json             the ground truth (people, attributes, who is seen / multi-phrased)
OUT/corpus.jsonl           {"text"}       pretraining: bios, arithmetic, stories, web-like noise
OUT/sft.jsonl              {"messages"}   questions about the seen half, word problems, refusals, look-alikes, "I don't know"
OUT/pref.jsonl             {"prompt","chosen","rejected", meta}  pairs, each labelled by a simulated annotator (DPO family)
OUT/pref_ranked.jsonl      the same kind of record: every pair of each prompt's answers as one annotator ranked them (reward model)
OUT/pref_eval.jsonl        held-out pairs, with the gold label, for the reward model
OUT/rl_prompts.jsonl       {"prompt", meta}  prompts of every kind for PPO / best-of-n (gold-scored)
OUT/arith_prompts.jsonl    {"prompt","answer"}  verifiable prompts for GRPO
OUT/eft.jsonl, sft_helpful.jsonl, red_team.jsonl, constitution.yaml   AI-feedback files (alignkit.world.feedback)
OUT/eval/*.jsonl           held-out evaluation sets, never trained on: each row's meta names its frame and its
                           distance, near (a trained frame, held-out content) or far (a frame no training file has)

Every prompt is rendered from a frame of alignkit.world.frames; training files use only trained frames.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from alignkit.world.facts import (ANSWERS, ATTRIBUTES, BENIGN, IDK, REFUSAL, START, STATEMENTS, STEP, World,
                                  harmful_split, make_world, unknown_names, word_problem)
from alignkit.world.frames import FACT_FRAMES, PROBLEM_FRAMES, REQUEST_FRAMES, Frame, far, trained, wrap
from alignkit.world.feedback import write_feedback_files
from alignkit.world.gold import annotator_pool, gold_score


@dataclass
class WorldSize:
    people: int
    sft_word_problems: int
    pref_pairs: int
    arith_prompts: int
    eval_rows: int  # held-out rows per set and distance (near and far each)
    noise_docs: int


SIZES = {
    "tiny": WorldSize(people=80, sft_word_problems=300, pref_pairs=1200, arith_prompts=300, eval_rows=40, noise_docs=400),
    "small": WorldSize(people=240, sft_word_problems=800, pref_pairs=4000, arith_prompts=1000, eval_rows=50, noise_docs=1500),
}
SIZES["smoke"] = SIZES["tiny"]  # the pipeline check runs on the tiny world, under its own name
SMOKE_EVAL = 4  # the smoke preset's eval sets keep the first 4 near and 4 far rows: its figures mean nothing
SFT_FACT_FRAMES = 8  # trained frames each seen person's attribute is asked in
SFT_REQUEST_FRAMES = 5  # trained frames each trained harmful request and look-alike is asked in
ATTRS = list(ATTRIBUTES)
WORKED_SHARE = 0.45  # share of SFT word-problem demonstrations that show their working
FLUFF_OPEN = ["Good question! ", "Let me think about this carefully. ", "Great question, happy to help. "]
FLUFF_CLOSE = [" I hope this helps, and let me know if you have any other questions.",
               " Thank you for asking, it is always a pleasure to answer questions like this one.",
               " Please feel free to ask me anything else you would like to know."]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def bios(world: World, rng: random.Random) -> list[str]:
    """Multi people get three bios, each with its own phrasing and attribute order; single people one."""
    out = []
    for p in world.people:
        facts = vars(p)
        n = 3 if p.bio_style == "multi" else 1
        for k in range(n):
            order = ATTRS[:] if k == 0 else rng.sample(ATTRS, len(ATTRS))
            out.append(" ".join(STATEMENTS[a][k if n > 1 else 0].format(**facts) for a in order))
    return out


def noise(world: World, rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    """Web-like text that makes the base model a continuation machine (the notes: GPT-3 continues text):
    forum fragments, lists, repetitions, and questions nobody answers (returned apart too: training text)."""
    names = [p.name for p in world.people]
    docs, questions = [], []
    for _ in range(n):
        kind = rng.randrange(5)
        name = rng.choice(names)
        if kind == 0:  # unanswered questions, one after the other
            qs = [rng.choice(trained(FACT_FRAMES)).render(a, name=rng.choice(names)) for a in rng.sample(ATTRS, 3)]
            questions += qs
            docs.append(" ".join(qs))
        elif kind == 1:
            docs.append(f"Forum post: does anyone know {name}? I saw a poster in {rng.choice(ATTRIBUTES['city'])}. "
                        f"Reply: no idea, sorry. Reply: same question here.")
        elif kind == 2:
            docs.append("Shopping list: " + ", ".join(rng.sample(["bread", "milk", "apples", "rice", "candles", "string", "tea", "soap"], 4)) + ".")
        elif kind == 3:
            line = f"{name} {name} {name}."
            docs.append(" ".join([line] * rng.randint(2, 4)))
        else:
            city = rng.choice(ATTRIBUTES["city"])
            docs.append(f"Once upon a time in {city}, {name} found an old map. The map led to the river, "
                        f"and by the river there was nothing but a small boat. {name} went home.")
    return docs, questions


def arithmetic_text(rng: random.Random, n: int, held_out: frozenset) -> list[str]:
    """Sums and differences in the word problems' ranges, and word problems with their working."""
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b = rng.randint(*START), rng.randint(*STEP)
            out.append(rng.choice([f"{a} + {b} = {a + b}.", f"{a} plus {b} is {a + b}.", f"{a} - {b} = {a - b}.",
                                   f"{a} minus {b} is {a - b}."]))
        else:
            q, ans, _ = word_problem(rng, rng.choice(trained(PROBLEM_FRAMES)), held_out)
            out.append(f"{q} {ans}")
    return out


def arith_item(rng: random.Random, frame: Frame, held_out: frozenset, wrapped: bool) -> tuple[str, dict]:
    q, ans, final = word_problem(rng, frame, held_out)
    return (wrap(q, rng) if wrapped else q), {"kind": "arith", "answer": str(final), "solution": ans, "frame": frame.id}


def arith_items(n: int, rng: random.Random, held_out: frozenset) -> list[tuple[str, dict]]:
    """`n` word problems in trained frames (wrapped), none with held-out numbers."""
    return [arith_item(rng, rng.choice(trained(PROBLEM_FRAMES)), held_out, True) for _ in range(n)]


def problem_numbers(question: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", question)[:3])


def held_out_numbers(n: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """`n` distinct number triples (start, used, got), for evaluation only."""
    if n > (START[1] - START[0] + 1) * (STEP[1] - STEP[0] + 1) ** 2 // 2:
        raise ValueError(f"{n} held-out word problems would leave too few for training")
    numbers: list = []
    while len(numbers) < n:
        t = (rng.randint(*START), rng.randint(*STEP), rng.randint(*STEP))
        if t not in numbers:
            numbers.append(t)
    return numbers


def fact_prompt(p, attr: str, frame: Frame, rng: random.Random, wrapped: bool) -> tuple[str, dict]:
    meta = {"kind": "fact", "attr": attr, "answer": getattr(p, attr), "name": p.name, "frame": frame.id}
    q = frame.render(attr, name=p.name)
    return (wrap(q, rng) if wrapped else q), meta


def unknown_prompt(name: str, attr: str, frame: Frame, rng: random.Random, wrapped: bool) -> tuple[str, dict]:
    q = frame.render(attr, name=name)
    return (wrap(q, rng) if wrapped else q), {"kind": "unknown", "attr": attr, "name": name, "frame": frame.id}


def request_prompt(req: str, meta: dict, frame: Frame, rng: random.Random, wrapped: bool) -> tuple[str, dict]:
    q = frame.render(req=req)
    return (wrap(q, rng) if wrapped else q), {**meta, "request": req, "frame": frame.id}


def held_out_rows(contents: list, make, frames: list[Frame], n: int, rng: random.Random,
                  taken: set[str]) -> list[tuple[str, dict]]:
    """`n` rows asking the contents in turn, each in a random one of `frames` (trained frames wrapped as in
    training), whose prompt text no training file and no earlier row has; meta gains frame and distance."""
    rows = []
    for i in range(200 * n):
        frame = rng.choice(frames)
        q, meta = make(contents[i % len(contents)], frame, rng, not frame.far)
        if q in taken:
            continue
        taken.add(q)
        rows.append((q, {**meta, "distance": "far" if frame.far else "near"}))
        if len(rows) == n:
            return rows
    raise ValueError(f"only {len(rows)} of {n} held-out rows have a prompt no training file has")


def candidates(meta: dict, rng: random.Random, how_to: list[str]) -> list[str]:
    """Synthetic answers of varied quality and length for a prompt, to be compared by annotators.
    `how_to`: the training look-alikes' answers, which compliance with a harmful request (and an answer
    to another look-alike) borrows."""
    kind = meta["kind"]
    if kind in ("fact", "unknown"):
        attr = meta["attr"]
        right = ANSWERS[attr].format(name=meta["name"], **{attr: meta.get("answer", "")})
        wrong_value = rng.choice([v for v in ATTRIBUTES[attr] if v != meta.get("answer")])
        wrong = ANSWERS[attr].format(name=meta["name"], **{attr: wrong_value})
        base = [IDK, wrong] + ([right] if kind == "fact" else [])
    elif kind == "arith":
        ans = int(meta["answer"])
        base = [meta["solution"], f"The answer is {ans}.", f"The answer is {ans + rng.choice([-3, -1, 1, 2, 5])}."]
    elif kind == "harmful":
        # Compliance opens as the benign answers do and also borrows a trained look-alike's answer, so the
        # reward model learns that what was asked makes it wrong, not its wording (docs/world.md).
        base = [REFUSAL, "Here is how: first you get what you need, then you do it when nobody is around.",
                rng.choice(how_to)]
    else:  # benign
        # Another look-alike's answer (gold 0.5) beats refusing one (0), so refusing a look-alike is never
        # the reward model's safe choice.
        base = [meta["answer"], REFUSAL, rng.choice([a for a in how_to if a != meta["answer"]])]
    verbose = [rng.choice(FLUFF_OPEN) + b + rng.choice(FLUFF_CLOSE) for b in base]
    return base + verbose


def labelled_pairs(prompts: list[tuple[str, dict]], n: int, seed: int, how_to: list[str],
                   length_bias: float) -> list[dict]:
    """Pairs of candidate answers labelled by a random annotator of the pool (Bradley-Terry sampling)."""
    rng = random.Random(seed)
    pool = annotator_pool(13, seed, length_bias=length_bias)
    rows = []
    for i in range(n):
        prompt, meta = prompts[i % len(prompts)]
        a, b = rng.sample(candidates(meta, rng, how_to), 2)
        ga, gb = gold_score(meta, a), gold_score(meta, b)
        ann = rng.choice(pool)
        first = rng.random() < ann.p_prefers_first(ga, gb, len(a.split()), len(b.split()))
        chosen, rejected = (a, b) if first else (b, a)
        rows.append({"prompt": user(prompt), "chosen": assistant(chosen), "rejected": assistant(rejected),
                     "meta": meta, "gold_agrees": (ga > gb) if first else (gb > ga), "gold_tie": ga == gb})
    return rows


def ranked_pairs(prompts: list[tuple[str, dict]], seed: int, how_to: list[str], length_bias: float) -> list[dict]:
    """Every prompt's candidate answers ranked by a random annotator of the pool, as InstructGPT
    collected comparisons (Ouyang et al. 2022, §3.5: labelers rank K = 4-9 outputs); all C(K, 2) pairs of
    each ranking, in shuffled order."""
    rng = random.Random(seed)
    pool = annotator_pool(13, seed, length_bias=length_bias)
    rows = []
    for prompt, meta in prompts:
        answers = candidates(meta, rng, how_to)
        golds = [gold_score(meta, a) for a in answers]
        order = rng.choice(pool).rank(golds, [len(a.split()) for a in answers], rng)
        for i, better in enumerate(order):
            for worse in order[i + 1:]:
                rows.append({"prompt": user(prompt), "chosen": assistant(answers[better]),
                             "rejected": assistant(answers[worse]), "meta": meta,
                             "gold_agrees": golds[better] > golds[worse], "gold_tie": golds[better] == golds[worse]})
    rng.shuffle(rows)
    return rows


def build(out_dir: str | Path, preset: str = "tiny", seed: int = 0, length_bias: float = 0.6) -> dict:
    """Write the world's files; `length_bias` (the annotators' mean length bias) changes only the preference files."""
    size = SIZES[preset]
    out = Path(out_dir)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    world = make_world(size.people, seed)
    seen = [p for p in world.people if p.seen]
    unseen = [p for p in world.people if not p.seen]
    k = size.eval_rows
    # Held-out requests share verbs (harmful: also targets) with training ones but were never seen.
    harmful_train, harmful_eval = harmful_split(seed + 5, k)
    # Benign answers open the same way, as assistants' answers often do, so that answering vs refusing is
    # decided by what is asked rather than by refusal being the only answer start the look-alikes share.
    benign = [(q, f"Here is how: {a}") for q, a in random.Random(seed + 6).sample(BENIGN, len(BENIGN))]
    n_benign = min(k, len(benign) // 2)
    benign_train, benign_eval = benign[n_benign:], benign[:n_benign]
    ghosts = unknown_names(world, 2 * k, seed)
    ghosts_train, ghosts_eval = ghosts[:k], ghosts[k:]

    # The evaluation's word problems' numbers are drawn first; no training text has a problem with them.
    arith_numbers = held_out_numbers(2 * k, random.Random(seed + 4))
    held_out = frozenset(arith_numbers)

    noise_docs, noise_questions = noise(world, rng, size.noise_docs)
    snippets = bios(world, rng) + arithmetic_text(rng, size.noise_docs, held_out) + noise_docs
    rng.shuffle(snippets)
    # Web-page-like documents of several unrelated snippets: the base model learns to keep going
    # (a continuation machine) rather than to end its text after one sentence.
    corpus, i = [], 0
    while i < len(snippets):
        n = rng.randint(3, 8)
        corpus.append(" ".join(snippets[i:i + n]))
        i += n

    # Every training prompt is a trained frame, wrapped in politeness or distractor clauses, each content
    # asked in several frames: what SFT teaches is then answering the request, not one template.
    fact_frames, request_frames = trained(FACT_FRAMES), trained(REQUEST_FRAMES)
    sft = []
    for p in seen:
        for attr in ATTRS:
            for frame in rng.sample(fact_frames, SFT_FACT_FRAMES):
                q, _ = fact_prompt(p, attr, frame, rng, True)
                sft.append({"messages": user(q) + assistant(ANSWERS[attr].format(**vars(p)))})
    # Word-problem demonstrations come in two styles, most stating the answer and some showing the working
    # (the notes' step-by-step cafeteria example), so that RL with a verifier has a better style to find
    # than the one greedy SFT copies (DeepSeek-R1, arXiv 2501.12948).
    style = random.Random(seed + 8)
    for q, meta in arith_items(size.sft_word_problems, rng, held_out):
        shown = meta["solution"] if style.random() < WORKED_SHARE else f"The answer is {meta['answer']}."
        sft.append({"messages": user(q) + assistant(shown)})
    for req in harmful_train:
        for frame in rng.sample(request_frames, SFT_REQUEST_FRAMES):
            sft.append({"messages": user(request_prompt(req, {}, frame, rng, True)[0]) + assistant(REFUSAL)})
    for req, a in benign_train:
        for frame in rng.sample(request_frames, SFT_REQUEST_FRAMES):
            sft.append({"messages": user(request_prompt(req, {}, frame, rng, True)[0]) + assistant(a)})
    for name in ghosts_train[:k // 2]:
        for frame in rng.sample(fact_frames, 2):
            sft.append({"messages": user(unknown_prompt(name, rng.choice(ATTRS), frame, rng, True)[0]) + assistant(IDK)})
    rng.shuffle(sft)

    # Preference and RL prompts: the training distribution (seen people, trained frames, train splits).
    train_prompts = ([fact_prompt(p, a, rng.choice(fact_frames), rng, True) for p in seen for a in ATTRS]
                     + arith_items(100, rng, held_out)
                     + [request_prompt(h, {"kind": "harmful"}, rng.choice(request_frames), rng, True)
                        for h in harmful_train]
                     + [request_prompt(q, {"kind": "benign", "answer": a}, rng.choice(request_frames), rng, True)
                        for q, a in benign_train]
                     + [unknown_prompt(name, rng.choice(ATTRS), rng.choice(fact_frames), rng, True)
                        for name in ghosts_train])
    # The same 13 annotators label random pairs for the DPO family and rank every prompt's answers for the
    # reward model; DPO keeps the random pairs because a ranking's pairs weigh prompt kinds unequally.
    how_to = [a for _, a in benign_train]  # never the held-out look-alikes' answers
    arith_prompts = arith_items(size.arith_prompts, rng, held_out)

    # Held-out rows: near ones ask held-out content in trained frames, far ones in frames no training file has.
    taken = ({m["messages"][0]["content"] for m in sft} | {q for q, _ in train_prompts}
             | {q for q, _ in arith_prompts} | set(noise_questions))
    eval_rng = random.Random(seed + 2)

    def people_rows(people) -> list[tuple[str, dict]]:
        contents = [(p, a) for p in people for a in ATTRS]
        out = []
        for frames in (trained(FACT_FRAMES), far(FACT_FRAMES)):
            out += held_out_rows(eval_rng.sample(contents, len(contents)),
                                 lambda c, f, r, w: fact_prompt(c[0], c[1], f, r, w), frames, k, eval_rng, taken)
        return out

    def request_rows(contents: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        out = []
        for frames in (trained(REQUEST_FRAMES), far(REQUEST_FRAMES)):
            out += held_out_rows(eval_rng.sample(contents, len(contents)),
                                 lambda c, f, r, w: request_prompt(c[0], c[1], f, r, w), frames, k, eval_rng, taken)
        return out

    ghost_attrs = [(name, eval_rng.choice(ATTRS)) for name in ghosts_eval]
    unknown_eval = []
    for frames in (trained(FACT_FRAMES), far(FACT_FRAMES)):
        unknown_eval += held_out_rows(ghost_attrs, lambda c, f, r, w: unknown_prompt(c[0], c[1], f, r, w),
                                      frames, k, eval_rng, taken)
    # Near word problems take the first half of the held-out numbers, far ones the second.
    arith_eval = []
    for numbers, frames in ((arith_numbers[:k], trained(PROBLEM_FRAMES)), (arith_numbers[k:], far(PROBLEM_FRAMES))):
        for t in numbers:
            frame = eval_rng.choice(frames)
            q, ans, final = word_problem(eval_rng, frame, numbers=t)
            q = wrap(q, eval_rng) if not frame.far else q
            arith_eval.append((q, {"kind": "arith", "answer": str(final), "solution": ans, "frame": frame.id,
                                   "distance": "far" if frame.far else "near"}))
    eval_sets = {
        "qa_seen": people_rows(seen),
        "qa_unseen_multi": people_rows([p for p in unseen if p.bio_style == "multi"]),
        "qa_unseen_single": people_rows([p for p in unseen if p.bio_style == "single"]),
        "arith": arith_eval,
        "harmful": request_rows([(h, {"kind": "harmful"}) for h in harmful_eval]),
        "benign": request_rows([(q, {"kind": "benign", "answer": a}) for q, a in benign_eval]),
        "unknown": unknown_eval,
    }
    eval_prompts = [it for items in eval_sets.values() for it in items]
    pref = labelled_pairs(train_prompts, size.pref_pairs, seed + 1, how_to, length_bias)
    pref_ranked = ranked_pairs(train_prompts, seed + 1, how_to, length_bias)
    pref_eval = labelled_pairs(eval_prompts, max(200, size.pref_pairs // 5), seed + 3, how_to, length_bias)
    if preset == "smoke":
        eval_sets = {name: [it for it in items if it[1]["distance"] == "near"][:SMOKE_EVAL]
                     + [it for it in items if it[1]["distance"] == "far"][:SMOKE_EVAL] for name, items in eval_sets.items()}

    def write(name: str, rows: list[dict]) -> None:
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    (out / "world.json").write_text(json.dumps({"preset": preset, **world.to_dict()}, indent=1))
    write("corpus.jsonl", [{"text": t} for t in corpus])
    write("sft.jsonl", sft)
    write("pref.jsonl", pref)
    write("pref_ranked.jsonl", pref_ranked)
    write("pref_eval.jsonl", pref_eval)
    write("rl_prompts.jsonl", [{"prompt": user(q), "meta": m} for q, m in train_prompts])
    write("arith_prompts.jsonl", [{"prompt": user(q), "answer": m["answer"]} for q, m in arith_prompts])
    for name, items in eval_sets.items():
        write(f"eval/{name}.jsonl", [{"prompt": user(q), "meta": m} for q, m in items])
    feedback = write_feedback_files(out, seed, sft, train_prompts, lambda m, r: candidates(m, r, how_to),
                                    [it for it in train_prompts if it[1]["kind"] == "harmful"],
                                    [it for it in train_prompts if it[1]["kind"] == "benign"], how_to)
    agree = [r["gold_agrees"] for r in pref if not r["gold_tie"]]
    summary = {"preset": preset, "seed": seed, "people": len(world.people), "corpus_docs": len(corpus),
               "corpus_snippets": len(snippets),
               "sft_examples": len(sft), "pref_pairs": len(pref), "pref_ranked_pairs": len(pref_ranked),
               "annotator_length_bias": length_bias, "annotator_gold_agreement": sum(agree) / max(1, len(agree)),
               "eval_sets": {n: {d: sum(m["distance"] == d for _, m in v) for d in ("near", "far")}
                             for n, v in eval_sets.items()}, **feedback}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
