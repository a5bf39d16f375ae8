"""RLAIF in the world (the notes: replace the human labeller by a model; Lee et al. 2023). A world model trained
to judge (SFT with judgement demonstrations, `Context.judge_sft`) labels the same pairs the annotators labelled
and ranks the same answers they ranked; the gold judge, never the labeller, referees. Measured: the AI labels'
agreement with gold and with the annotators, the judge's position bias and its length preference at equal gold
(beside the annotators'), and what the labels train: DPO on AI vs annotator labels, and a reward model on AI vs
annotator rankings used for best-of-n, each judged by gold against SFT."""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignkit.world.experiments.outputs import final_metrics, mean, read_jsonl

NAME = "rlaif"
SUMMARY = ("a world model trained to judge labels the annotators' pairs: its agreement with gold and annotators, "
           "position and length bias, and DPO / reward model + best-of-n on AI vs annotator labels")
MINUTES = {"smoke": 1.5, "tiny": 7.2, "small": 35.0}
ESTIMATED = {"smoke", "small"}
BON_N = 16  # best-of-n samples per prompt for the two reward models





def words(message) -> int:
    return len((message if isinstance(message, str) else message[-1]["content"]).split())


def pick(row: dict) -> float:
    """1 if the judge preferred the row's input chosen answer, 0 if its rejected one, 1/2 for a tie."""
    return 0.5 if row.get("judge_tie") else float(row["judge_prob"] > 0.5)


def label_quality(rows: list[dict], summary: dict) -> dict:
    """The judge's labels (rows judged in the input's orientation, ties kept) against gold and the annotators;
    its and the annotators' preference for the longer answer where gold ties (the same answer with and without
    filler, mostly): 0.5 = length does not sway the label."""
    untied = [r for r in rows if not r["gold_tie"]]
    # the annotator chose `chosen`; gold agreed with that iff gold_agrees
    judge_gold = [p if r["gold_agrees"] else 1 - p for r, p in ((r, pick(r)) for r in untied)]
    equal_gold = [r for r in rows if r["gold_tie"] and words(r["chosen"]) != words(r["rejected"])]
    longer_chosen = [words(r["chosen"]) > words(r["rejected"]) for r in equal_gold]
    return {"pairs": len(rows), "judge_ties": mean(float(bool(r.get("judge_tie"))) for r in rows),
            "judge_gold_agreement": mean(judge_gold), "annotator_gold_agreement": mean(r["gold_agrees"] for r in untied),
            "judge_annotator_agreement": mean(pick(r) for r in rows),
            "judge_longer_at_equal_gold": mean(pick(r) if lc else 1 - pick(r) for r, lc in zip(equal_gold, longer_chosen)),
            "annotator_longer_at_equal_gold": mean(float(lc) for lc in longer_chosen),
            "first_position_win_rate": summary["first_position_win_rate"], "order_flip_rate": summary["order_flip_rate"],
            "label_mass": summary["label_mass"], "judge_seconds": summary["seconds"]}


def ai_pairs(rows: list[dict]) -> list[dict]:
    """Judged rows -> training pairs in the judge's order, its ties left out."""
    out = []
    for r in rows:
        if r.get("judge_tie"):
            continue
        keep = r["judge_prob"] > 0.5
        out.append({"prompt": r["prompt"], "chosen": r["chosen"] if keep else r["rejected"],
                    "rejected": r["rejected"] if keep else r["chosen"], "meta": r["meta"]})
    return out


def answer_lists(ranked_pairs: Path) -> list[dict]:
    """The annotators' ranked pairs regrouped into each prompt's list of distinct answers (what they ranked)."""
    lists: dict[str, dict] = {}
    for r in read_jsonl(ranked_pairs):
        item = lists.setdefault(json.dumps(r["prompt"]), {"prompt": r["prompt"], "completions": [], "meta": r["meta"]})
        for side in ("chosen", "rejected"):
            if r[side] not in item["completions"]:
                item["completions"].append(r[side])
    return list(lists.values())


