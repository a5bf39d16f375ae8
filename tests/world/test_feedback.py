"""The world's AI-feedback files and what the rlaif, cai and self-reward experiments compute from stage outputs
(hand-made rows); the experiments end to end on the smoke preset are a slow test."""

import json

import pytest

from alignkit.judge import DEFAULT_LABELS, Template, default_template
from alignkit.world.evaluate import load_eval_sets
from alignkit.world.experiments import EXPERIMENTS, cai, rlaif, self_reward
from alignkit.world.facts import REFUSAL
from alignkit.world.feedback import CONSTITUTION, CRITIQUE_HARMFUL, score_label
from alignkit.world.gold import gold_score


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_feedback_files_use_training_prompts_only(world_dir):
    held_out = {r["prompt"][0]["content"] for rs in load_eval_sets(world_dir).values() for r in rs}
    eft, helpful, red = (rows(world_dir / f) for f in ("eft.jsonl", "sft_helpful.jsonl", "red_team.jsonl"))
    texts = " ".join(m["content"] for r in eft + helpful for m in r["messages"])
    assert not any(q in texts for q in held_out)
    assert not {r["prompt"][0]["content"] for r in red} & held_out


def test_judgement_demonstrations_carry_the_gold_label_in_both_orders(world_dir):
    pairwise = [r for r in rows(world_dir / "eft.jsonl") if r["messages"][1]["content"] in DEFAULT_LABELS]
    pointwise = [r for r in rows(world_dir / "eft.jsonl") if r["messages"][1]["content"] not in DEFAULT_LABELS]
    assert len(pairwise) == 600 and len(pointwise) == 300
    # consecutive demonstrations are one pair in both orders: opposite labels
    assert all(a["messages"][1]["content"] != b["messages"][1]["content"] for a, b in zip(pairwise[::2], pairwise[1::2]))
    template = Template(default_template("pairwise"))
    assert pairwise[0]["messages"][0]["content"].startswith(template.path.read_text().split("{%")[0].split("?")[0])
    assert {r["messages"][1]["content"] for r in pointwise} <= {"1", "2", "3", "4", "5"}
    assert score_label(1.0) == "5" and score_label(0.0) == "1" and score_label(-0.5) == "1" and score_label(0.5) == "3"


def test_helpful_only_sft_has_no_refusal_but_the_constitutions_demonstrations(world_dir):
    helpful = rows(world_dir / "sft_helpful.jsonl")
    sft = rows(world_dir / "sft.jsonl")
    assert not any(r["messages"][1]["content"] == REFUSAL and len(r["messages"]) == 2 for r in helpful)
    assert len([r for r in helpful if len(r["messages"]) == 2]) == len([r for r in sft if r["messages"][1]["content"] != REFUSAL]) + 96
    chains = [r for r in helpful if len(r["messages"]) == 6]
    requests = {c["critique"] for c in CONSTITUTION["critiques"]}
    assert chains and all(r["messages"][2]["content"] in requests for r in chains)
    harmful = [r for r in chains if r["messages"][3]["content"] == CRITIQUE_HARMFUL]
    assert harmful and all(r["messages"][5]["content"] == REFUSAL for r in harmful)
    # the red-team prompts are the other half of the training harmful requests: none was demonstrated
    demonstrated = {r["messages"][0]["content"] for r in chains}
    red = rows(world_dir / "red_team.jsonl")
    assert not {r["prompt"][0]["content"] for r in red if r["meta"]["kind"] == "harmful"} & demonstrated
    assert {r["meta"]["kind"] for r in red} == {"harmful", "benign"}


def pair(chosen, rejected, meta, gold_agrees, gold_tie=False, **judge):
    return {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "meta": meta, "gold_agrees": gold_agrees,
            "gold_tie": gold_tie, **judge}


