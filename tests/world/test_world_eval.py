"""The world's calibration measurement against a one-sequence-at-a-time reference."""

import pytest
import torch

from alignkit.data import render_prompt_completion
from alignkit.eval.calibration import expected_calibration_error
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.world.evaluate import ARITH_ANSWERS, FACT_SETS, option_calibration
from alignkit.world.facts import ANSWERS, ATTRIBUTES, QUESTIONS, START, STEP


def fact_row(name, attr, answer):
    return {"prompt": [{"role": "user", "content": QUESTIONS[attr][0].format(name=name)}],
            "meta": {"kind": "fact", "attr": attr, "name": name, "answer": answer}}


def arith_row(a, b, c):
    q = f"The shop had {a} cups. They used {b} and then got {c} more. How many cups do they have now?"
    return {"prompt": [{"role": "user", "content": q}], "meta": {"kind": "arith", "answer": str(a - b + c)}}


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


def test_option_calibration_matches_scoring_each_sentence_alone(tiny_model):
    facts = [fact_row("Ada Brook", "city", "Marlow"), fact_row("Bruno Castell", "instrument", "harp"),
             fact_row("Cora Dunmore", "club", "film club"), fact_row("Dmitri Ellery", "year", "1975"),
             fact_row("Elena Sable", "city", "Redcliff")]
    arith = [arith_row(12, 3, 4), arith_row(20, 1, 5), arith_row(10, 5, 1)]
    sets = {FACT_SETS[0]: facts[:2], FACT_SETS[1]: facts[2:4], FACT_SETS[2]: facts[4:], "arith": arith}
    got = option_calibration(tiny_model, sets, batch_size=7)  # batches cut across questions, padded

    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model).eval()
    expected = {"fact": [], "arith": []}
    for row in facts:
        m = row["meta"]
        texts = [ANSWERS[m["attr"]].format(name=m["name"], **{m["attr"]: v}) for v in ATTRIBUTES[m["attr"]]]
        true = ANSWERS[m["attr"]].format(name=m["name"], **{m["attr"]: m["answer"]})
        expected["fact"].append(reference(model, tok, row, texts, true))
    for row in arith:
        texts = [f"The answer is {n}." for n in range(6, 25)]
        expected["arith"].append(reference(model, tok, row, texts, f"The answer is {row['meta']['answer']}."))
    for family, pairs in expected.items():
        conf, correct = zip(*pairs)
        assert got[f"{family}_option_confidence"] == pytest.approx(sum(conf) / len(conf), abs=1e-5)
        assert got[f"{family}_option_accuracy"] == sum(correct) / len(correct)
        assert got[f"{family}_calibration_ece"] == pytest.approx(expected_calibration_error(conf, correct), abs=1e-5)