def ranked_ai_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Every pair of each list the judge ranked (pointwise scores; equal scores give no pair), shuffled as the
    annotators' ranked pairs are."""
    out = []
    for r in rows:
        scores, comps = r["judge_scores"], r["completions"]  # completions ranked best first, scores in input order
        ordered = sorted(scores, reverse=True)
        for i in range(len(comps)):
            for j in range(i + 1, len(comps)):
                if ordered[i] > ordered[j]:
                    out.append({"prompt": r["prompt"], "chosen": comps[i], "rejected": comps[j], "meta": r["meta"]})
    random.Random(seed).shuffle(out)
    return out


def ranking_gold_agreement(rows: list[dict]) -> float:
    """How often the judge's pointwise scores order two answers of a list as gold does (gold ties left out)."""
    from alignkit.world.gold import gold_score

    agree = []
    for r in rows:
        texts = [c[-1]["content"] for c in r["completions"]]
        ordered = sorted(r["judge_scores"], reverse=True)
        golds = [gold_score(r["meta"], t) for t in texts]
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if golds[i] != golds[j]:
                    agree.append(0.5 if ordered[i] == ordered[j] else float(golds[i] > golds[j]))
    return mean(agree)


def run(ctx) -> dict:
    from alignkit.world.evaluate import prompt_rows
    from alignkit.world.experiments.ladder import post_sft_commands, reward_model_eval
    from alignkit.world.experiments.length_bias import (
        best_of_n_answers,
        bon_subset,
        write_rows,
    )

    data, b = ctx.data(), ctx.budget
    sft, judge = ctx.sft(), ctx.judge_sft()
    section: dict = {"sft": ctx.evaluate(NAME, "sft", sft, data),
                     "judge_sft": ctx.evaluate(NAME, "judge_sft", judge, data, baseline="sft")}
    items = ["--max-items", str(b["judge_items"])] if b["judge_items"] >= 0 else []

    def label(stage: str, source: Path, *flags: str) -> Path:
        return ctx.stage(stage, ["judge", "--judge-model", str(judge), "--data", str(source), *items, *flags],
                         [judge, source], seeded=False)

    pairs = label("rlaif-pairs", data / "pref.jsonl", "--no-relabel", "--ties", "mark")
    held_out = label("rlaif-heldout", data / "pref_eval.jsonl", "--no-relabel", "--ties", "mark")
    rows = read_jsonl(pairs / "judged.jsonl")
    section["labels"] = {"train_pairs": label_quality(rows, final_metrics(pairs)),
                         "heldout_pairs": label_quality(read_jsonl(held_out / "judged.jsonl"), final_metrics(held_out))}

    # DPO on the AI's labels beside the ladder's DPO on the annotators' (the same command on other labels)
    ai_pref = ctx.derived(NAME, "pref_ai.jsonl", ai_pairs(rows))
    command, _ = post_sft_commands(ctx, data, sft, None)["dpo"]
    specs = {"dpo": (command, [sft, data / "pref.jsonl"]),
             "dpo_ai": ([str(ai_pref) if a == str(data / "pref.jsonl") else a for a in command], [sft, ai_pref])}
    for name, model in ctx.stages_at_once(specs, ctx.at_once).items():
        section[name] = ctx.evaluate(NAME, name, model, data, baseline="sft")

    # A reward model on the AI's rankings of the answers the annotators ranked, beside theirs; best-of-n with each
    lists = ctx.derived(NAME, "answer_lists.jsonl", answer_lists(data / "pref_ranked.jsonl"))
    ranked = label("rlaif-ranked", lists, "--list-output", "ranked", "--ties", "mark")
    ranked_rows = read_jsonl(ranked / "judged.jsonl")
    section["labels"]["rankings"] = {"judge_gold_agreement": ranking_gold_agreement(ranked_rows),
                                     "lists": len(ranked_rows), "mean_score": final_metrics(ranked)["mean_score"]}
    rm_ai = ctx.reward_model(data, ctx.derived(NAME, "pref_ranked_ai.jsonl", ranked_ai_pairs(ranked_rows, ctx.seed)),
                             label="reward-ai")
    rms = {"annotators": ctx.reward_model(data), "ai": rm_ai}
    section["reward_model"] = {k: ctx.time("eval reward", reward_model_eval, rm, data) for k, rm in rms.items()}
    subset = bon_subset(ctx.sets(data), b["bon_prompts"])
    picks = ctx.time("best-of-n", best_of_n_answers, sft, rms, subset, BON_N, ctx.seed)
    sft_rows = ctx.rows(NAME, "sft")
    for key, answers in picks.items():
        section[f"bon_{key}"] = write_rows(ctx, prompt_rows(subset, answers), f"bon_{key}", sft_rows, NAME)
    section["bon_n"] = BON_N
    return section


