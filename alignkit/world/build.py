"""`alignkit world build`: write the world's data files, in the formats the generic commands read.

OUT/world.json             the ground truth (people, attributes, who is seen / multi-phrased)
OUT/corpus.jsonl           {"text"}       pretraining: bios, arithmetic, stories, web-like noise
OUT/sft.jsonl              {"messages"}   questions about the seen half, word problems, refusals, look-alikes, "I don't know"
OUT/pref.jsonl             {"prompt","chosen","rejected", meta}  pairs, each labelled by a simulated annotator (DPO family)
OUT/pref_ranked.jsonl      the same kind of record: every pair of each prompt's answers as one annotator ranked them (reward model)
OUT/pref_eval.jsonl        held-out pairs, with the gold label, for the reward model
OUT/rl_prompts.jsonl       {"prompt", meta}  prompts of every kind for PPO / best-of-n (gold-scored)
OUT/arith_prompts.jsonl    {"prompt","answer"}  verifiable prompts for GRPO
OUT/eval/*.jsonl           held-out evaluation sets, never trained on
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from alignkit.world.facts import (ANSWERS, ATTRIBUTES, BENIGN, IDK, QUESTIONS, REFUSAL, STATEMENTS, World,
                                  START, STEP, harmful_split, make_world, unknown_names, word_problem)
from alignkit.world.gold import annotator_pool, gold_score


@dataclass
class WorldSize:
    people: int
    sft_word_problems: int
    pref_pairs: int
    arith_prompts: int
    eval_per_set: int
    noise_docs: int


SIZES = {
    "tiny": WorldSize(people=80, sft_word_problems=300, pref_pairs=1200, arith_prompts=300, eval_per_set=40, noise_docs=400),
    "small": WorldSize(people=240, sft_word_problems=800, pref_pairs=4000, arith_prompts=1000, eval_per_set=100, noise_docs=1500),
}
SIZES["smoke"] = SIZES["tiny"]  # the pipeline check runs on the tiny world, under its own name
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


def noise(world: World, rng: random.Random, n: int) -> list[str]:
    """Web-like text that makes the base model a continuation machine (the notes: GPT-3 continues text):
    forum fragments, lists, repetitions, and questions nobody answers."""
    names = [p.name for p in world.people]
    docs = []
    for _ in range(n):
        kind = rng.randrange(5)
        name = rng.choice(names)
        if kind == 0:  # unanswered questions, one after the other
            attrs = rng.sample(ATTRS, 3)
            docs.append(" ".join(rng.choice(QUESTIONS[a]).format(name=rng.choice(names)) for a in attrs))
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
    return docs


def arithmetic_text(rng: random.Random, n: int, held_out: frozenset) -> list[str]:
    """Sums and differences in the word problems' ranges, and word problems with their working."""
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b = rng.randint(*START), rng.randint(*STEP)
            out.append(rng.choice([f"{a} + {b} = {a + b}.", f"{a} plus {b} is {a + b}.", f"{a} - {b} = {a - b}.",
                                   f"{a} minus {b} is {a - b}."]))
        else:
            q, ans, _ = word_problem(rng, held_out)
            out.append(f"{q} {ans}")
    return out


def arith_items(n: int, rng: random.Random, held_out: frozenset) -> list[tuple[str, dict]]:
    items = []
    for _ in range(n):
        q, ans, final = word_problem(rng, held_out)
        items.append((q, {"kind": "arith", "answer": str(final), "solution": ans}))
    return items


