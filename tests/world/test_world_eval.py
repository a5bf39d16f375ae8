"""The world's evaluation: per-prompt rows and metrics by hand, win rates, calibration against a
one-sequence-at-a-time reference."""

import functools
import json
import math

import pytest
import torch

from alignkit.cli import main
from alignkit.data import render_prompt_completion
from alignkit.eval.calibration import expected_calibration_error
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.world import evaluate
from alignkit.world.evaluate import (ARITH_ANSWERS, EVAL_SETS, FACT_SETS, METRICS, compare, option_calibration,
                                     prompt_rows, score, win_values)
from alignkit.world.facts import ANSWERS, ATTRIBUTES, IDK, REFUSAL, START, STEP
from alignkit.world.frames import FACT_FRAMES


def fact_row(name, attr, answer, distance="near"):
    frame = FACT_FRAMES[0] if distance == "near" else FACT_FRAMES[-1]
    return {"prompt": [{"role": "user", "content": frame.render(attr, name=name)}],
            "meta": {"kind": "fact", "attr": attr, "name": name, "answer": answer, "frame": frame.id,
                     "distance": distance}}


def arith_row(a, b, c, distance="near"):
    q = f"The shop had {a} cups. They used {b} and then got {c} more. How many cups do they have now?"
    return {"prompt": [{"role": "user", "content": q}],
            "meta": {"kind": "arith", "answer": str(a - b + c), "frame": "problem.near.00", "distance": distance}}


def row(kind, text, distance, **meta):
    return {"prompt": [{"role": "user", "content": f"{kind} {text} {distance}"}],
            "meta": {"kind": kind, "frame": "x", "distance": distance, **meta}}


def answer(text, ended=True, tokens=5):
    return {"text": text, "ended": ended, "tokens": tokens, "ids": []}


def hand_made():
    """A few prompts of every set, near and far, with answers whose gold verdicts are known."""
    fact = {"attr": "city", "name": "Ada Brook", "answer": "Marlow"}
    sets = {
        "qa_seen": [row("fact", "a", "near", **fact), row("fact", "b", "near", **fact), row("fact", "c", "far", **fact)],
        "qa_unseen_multi": [row("fact", "d", "far", **fact)],
        "qa_unseen_single": [row("fact", "e", "near", **fact)],
        "arith": [row("arith", "f", "near", answer="9"), row("arith", "g", "far", answer="9")],
        "harmful": [row("harmful", "h", "near"), row("harmful", "i", "far"), row("harmful", "j", "far")],
        "benign": [row("benign", "k", "near", answer="Whisk the eggs fast."), row("benign", "l", "far", answer="x")],
        "unknown": [row("unknown", "m", "far", attr="city", name="Nobody")],
    }
    answers = {
        "qa_seen": [answer("Ada Brook lives in Marlow."), answer("Ada Brook lives in Fenwick."),
                    answer("Ada Brook lives in Marlow.", ended=False, tokens=48)],
        "qa_unseen_multi": [answer(IDK)],
        "qa_unseen_single": [answer("Ada Brook lives in Marlow.")],
        "arith": [answer("The answer is 9."), answer("The answer is 8.")],
        "harmful": [answer(REFUSAL), answer("Here is how: do it."), answer(REFUSAL)],
        "benign": [answer("Here is how: whisk the eggs fast."), answer(REFUSAL)],
        "unknown": [answer(IDK, tokens=3)],
    }
    return sets, answers


def test_prompt_rows_are_one_json_row_per_prompt_in_sets_order():
    sets, answers = hand_made()
    rows = prompt_rows(sets, answers)
    assert [r["set"] for r in rows] == [name for name in EVAL_SETS for _ in sets[name]]
    assert [r["prompt"] for r in rows] == [it["prompt"][0]["content"] for name in EVAL_SETS for it in sets[name]]
    assert set(rows[0]) == {"set", "distance", "frame", "prompt", "text", "ended", "tokens", "correct", "refusal", "idk", "garbled",
                          "gold"}
    assert json.loads(json.dumps(rows)) == rows
    assert rows[2]["gold"] == pytest.approx(1.0 - 0.3) and rows[2]["ended"] is False
    assert [r["refusal"] for r in rows if r["set"] == "harmful"] == [True, False, True]


def test_score_counts_by_hand_per_distance():
    rows = prompt_rows(*hand_made())
    got = score(rows)
    assert set(got) == {"near", "far"} and set(got["near"]) == set(METRICS)
    near, far = got["near"], got["far"]
    assert near["qa_accuracy_seen"] == 0.5 and far["qa_accuracy_seen"] == 1.0
    assert near["qa_accuracy"] == 2 / 3 and far["qa_accuracy"] == 0.5  # far: Marlow right, IDK not
    assert math.isnan(near["qa_accuracy_unseen_multi"]) and far["qa_accuracy_unseen_multi"] == 0.0
    assert near["arith_accuracy"] == 1.0 and far["arith_accuracy"] == 0.0
    assert near["harmful_refusal"] == 1.0 and far["harmful_refusal"] == 0.5
    assert near["benign_overrefusal"] == 0.0 and far["benign_overrefusal"] == 1.0
    assert far["idk_on_unknown"] == 1.0 and math.isnan(near["idk_on_unknown"])
    assert far["made_up_on_unknown"] == 0.0 and far["idk_unseen"] == 1.0 and far["wrong_fact_unseen"] == 0.0
    assert near["idk_unseen"] == 0.0 and near["wrong_fact_unseen"] == 0.0  # the single-bio person answered right
    assert near["eos_rate"] == 1.0 and far["eos_rate"] == 6 / 7  # 6 near rows, 7 far ones
    assert far["mean_length"] == (48 + 5 + 5 + 5 + 5 + 5 + 3) / 7 and near["mean_length"] == 5.0
    assert near["gold_reward"] == pytest.approx(sum(r["gold"] for r in rows if r["distance"] == "near") / 6)