# ---- report -----------------------------------------------------------------------------------------------

POLICIES = {"judge_sft": "SFT + judgement demos", "dpo": "DPO, annotator labels", "dpo_ai": "DPO, AI labels",
            "bon_annotators": "best-of-n, annotator RM", "bon_ai": "best-of-n, AI RM"}
COLUMNS = ["win_rate_vs_sft", "gold_reward", "mean_length", "harmful_refusal", "benign_overrefusal", "qa_accuracy_seen"]


def report(section: dict) -> str:
    from alignkit.world.report import fmt, near_far_table

    md = []
    labels = section.get("labels", {})
    if labels:
        md += ["### The AI labels", "",
               "The judge (the world's SFT data plus judgement demonstrations) labels the annotators' training pairs "
               "and the held-out pairs, each asked in both orders. Agreement with gold over pairs gold does not tie "
               "(judge ties count half); `longer at equal gold`: how often the longer answer is preferred where gold "
               "ties (0.5 = no length preference).", "",
               "| pairs | judge agrees with gold | annotators agree with gold | judge agrees with annotators | judge "
               "ties | first-shown wins | order flips verdict | judge: longer at equal gold | annotators: longer at "
               "equal gold |", "|---" * 9 + "|"]
        for key in ("train_pairs", "heldout_pairs"):
            q = labels.get(key)
            if q:
                md.append(f"| {key.replace('_', ' ')} | " + " | ".join(fmt(q.get(c)) for c in (
                    "judge_gold_agreement", "annotator_gold_agreement", "judge_annotator_agreement", "judge_ties",
                    "first_position_win_rate", "order_flip_rate", "judge_longer_at_equal_gold",
                    "annotator_longer_at_equal_gold")) + " |")
        if "rankings" in labels:
            md += ["", f"Pointwise rankings of the annotators' answer lists: the judge orders two answers as gold does "
                       f"{fmt(labels['rankings'].get('judge_gold_agreement'))} of the time."]
        md.append("")
    rms = section.get("reward_model", {})
    if rms:
        md += ["### Reward models on annotator vs AI rankings", "",
               "| rankings by | held-out accuracy | agrees with gold | agrees with gold, knowable pairs |", "|---|---|---|---|"]
        md += [f"| {k} | {fmt(v.get('heldout_accuracy'))} | {fmt(v.get('gold_label_accuracy'))} | "
               f"{fmt(v.get('gold_label_accuracy_knowable'))} |" for k, v in rms.items()]
        md.append("")
    rows = {POLICIES.get(k, k): section[k] for k in ("sft", *POLICIES) if k in section}
    md += ["### What the labels train (gold judge, against SFT)", "",
           f"Best-of-{fmt(section.get('bon_n'), 0) if section.get('bon_n') is not None else ''} picks on a subset of "
           "the held-out prompts.", "", *near_far_table(rows, COLUMNS), ""]
    return "\n".join(md)
