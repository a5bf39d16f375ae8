"""alignkit judge: the probability arithmetic by hand, label tokens (single and multi-token), templates, and the
command on judges trained in the test to know one rule, or to follow position only."""

import json
import math
import random

import pytest
import torch

from alignkit.cli import run as cli
from alignkit.errors import UserError
from alignkit.judge import (
    LLMJudge,
    Template,
    both_orders,
    bradley_terry_prob,
    default_template,
    expected_score,
    label_probs,
)
from alignkit.logprobs import completion_logps, pack_completions

BAD = "I refuse to say anything."


# ---- arithmetic -----------------------------------------------------------------------------------------------


def test_label_probs_renormalise_over_the_labels():
    p = label_probs(torch.log(torch.tensor([[0.2, 0.6], [0.01, 0.01]], dtype=torch.float64)))
    assert torch.allclose(p, torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64))


def test_both_orders_by_hand():
    # a shown first: P(A) = 0.9; b shown first: P(A) = P(b better) = 0.3 -> P(a better) = (0.9 + 0.7) / 2
    r = both_orders(torch.tensor([0.9, 1.0, 0.8]), torch.tensor([0.3, 1.0, 0.6]))
    assert torch.allclose(r["prob"], torch.tensor([0.8, 0.5, 0.6]))
    assert torch.allclose(r["first"], torch.tensor([0.6, 1.0, 0.7]))
    # a judge that always says "first" flips with the order; the third prefers a shown first, b shown first
    assert r["flip"].tolist() == [0.0, 1.0, 1.0]


def test_expected_score_and_bradley_terry_by_hand():
    logps = torch.log(torch.tensor([[0.1, 0.2, 0.7], [1.0, 1.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(expected_score(logps, torch.tensor([1.0, 2.0, 3.0])),
                          torch.tensor([0.1 + 0.4 + 2.1, (1 + 2 + 6) / 4], dtype=torch.float64))
    assert math.isclose(float(bradley_terry_prob(torch.tensor(1.0), torch.tensor(0.0))), 1 / (1 + math.exp(-1)), rel_tol=1e-6)


# ---- label tokens -------------------------------------------------------------------------------------------


def test_single_token_labels_read_the_next_token_distribution(tiny_model):
    judge = LLMJudge(str(tiny_model))
    assert [len(ids) for ids in judge.label_ids] == [1, 1]
    texts = ["Which is better?\nA: yes\nB: no", "Question: hello"]
    logps, mass = judge.answer_logps(texts, judge.label_ids)
    whole = whole_sequence_logps(judge, texts, judge.label_ids)
    assert torch.allclose(logps, whole, atol=1e-5)
    assert torch.allclose(mass, whole.exp().sum(-1), atol=1e-6) and bool((mass < 1).all())


def test_multi_token_labels_are_scored_as_whole_continuations(tiny_model):
    judge = LLMJudge(str(tiny_model), labels=("Answer one", "Answer two"))
    assert all(len(ids) > 1 for ids in judge.label_ids)
    texts = ["Which is better?", "Pick one of the answers please."]
    logps, _ = judge.answer_logps(texts, judge.label_ids)
    assert torch.allclose(logps, whole_sequence_logps(judge, texts, judge.label_ids), atol=1e-5)


def whole_sequence_logps(judge, texts, answers):
    out = torch.zeros(len(texts), len(answers), dtype=torch.float64)
    for i, t in enumerate(texts):
        prompt = judge.judge_prompt(t)
        batch = pack_completions([prompt] * len(answers), answers, judge.tokenizer.pad_token_id)
        out[i] = completion_logps(judge.model, batch)[0].double()
    return out


def test_labels_that_render_alike_or_scores_that_are_not_numbers_are_errors(tiny_model):
    with pytest.raises(UserError, match="--labels needs two different"):
        LLMJudge(str(tiny_model), labels=("A", "A"))
    with pytest.raises(UserError, match="--scores must be numbers"):
        LLMJudge(str(tiny_model), scores=("low", "high"))


def test_template_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("Question: {{ prompt }\n")
    with pytest.raises(UserError, match=r"bad.jinja:1: template syntax error"):
        Template(bad)
    typo = tmp_path / "typo.jinja"
    typo.write_text("Question: {{ promtp }}")
    with pytest.raises(UserError, match=r"typo.jinja: cannot render: 'promtp' is undefined"):
        Template(typo).render(prompt="x")
    with pytest.raises(UserError, match="no such file"):
        Template(tmp_path / "missing.jinja")


# ---- the command on trained judges ---------------------------------------------------------------------------


def qa(assets, rows):
    for line in (assets / "instructions.jsonl").read_text().splitlines()[rows]:
        user, assistant = (m["content"] for m in json.loads(line)["messages"])
        yield user, assistant


def demos(assets, rows, rule, seed=0):
    """Judgement demonstrations through the default templates: pairwise (the good answer's label, or always
    the first label for the position-only rule) and pointwise (5 for the good answer, 1 for the bad)."""
    rng = random.Random(seed)
    pairwise, pointwise = Template(default_template("pairwise")), Template(default_template("pointwise"))
    out = []
    for q, good in qa(assets, rows):
        good_first = rng.random() < 0.5
        a, b = (good, BAD) if good_first else (BAD, good)
        label = "A" if rule == "position" or good_first else "B"
        text = pairwise.render(prompt=q, answer_a=a, answer_b=b, principle=None, labels=("A", "B"))
        out.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]})
        if rule == "knows":
            for answer, score in ((good, "5"), (BAD, "1")):
                text = pointwise.render(prompt=q, answer=answer, principle=None, scores=("1", "2", "3", "4", "5"))
                out.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": score}]})
    return out


def train_judge(tiny_model, assets, out, rule, steps):
    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demos(assets, slice(0, 300), rule)))
    cli(["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--max-steps", str(steps),
         "--batch-size", "16", "--lr", "3e-3", "--max-length", "128", "--warmup-steps", "5", "--no-progress"])
    return out


