"""The world's calibration measurement against a one-sequence-at-a-time reference."""

import pytest
import torch

from alignkit.data import render_prompt_completion
from alignkit.eval.calibration import expected_calibration_error
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.world.evaluate import FACT_SETS, option_calibration
from alignkit.world.facts import ANSWERS, ATTRIBUTES, QUESTIONS


def fact_row(name, attr, answer):
    return {"prompt": [{"role": "user", "content": QUESTIONS[attr][0].format(name=name)}],
            "meta": {"kind": "fact", "attr": attr, "name": name, "answer": answer}}


def test_option_calibration_matches_scoring_each_sentence_alone(tiny_model):
    rows = [fact_row("Ada Brook", "city", "Marlow"), fact_row("Bruno Castell", "instrument", "harp"),
            fact_row("Cora Dunmore", "club", "film club"), fact_row("Dmitri Ellery", "year", "1975"),
            fact_row("Elena Sable", "city", "Redcliff")]
    sets = {FACT_SETS[0]: rows[:2], FACT_SETS[1]: rows[2:4], FACT_SETS[2]: rows[4:]}
    got = option_calibration(tiny_model, sets, batch_size=7)  # batches cut across questions, padded

    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model).eval()
    conf, correct = [], []
    for row in rows:
        m, scores = row["meta"], []
        for value in ATTRIBUTES[m["attr"]]:
            text = ANSWERS[m["attr"]].format(name=m["name"], **{m["attr"]: value})
            ex = render_prompt_completion(tok, row["prompt"], [{"role": "assistant", "content": text}])
            ids = torch.tensor([ex.input_ids])
            with torch.no_grad():
                logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            scores.append(float((logps * torch.tensor(ex.loss_mask[1:])).sum()))
        probs = torch.tensor(scores, dtype=torch.float64).softmax(-1)
        conf.append(float(probs.max()))
        correct.append(float(ATTRIBUTES[m["attr"]][int(probs.argmax())] == m["answer"]))
    assert got["option_confidence"] == pytest.approx(sum(conf) / len(conf), abs=1e-5)
    assert got["option_accuracy"] == sum(correct) / len(correct)
    assert got["calibration_ece"] == pytest.approx(expected_calibration_error(conf, correct), abs=1e-5)
    assert 1 / 40 <= got["option_confidence"] <= 1