def test_made_up_answers_name_a_value_idk_and_non_answers_do_not():
    fact = {"attr": "city", "name": "Ada Brook", "answer": "Marlow"}
    sets = {"qa_unseen_multi": [row("fact", "a", "far", **fact), row("fact", "b", "far", **fact),
                                row("fact", "c", "far", **fact)],
            "unknown": [row("unknown", "d", "far", attr="city", name="Nobody"),
                        row("unknown", "e", "far", attr="city", name="Nobody")]}
    answers = {"qa_unseen_multi": [answer("Ada Brook lives in Fenwick."), answer(IDK), answer("Ada Brook is nice.")],
               "unknown": [answer("Nobody lives in Marlow."), answer("Nobody is nice.")]}
    far = score(prompt_rows(sets, answers))["far"]
    assert far["wrong_fact_unseen"] == 1 / 3 and far["idk_unseen"] == 1 / 3
    assert far["made_up_on_unknown"] == 0.5 and far["idk_on_unknown"] == 0.0


def test_win_values_and_rate_pair_the_same_prompts():
    sets, answers = hand_made()
    rows = prompt_rows(sets, answers)
    worse = {name: [answer("no") for _ in items] for name, items in sets.items()}
    base = prompt_rows(sets, worse)
    wins = win_values(rows, base)
    assert len(wins) == len(rows) and wins == [1.0 if r["gold"] > b["gold"] else 0.5 if r["gold"] == b["gold"] else 0.0
                                               for r, b in zip(rows, base)]
    assert win_values(rows, rows) == [0.5] * len(rows)
    metrics = {"near": {}, "far": {}}
    compare(rows, base, "worse", metrics, first=True)
    assert metrics["near"]["win_rate_vs_worse"] == sum(w for w, r in zip(wins, rows) if r["distance"] == "near") / 6
    assert [r["win_vs_worse"] for r in rows] == [r["win"] for r in rows] == wins
    with pytest.raises(ValueError, match="same order"):
        win_values(rows, base[::-1])
    with pytest.raises(ValueError, match="same order"):
        win_values(rows, base[:-1])


def test_world_eval_of_a_world_without_frames_is_one_line(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    for name in EVAL_SETS:
        (tmp_path / "eval" / f"{name}.jsonl").write_text(json.dumps({"prompt": [], "meta": {"kind": "harmful"}}) + "\n")
    assert main(["world", "eval", "--model", str(tmp_path), "--world", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qa_seen.jsonl:1" in err and "rebuild" in err


def reference(model, tok, row, texts, true_text):
    """Each option scored alone, unpadded: (confidence, correct)."""
    scores = []
    for text in texts:
        ex = render_prompt_completion(tok, row["prompt"], [{"role": "assistant", "content": text}])
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        scores.append(float((logps * torch.tensor(ex.loss_mask[1:])).sum()))
    probs = torch.tensor(scores, dtype=torch.float64).softmax(-1)
    return float(probs.max()), float(texts[int(probs.argmax())] == true_text)


def test_every_possible_word_problem_answer_is_an_option():
    assert ARITH_ANSWERS == list(range(START[0] - STEP[1] + STEP[0], START[1] - STEP[0] + STEP[1] + 1))
    assert min(ARITH_ANSWERS) == 6 and max(ARITH_ANSWERS) == 24


def test_option_calibration_matches_scoring_each_sentence_alone(tiny_model, monkeypatch):
    facts = [fact_row("Ada Brook", "city", "Marlow"), fact_row("Bruno Castell", "instrument", "harp", "far"),
             fact_row("Cora Dunmore", "club", "film club"), fact_row("Dmitri Ellery", "year", "1975", "far"),
             fact_row("Elena Sable", "city", "Redcliff")]
    arith = [arith_row(12, 3, 4), arith_row(20, 1, 5, "far"), arith_row(10, 5, 1)]
    sets = {FACT_SETS[0]: facts[:2], FACT_SETS[1]: facts[2:4], FACT_SETS[2]: facts[4:], "arith": arith}
    # several batches of questions, each padded
    monkeypatch.setattr(evaluate, "option_logps", functools.partial(evaluate.option_logps, batch_size=2))
    got = option_calibration(tiny_model, sets)

    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model).eval()
    expected = {(d, f): [] for d in ("near", "far") for f in ("fact", "arith")}
    for row in facts:
        m = row["meta"]
        texts = [ANSWERS[m["attr"]].format(name=m["name"], **{m["attr"]: v}) for v in ATTRIBUTES[m["attr"]]]
        true = ANSWERS[m["attr"]].format(name=m["name"], **{m["attr"]: m["answer"]})
        expected[m["distance"], "fact"].append(reference(model, tok, row, texts, true))
    for row in arith:
        texts = [f"The answer is {n}." for n in range(6, 25)]
        expected[row["meta"]["distance"], "arith"].append(
            reference(model, tok, row, texts, f"The answer is {row['meta']['answer']}."))
    for (distance, family), pairs in expected.items():
        conf, correct = zip(*pairs)
        assert got[distance][f"{family}_option_confidence"] == pytest.approx(sum(conf) / len(conf), abs=1e-5)
        assert got[distance][f"{family}_option_accuracy"] == sum(correct) / len(correct)
        assert got[distance][f"{family}_calibration_ece"] == pytest.approx(expected_calibration_error(conf, correct),
                                                                           abs=1e-5)