@pytest.fixture(scope="module")
def knowing_judge(tiny_model, assets, tmp_path_factory):
    return train_judge(tiny_model, assets, tmp_path_factory.mktemp("judge") / "knows", "knows", 150)


def held_out_pairs(assets, path, swap_every=2):
    """Pairs on questions the judge never saw; every other one labelled the wrong way round."""
    rows = []
    for i, (q, good) in enumerate(qa(assets, slice(300, 380))):
        chosen, rejected = (good, BAD) if i % swap_every else (BAD, good)
        rows.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}], "id": i})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_judge_that_knows_the_rule_relabels_pairs_and_scores_lists(knowing_judge, assets, tmp_path):
    pairs = held_out_pairs(assets, tmp_path / "pairs.jsonl")
    out = tmp_path / "judged.jsonl"
    summary = cli(["judge", "--judge-model", str(knowing_judge), "--data", str(pairs), "--output", str(out),
                   "--no-progress"])
    rows = read(out)
    good_chosen = [r["chosen"][0]["content"] != BAD for r in rows]
    assert len(rows) == 80 and sum(good_chosen) >= 76  # relabelled: the good answer is chosen
    # half the input had the labels the wrong way round: agreement with them is near 1/2
    assert 0.4 <= summary["agreement"] <= 0.6
    assert all(r["judge_prob"] >= 0.5 for r in rows)
    assert summary["order_flip_rate"] <= 0.1 and abs(summary["first_position_win_rate"] - 0.5) < 0.15
    meta = read(tmp_path / "judged.metrics.jsonl")[-1]
    assert meta["final"] and meta["written"] == 80 and (tmp_path / "judged.config.yaml").is_file()
    # the output is dpo data
    from alignkit.data import load_preference
    from alignkit.models import load_tokenizer
    assert len(load_preference([str(out)], load_tokenizer(knowing_judge), 128)[0]) == 80

    lists = tmp_path / "lists.jsonl"
    lists.write_text("".join(json.dumps({"prompt": q, "completions": [BAD, good, BAD + " Sorry."]}) + "\n"
                             for q, good in qa(assets, slice(300, 340))))
    cli(["judge", "--judge-model", str(knowing_judge), "--data", str(lists), "--output", str(tmp_path / "best.jsonl"),
         "--no-progress"])
    best = read(tmp_path / "best.jsonl")
    assert sum(r["chosen"] not in (BAD, BAD + " Sorry.") for r in best) >= 0.9 * len(best)
    assert all(r["score_chosen"] >= r["score_rejected"] and 1 <= r["score_rejected"] <= 5 for r in best)