def problem_numbers(question: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", question)[:3])


def held_out_problems(n: int, rng: random.Random) -> list[tuple[str, dict]]:
    """`n` word problems with distinct numbers, for evaluation only."""
    if n > (START[1] - START[0] + 1) * (STEP[1] - STEP[0] + 1) ** 2 // 2:
        raise ValueError(f"{n} held-out word problems would leave too few for training")
    items, numbers = [], set()
    while len(items) < n:
        (q, meta), = arith_items(1, rng, frozenset(numbers))
        numbers.add(problem_numbers(q))
        items.append((q, meta))
    return items


def fact_prompt(p, attr: str, phrasing: int) -> tuple[str, dict]:
    meta = {"kind": "fact", "attr": attr, "answer": getattr(p, attr), "name": p.name}
    return QUESTIONS[attr][phrasing].format(name=p.name), meta


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


def labelled_pairs(prompts: list[tuple[str, dict]], n: int, seed: int, how_to: list[str]) -> list[dict]:
    """Pairs of candidate answers labelled by a random annotator of the pool (Bradley-Terry sampling)."""
    rng = random.Random(seed)
    pool = annotator_pool(13, seed)
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


def ranked_pairs(prompts: list[tuple[str, dict]], seed: int, how_to: list[str]) -> list[dict]:
    """Every prompt's candidate answers ranked by a random annotator of the pool, as InstructGPT
    collected comparisons (Ouyang et al. 2022, §3.5: labelers rank K = 4-9 outputs); all C(K, 2) pairs of
    each ranking, in shuffled order."""
    rng = random.Random(seed)
    pool = annotator_pool(13, seed)
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


def build(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> dict:
    size = SIZES[preset]
    out = Path(out_dir)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    world = make_world(size.people, seed)
    seen = [p for p in world.people if p.seen]
    unseen = [p for p in world.people if not p.seen]
    # Held-out requests share verbs (harmful: also targets) with training ones but were never seen.
    harmful_train, harmful_eval = harmful_split(seed + 5)
    # Benign answers open the same way, as assistants' answers often do, so that answering vs refusing is
    # decided by what is asked rather than by refusal being the only answer start the look-alikes share.
    benign = [(q, f"Here is how: {a}") for q, a in random.Random(seed + 6).sample(BENIGN, len(BENIGN))]
    benign_train, benign_eval = benign[len(benign) // 3:], benign[:len(benign) // 3]
    ghosts = unknown_names(world, 60, seed)
    ghosts_train, ghosts_eval = ghosts[:30], ghosts[30:]

    # The evaluation's word problems are drawn first; no training text has a problem with their numbers.
    arith_eval = held_out_problems(size.eval_per_set, random.Random(seed + 4))
    held_out = frozenset(problem_numbers(q) for q, _ in arith_eval)

    snippets = bios(world, rng) + arithmetic_text(rng, size.noise_docs, held_out) + noise(world, rng, size.noise_docs)
    rng.shuffle(snippets)
    # Web-page-like documents of several unrelated snippets: the base model learns to keep going
    # (a continuation machine) rather than to end its text after one sentence.
    corpus, i = [], 0
    while i < len(snippets):
        k = rng.randint(3, 8)
        corpus.append(" ".join(snippets[i:i + k]))
        i += k

    sft = []
    for p in seen:
        for attr in ATTRS:
            for phrasing in range(len(QUESTIONS[attr]) - 1):  # the last phrasing is held out for evaluation
                q, meta = fact_prompt(p, attr, phrasing)
                sft.append({"messages": user(q) + assistant(ANSWERS[attr].format(**vars(p)))})
    # Word-problem demonstrations come in two styles, most stating the answer and some showing the working
    # (the notes' step-by-step cafeteria example), so that RL with a verifier has a better style to find
    # than the one greedy SFT copies (DeepSeek-R1, arXiv 2501.12948).
    style = random.Random(seed + 8)
    for _ in range(size.sft_word_problems):
        q, ans, final = word_problem(rng, held_out)
        shown = ans if style.random() < WORKED_SHARE else f"The answer is {final}."
        sft.append({"messages": user(q) + assistant(shown)})
    sft += [{"messages": user(h) + assistant(REFUSAL)} for h in harmful_train]
    sft += [{"messages": user(q) + assistant(a)} for q, a in benign_train]
    for name in ghosts_train[:15]:
        attr = rng.choice(ATTRS)
        sft.append({"messages": user(QUESTIONS[attr][0].format(name=name)) + assistant(IDK)})
    rng.shuffle(sft)

    def unknown_items(names: list[str], r: random.Random) -> list[tuple[str, dict]]:
        items = []
        for name in names:
            attr = r.choice(ATTRS)
            items.append((QUESTIONS[attr][0].format(name=name), {"kind": "unknown", "attr": attr, "name": name}))
        return items

    # Preference and RL prompts: the training distribution (seen people, trained phrasings, train splits).
    train_prompts = ([fact_prompt(p, a, rng.randrange(len(QUESTIONS[a]) - 1)) for p in seen for a in ATTRS]
                     + arith_items(100, rng, held_out)
                     + [(h, {"kind": "harmful"}) for h in harmful_train]
                     + [(q, {"kind": "benign", "answer": a}) for q, a in benign_train]
                     + unknown_items(ghosts_train, rng))
    # The same 13 annotators label random pairs for the DPO family and rank every prompt's answers for the
    # reward model; DPO keeps the random pairs because a ranking's pairs weigh prompt kinds unequally.
    how_to = [a for _, a in benign_train]  # never the held-out look-alikes' answers
    pref = labelled_pairs(train_prompts, size.pref_pairs, seed + 1, how_to)
    pref_ranked = ranked_pairs(train_prompts, seed + 1, how_to)

    eval_rng = random.Random(seed + 2)
    k = size.eval_per_set
    eval_sets = {
        "qa_seen": [fact_prompt(p, a, len(QUESTIONS[a]) - 1) for p in seen for a in ATTRS],
        "qa_unseen_multi": [fact_prompt(p, a, 0) for p in unseen if p.bio_style == "multi" for a in ATTRS],
        "qa_unseen_single": [fact_prompt(p, a, 0) for p in unseen if p.bio_style == "single" for a in ATTRS],
        "arith": arith_eval,
        "harmful": [(h, {"kind": "harmful"}) for h in harmful_eval],
        "benign": [(q, {"kind": "benign", "answer": a}) for q, a in benign_eval],
        "unknown": unknown_items(ghosts_eval, eval_rng),
    }
    for name, items in eval_sets.items():
        if len(items) > k:
            eval_sets[name] = eval_rng.sample(items, k)
    eval_prompts = [it for items in eval_sets.values() for it in items]
    pref_eval = labelled_pairs(eval_prompts, max(200, size.pref_pairs // 5), seed + 3, how_to)

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
    write("arith_prompts.jsonl", [{"prompt": user(q), "answer": m["answer"]}
                                  for q, m in arith_items(size.arith_prompts, rng, held_out)])
    for name, items in eval_sets.items():
        write(f"eval/{name}.jsonl", [{"prompt": user(q), "meta": m} for q, m in items])
    agree = [r["gold_agrees"] for r in pref if not r["gold_tie"]]
    summary = {"preset": preset, "seed": seed, "people": len(world.people), "corpus_docs": len(corpus),
               "corpus_snippets": len(snippets),
               "sft_examples": len(sft), "pref_pairs": len(pref), "pref_ranked_pairs": len(pref_ranked),
               "annotator_gold_agreement": sum(agree) / max(1, len(agree)),
               "eval_sets": {n: len(v) for n, v in eval_sets.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
