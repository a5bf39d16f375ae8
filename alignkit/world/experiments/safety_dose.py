"""How much safety data SFT needs (the notes: a few hundred safety demonstrations cut harmful output sharply,
while over-refusal lurks; Llama 2, Touvron et al. 2023; Bianchi et al. 2024): SFT on the world's helpful
demonstrations plus 0 to several hundred refusal demonstrations of the training harmful requests, with and
without the benign look-alikes ("how do I kill a Python process"); held-out harmful refusal and benign
over-refusal against the dose, as curves."""

from __future__ import annotations

import random

from alignkit.world.experiments import sft_data

NAME = "safety-dose"
SUMMARY = ("SFT with 0 to 300 refusal demonstrations, with and without benign look-alikes: held-out harmful "
           "refusal and over-refusal against the dose")
MINUTES = {"smoke": 1.5, "tiny": 2.0, "small": 35.0}
ESTIMATED = {"smoke", "small"}
DOSES = (0, 30, 100, 300)
STEPS = {"smoke": 4, "tiny": 250, "small": 800}
HELD_OUT = ("harmful", "benign")


def refusal_demos(data, n: int, seed: int) -> list[dict]:
    """`n` refusal demonstrations of the world's training harmful requests (world build's split), each request
    in turn in a random trained frame, wrapped as SFT's prompts are."""
    import json

    from alignkit.world.build import SIZES, assistant, request_prompt, user
    from alignkit.world.facts import REFUSAL, harmful_split
    from alignkit.world.frames import REQUEST_FRAMES, trained

    world = json.loads((data / "world.json").read_text())
    requests, _ = harmful_split(world["seed"] + 5, SIZES[world["preset"]].eval_rows)
    rng, frames = random.Random(seed), trained(REQUEST_FRAMES)
    order = rng.sample(requests, len(requests))
    return [{"messages": user(request_prompt(order[i % len(order)], {}, rng.choice(frames), rng, True)[0])
             + assistant(REFUSAL)} for i in range(n)]


def label(dose: int, lookalikes: bool) -> str:
    return f"{'lookalikes' if lookalikes else 'no_lookalikes'}_{dose}"


def run(ctx) -> dict:
    data, base = ctx.data(), ctx.base()
    groups = sft_data.by_kind(data)
    helpful = groups["fact"] + groups["arith"] + groups["idk"]
    section: dict = {"doses": list(DOSES)}
    for lookalikes in (True, False):
        for dose in DOSES:
            name = label(dose, lookalikes)
            rows = helpful + refusal_demos(data, dose, ctx.seed) + (groups["benign"] if lookalikes else [])
            path = ctx.derived(NAME, f"{name}.jsonl", sft_data.shuffled(rows, ctx.seed))
            model = sft_data.sft(ctx, f"sft-{name}", base, path, STEPS[ctx.preset])
            section[name] = ctx.evaluate(NAME, name, model, data, sets=HELD_OUT)
    return section


# ---- report -----------------------------------------------------------------------------------------------


def report(section: dict) -> str:
    from alignkit.world.report import fmt

    md = ["SFT on the world's helpful demonstrations plus N refusal demonstrations (the training harmful requests, "
          "each in turn in a random trained frame), with or without the training look-alikes' demonstrations "
          "(as in the world's SFT data); held-out harmful requests and look-alikes, by the gold judge.", "",
          "| refusal demos | harmful refused, near | far | look-alikes refused, near | far "
          "| without look-alikes: harmful refused, near | far | look-alikes refused, near | far |",
          "|---|---|---|---|---|---|---|---|---|"]
    for dose in DOSES:
        cells = []
        for lookalikes in (True, False):
            ev = section.get(label(dose, lookalikes), {})
            for metric in ("harmful_refusal", "benign_overrefusal"):
                cells += [fmt(ev.get(d, {}).get(metric)) for d in ("near", "far")]
        md.append(f"| {dose} | " + " | ".join(cells) + " |")
    return "\n".join(md + [""])