def test_order_swapping_cancels_a_position_only_judge(tiny_model, assets, tmp_path):
    judge = train_judge(tiny_model, assets, tmp_path / "position", "position", 60)
    pairs = held_out_pairs(assets, tmp_path / "pairs.jsonl")
    out = tmp_path / "judged.jsonl"
    summary = cli(["judge", "--judge-model", str(judge), "--data", str(pairs), "--output", str(out),
                   "--ties", "mark", "--min-confidence", "0.6", "--no-progress"])
    # asked in one order it picks the first answer; both orders averaged, its verdicts are coin flips
    assert summary["first_position_win_rate"] > 0.9 and summary["order_flip_rate"] > 0.9
    rows = read(out)
    assert all(abs(r["judge_prob"] - 0.5) < 0.1 for r in rows) and summary["ties"] == 80
    assert all(r["judge_tie"] and r["judge_agrees"] is None for r in rows)
    assert summary["agreement_ties_half"] == 0.5


def test_the_verdict_does_not_depend_on_the_input_order(knowing_judge, assets, tmp_path):
    pairs = held_out_pairs(assets, tmp_path / "pairs.jsonl")
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in read(pairs)))
    probs = {}
    for name, path in (("pairs", pairs), ("swapped", swapped)):
        out = tmp_path / f"{name}.judged.jsonl"
        cli(["judge", "--judge-model", str(knowing_judge), "--data", str(path), "--output", str(out), "--no-relabel",
             "--no-progress"])
        probs[name] = [r["judge_prob"] for r in read(out)]
    assert all(math.isclose(p, 1 - q, abs_tol=1e-6) for p, q in zip(probs["pairs"], probs["swapped"]))


def test_a_reward_function_stands_in_for_the_judge(assets, tmp_path):
    fn = tmp_path / "longer.py"
    fn.write_text("def words(prompts, completions, **kw):\n"
                  "    return [float(len((c if isinstance(c, str) else c[0]['content']).split())) for c in completions]\n")
    pairs = held_out_pairs(assets, tmp_path / "pairs.jsonl")
    summary = cli(["judge", "--reward", f"{fn}:words", "--data", str(pairs), "--output", str(tmp_path / "j.jsonl"),
                   "--no-progress"])
    assert summary["judge"] == "score" and summary["order_flip_rate"] == 0.0
    assert summary["longer_win_rate"] == 1.0
    rows = read(tmp_path / "j.jsonl")
    assert all(len(r["chosen"][0]["content"].split()) >= len(r["rejected"][0]["content"].split()) for r in rows)
    # scored pointwise, each pair's better-scored answer is chosen
    cli(["judge", "--reward", f"{fn}:words", "--data", str(pairs), "--output", str(tmp_path / "p.jsonl"), "--mode",
         "pointwise", "--no-progress"])
    points = read(tmp_path / "p.jsonl")
    assert points and all(r["score_chosen"] > r["score_rejected"] for r in points)
    assert all(len(r["chosen"][0]["content"].split()) > len(r["rejected"][0]["content"].split()) for r in points)


def test_bad_input_is_one_line(tiny_model, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                     + json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(UserError, match=r"mixed.jsonl:2: a single record among pair records"):
        cli(["judge", "--judge-model", str(tiny_model), "--data", str(mixed), "--output", str(tmp_path / "o.jsonl")])
    with pytest.raises(UserError, match="give a judge"):
        cli(["judge", "--data", str(mixed), "--output", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()


def test_a_directory_output_and_no_silent_overwrite(assets, tmp_path):
    fn = tmp_path / "words.py"
    fn.write_text("def words(prompts, completions, **kw):\n    return [float(len(c[0]['content'])) for c in completions]\n")
    pairs = held_out_pairs(assets, tmp_path / "pairs.jsonl")
    args = ["judge", "--reward", f"{fn}:words", "--data", str(pairs), "--output", str(tmp_path / "run"), "--no-progress"]
    cli(args)
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"judged.jsonl", "metrics.jsonl", "config.yaml"}
    with pytest.raises(UserError, match="already holds judged records"):
        cli(args)
    assert cli([*args, "--overwrite"])["written"] == len(read(tmp_path / "run" / "judged.jsonl"))