def test_rlaif_label_quality_by_hand():
    meta = {"kind": "harmful"}
    summary = {"first_position_win_rate": 0.6, "order_flip_rate": 0.2, "label_mass": 0.9, "seconds": 1.0}
    judged = [
        pair(REFUSAL, "Here is how.", meta, True, judge_prob=0.9),  # annotator right, judge agrees
        pair("Here is how.", REFUSAL, meta, False, judge_prob=0.2),  # annotator wrong, judge disagrees: right
        pair("Here is how.", REFUSAL, meta, False, judge_prob=0.5, judge_tie=True),  # a judge tie counts half
        pair(REFUSAL + " Thank you very much.", REFUSAL, meta, False, gold_tie=True, judge_prob=0.7),  # longer wins
    ]
    q = rlaif.label_quality(judged, summary)
    assert q["judge_gold_agreement"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert q["annotator_gold_agreement"] == pytest.approx(1 / 3)
    assert q["judge_annotator_agreement"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert q["judge_longer_at_equal_gold"] == 1.0 and q["annotator_longer_at_equal_gold"] == 1.0
    assert q["judge_ties"] == 0.25 and q["first_position_win_rate"] == 0.6
    train = rlaif.ai_pairs(judged)
    assert [r["chosen"][0]["content"] for r in train] == [REFUSAL, REFUSAL, REFUSAL + " Thank you very much."]


def test_rlaif_lists_regroup_the_rankings_and_expand_the_judges():
    a, b, c = ({"role": "assistant", "content": t} for t in ("one", "two", "three"))
    ranked = [{"prompt": "p", "chosen": [a], "rejected": [b], "meta": {}}, {"prompt": "p", "chosen": [b], "rejected": [c], "meta": {}}]
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ranked))
        lists = rlaif.answer_lists(path)
    assert lists == [{"prompt": "p", "completions": [[a], [b], [c]], "meta": {}}]
    # ranked best first; scores in the input order: three (3) > one (2) = two (2)
    judged = [{"prompt": "p", "completions": [[c], [a], [b]], "judge_scores": [2.0, 2.0, 3.0], "meta": {}}]
    pairs = rlaif.ranked_ai_pairs(judged, seed=0)
    assert sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs) == [("three", "one"), ("three", "two")]


def test_ranking_and_self_judge_agreement_with_gold_by_hand(tmp_path):
    meta = {"kind": "harmful"}
    # judge ranks the refusal first (gold 1 > 0 for the compliance): agree; two compliances tie in gold
    lists = [{"completions": [[{"role": "assistant", "content": REFUSAL}], [{"role": "assistant", "content": "Here is how."}],
                              [{"role": "assistant", "content": "Here is how, quickly."}]],
              "judge_scores": [1.0, 4.0, 2.0], "meta": meta}]
    assert rlaif.ranking_gold_agreement(lists) == 1.0
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"meta": meta, "completions": [REFUSAL, "Here is how.", "Here is how."],
                                   "scores": [2.0, 3.0, 1.0], "ended": [True, True, False]}) + "\n")
    j = self_reward.judging(samples)
    # gold: refusal 1.0, compliance 0.0, the unfinished compliance -0.3; pairs (0,1) wrong, (0,2) right, (1,2) right
    assert j["self_judge_gold_agreement"] == pytest.approx(2 / 3)
    assert j["gold_best_minus_worst"] == pytest.approx(gold_score(meta, "Here is how.") - gold_score(meta, "Here is how.", False))
    assert self_reward.garbled("the the the the the the", True) and self_reward.garbled("fine", False)
    assert not self_reward.garbled("Sorry, I can't help with that.", True)


def test_cai_revision_and_pair_quality_by_hand(tmp_path):
    sl = tmp_path / "sl_cai.jsonl"
    sl.write_text("".join(json.dumps({"prompt": [], "completion": [{"role": "assistant", "content": t}], "meta": {"kind": k}}) + "\n"
                          for t, k in ((REFUSAL, "harmful"), ("Here is how.", "harmful"), ("Here is how: run.", "benign"))))
    q = cai.revision_quality(sl, {"revised_differs": 0.5})
    assert q == {"revisions": 3, "harmful_refused": 0.5, "benign_refused": 0.0, "revised_share": 0.5}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}],
                                         "meta": {"kind": "harmful"}}) + "\n"
                             for c, r in ((REFUSAL, "Here is how."), ("Here is how.", REFUSAL), ("Here is how.", "Do it."))))
    p = cai.pair_quality(pairs, {"ties": 1})
    assert p["judge_gold_agreement"] == 0.5 and p["gold_ties"] == pytest.approx(1 / 3) and p["pairs"] == 3


def test_the_feedback_experiments_are_listed():
    assert {"rlaif", "cai", "self-reward"} <= set(EXPERIMENTS)


@pytest.mark.slow
def test_feedback_experiments_run_end_to_end_on_smoke(tmp_path):
    from alignkit.cli import run as cli

    out = tmp_path / "world"
    cli(["world", "run", "--preset", "smoke", "--seeds", "0", "--experiment", "rlaif", "--experiment", "cai",
         "--experiment", "self-reward", "--output", str(out), "--no-progress"])
    results = json.loads((out / "seed-0" / "results.json").read_text())["experiments"]
    assert {"labels", "dpo_ai", "bon_ai", "reward_model"} <= set(results["rlaif"])
    assert {"helpful", "sl_cai", "rl_cai", "chains", "pairs"} <= set(results["cai"])
    assert {"iter1", "iter2", "iter3", "iterations"} <= set(results["self-reward"])
    md = (out / "seed-0" / "report.md").read_text()
    assert "### The AI labels" in md and "| RL-CAI |" in md and "self-judge agrees with gold" in md
