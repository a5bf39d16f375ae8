"""The world's data: deterministic, held-out sets disjoint from training, gold judge ranks as the notes say."""

import json
import random
import re

import pytest

from alignkit.world.build import SMOKE_EVAL, WORKED_SHARE, build, problem_numbers
from alignkit.world.evaluate import EVAL_SETS
from alignkit.world.facts import IDK, REFUSAL, STATEMENTS, VICTIMS, harmful_split
from alignkit.world.frames import (
    FACT_FRAMES,
    FRAMES,
    PROBLEM_FRAMES,
    REQUEST_FRAMES,
    far,
)
from alignkit.world.gold import Annotator, gold_score, is_refusal


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def user_texts(records, key="messages"):
    return {r[key][0]["content"] if key == "messages" else r["prompt"][0]["content"] for r in records}


def test_build_is_deterministic(world_dir, tmp_path):
    build(tmp_path, "tiny", seed=0)
    for name in ("corpus.jsonl", "sft.jsonl", "pref.jsonl", "pref_ranked.jsonl", "eval/qa_seen.jsonl", "arith_prompts.jsonl"):
        assert (tmp_path / name).read_text() == (world_dir / name).read_text(), name
    build(tmp_path / "other", "tiny", seed=1)
    assert (tmp_path / "other" / "corpus.jsonl").read_text() != (world_dir / "corpus.jsonl").read_text()


def test_eval_prompts_never_trained_on(world_dir):
    trained = user_texts(rows(world_dir / "sft.jsonl")) | user_texts(rows(world_dir / "pref.jsonl"), "prompt") \
        | user_texts(rows(world_dir / "pref_ranked.jsonl"), "prompt") \
        | user_texts(rows(world_dir / "rl_prompts.jsonl"), "prompt") \
        | user_texts(rows(world_dir / "arith_prompts.jsonl"), "prompt")
    for f in (world_dir / "eval").glob("*.jsonl"):
        evals = user_texts(rows(f), "prompt")
        assert evals and not (evals & trained), f.name


def test_eval_word_problems_have_numbers_no_training_text_has(world_dir):
    """Held-out arithmetic tests composing known steps, not recalling a trained problem."""
    held_out = {problem_numbers(r["prompt"][0]["content"]) for r in rows(world_dir / "eval" / "arith.jsonl")}
    assert len(held_out) == 80
    texts = [r["text"] for r in rows(world_dir / "corpus.jsonl")] + [
        r["messages"][0]["content"] for r in rows(world_dir / "sft.jsonl")] + [
        r["prompt"][0]["content"] for name in ("pref.jsonl", "pref_ranked.jsonl", "rl_prompts.jsonl", "arith_prompts.jsonl")
        for r in rows(world_dir / name)]
    trained = set()
    for frame in PROBLEM_FRAMES:  # every frame's numbers, read by the frame with its slots as groups
        parts = re.split(r"(\{\w+\})", frame.template)
        regex = "".join({"{a}": r"(\d+)", "{b}": r"(\d+)", "{c}": r"(\d+)"}.get(p, r"\w+" if p.startswith("{") else re.escape(p))
                        for p in parts)
        trained |= {tuple(int(x) for x in m) for t in texts for m in re.findall(regex, t)}
    assert len(trained) > 150 and not trained & held_out


def test_sft_word_problems_mostly_state_the_answer(world_dir):
    """Two demonstration styles, the worked one in the minority: what GRPO / preferences can find."""
    answers = [r["messages"][1]["content"] for r in rows(world_dir / "sft.jsonl")
               if re.match(r"They start with \d+|The answer is \d+\.", r["messages"][1]["content"])]
    worked = sum(a.startswith("They start with") for a in answers)
    terse = sum(re.fullmatch(r"The answer is \d+\.", a) is not None for a in answers)
    assert worked + terse == len(answers) == 300
    assert abs(worked / len(answers) - WORKED_SHARE) < 0.08


def test_held_out_harmful_requests_aim_trained_targets_with_new_verbs():
    """Refusal is learnable from the target: every held-out request against a person or animal names a
    victim that training requests name too, in a verb x victim combination never trained on."""
    train, held_out = harmful_split(5)
    assert len(held_out) == 40 and not set(train) & set(held_out)
    for request in held_out:
        victim = next((v for v in VICTIMS if request.endswith(f" {v}")), None)
        if victim is not None:
            assert any(t.endswith(f" {victim}") for t in train), request


def training_texts(world_dir) -> list[str]:
    """Every text of every training file: corpus documents, every message, every prompt and answer."""
    texts = [r["text"] for r in rows(world_dir / "corpus.jsonl")]
    texts += [m["content"] for r in rows(world_dir / "sft.jsonl") for m in r["messages"]]
    for name in ("pref.jsonl", "pref_ranked.jsonl"):
        texts += [r[k][0]["content"] for r in rows(world_dir / name) for k in ("prompt", "chosen", "rejected")]
    texts += [r["prompt"][0]["content"] for name in ("rl_prompts.jsonl", "arith_prompts.jsonl")
              for r in rows(world_dir / name)]
    return texts


def test_enough_far_frames_of_every_kind():
    assert len(far(FACT_FRAMES)) >= 12 and len(far(REQUEST_FRAMES)) >= 12 and len(far(PROBLEM_FRAMES)) >= 3
    assert len(FACT_FRAMES) - 12 >= 12 and len(REQUEST_FRAMES) - 12 >= 12 and len(PROBLEM_FRAMES) - 4 >= 5


def test_far_frames_appear_in_no_training_file(world_dir):
    """A far frame's fixed words (each run of three or more) and any rendering of it are in no training text."""
    texts = training_texts(world_dir)
    lowered = "\n".join(texts).lower()
    for frame in FRAMES.values():
        if not frame.far:
            continue
        for part in frame.skeletons():
            if len(re.findall(r"[A-Za-z]+", part)) >= 3:
                assert part.strip().lower() not in lowered, (frame.id, part)
        for attr in (["city", "instrument", "club", "year"] if isinstance(frame.template, dict) else [None]):
            assert not renders_in(frame, attr, texts), frame.id
    # and the trained frames are what training is made of
    for frame in FRAMES.values():
        if not frame.far:
            attr = "city" if isinstance(frame.template, dict) else None
            assert renders_in(frame, attr, texts), frame.id


def renders_in(frame, attr, texts) -> bool:
    """Whether a text holds a rendering of the frame. Only a text holding every fixed part of the frame can, so
    the pattern (whose leading wildcards backtrack for long over every other text) searches only those."""
    parts = [part for part in re.split(r"\{\w+\}", frame.text(attr)) if part]
    pattern = frame.pattern(attr)
    return any(pattern.search(t) for t in texts if all(part in t for part in parts))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_every_eval_set_has_40_near_and_40_far_rows_of_the_right_frame(world_dir, preset, tmp_path):
    d = world_dir if preset == "tiny" else tmp_path
    if preset == "small":
        build(d, "small", seed=0)
    for name in EVAL_SETS:
        items = rows(d / "eval" / f"{name}.jsonl")
        texts = [r["prompt"][0]["content"] for r in items]
        assert len(set(texts)) == len(texts), name
        for distance in ("near", "far"):
            assert sum(r["meta"]["distance"] == distance for r in items) >= 40, (name, distance)
        for r in items:
            frame = FRAMES[r["meta"]["frame"]]
            assert r["meta"]["distance"] == ("far" if frame.far else "near"), r
            pattern = frame.pattern(r["meta"].get("attr"))
            text = r["prompt"][0]["content"]
            assert (pattern.fullmatch(text) if frame.far else pattern.search(text)), r
            kind = {"fact": "fact", "unknown": "fact", "arith": "problem"}.get(r["meta"]["kind"], "request")
            assert frame.kind == kind, r


def test_held_out_contents_are_not_trained(world_dir):
    """Held-out harmful verb x target combinations and look-alikes are asked in no training text; held-out
    non-existent people are named in none."""
    texts = training_texts(world_dir)
    joined = "\n".join(texts)
    for name in ("harmful", "benign"):
        for r in rows(world_dir / "eval" / f"{name}.jsonl"):
            req = r["meta"]["request"]
            assert not re.search(re.escape(req) + r"(?=[?.,]|$)", joined, re.MULTILINE), req
    for r in rows(world_dir / "eval" / "unknown.jsonl"):
        assert r["meta"]["name"] not in joined


def test_smoke_eval_keeps_the_first_near_and_far_rows(world_dir, tmp_path):
    build(tmp_path, "smoke", seed=0)
    for name in EVAL_SETS:
        tiny, smoke = rows(world_dir / "eval" / f"{name}.jsonl"), rows(tmp_path / "eval" / f"{name}.jsonl")
        expected = [r for d in ("near", "far") for r in [r for r in tiny if r["meta"]["distance"] == d][:SMOKE_EVAL]]
        assert smoke == expected, name
    for name in ("corpus.jsonl", "sft.jsonl", "pref.jsonl", "pref_ranked.jsonl", "pref_eval.jsonl", "rl_prompts.jsonl",
                 "arith_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (world_dir / name).read_bytes(), name


def test_length_bias_changes_only_the_preference_files(world_dir, tmp_path):
    build(tmp_path, "tiny", seed=0, length_bias=0.0)
    files = sorted(p.relative_to(world_dir) for p in world_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    prefs = {"pref.jsonl", "pref_ranked.jsonl", "pref_eval.jsonl", "summary.json"}
    for f in files:
        same = (tmp_path / f).read_bytes() == (world_dir / f).read_bytes()
        assert same == (str(f) not in prefs), f
    a, b = (json.loads((d / "summary.json").read_text()) for d in (world_dir, tmp_path))
    assert b.pop("annotator_length_bias") == 0.0 and a.pop("annotator_length_bias") == 0.6
    a.pop("annotator_gold_agreement"), b.pop("annotator_gold_agreement")
    assert a == b


def test_world_build_passes_length_bias(tmp_path, capsys):
    from alignkit.cli import run as cli

    cli(["world", "build", "--output", str(tmp_path), "--preset", "smoke", "--length-bias", "0"])
    assert json.loads(capsys.readouterr().out)["annotator_length_bias"] == 0.0


def test_pref_eval_keeps_200_pairs(world_dir):
    assert len(rows(world_dir / "pref_eval.jsonl")) >= 200


def test_people_split_and_bio_styles(world_dir):
    world = json.loads((world_dir / "world.json").read_text())
    sft = "\n".join(json.dumps(r) for r in rows(world_dir / "sft.jsonl"))
    groups = {(p["seen"], p["bio_style"]) for p in world["people"]}
    assert groups == {(True, "multi"), (True, "single"), (False, "multi"), (False, "single")}
    corpus = "\n".join(r["text"] for r in rows(world_dir / "corpus.jsonl"))
    for p in world["people"]:
        assert (p["name"] in sft) == p["seen"]
        # every bio states the birth year once, each bio of a person in its own phrasing
        bios = sum(corpus.count(t.format(**p)) for t in STATEMENTS["year"])
        assert bios == (3 if p["bio_style"] == "multi" else 1), p


def test_gold_ranks_correct_over_idk_over_wrong_and_clean_stops():
    meta = {"kind": "fact", "attr": "city", "answer": "Marlow", "name": "Ada Brook"}
    right, idk, wrong = "Ada Brook lives in Marlow.", IDK, "Ada Brook lives in Fenwick."
    assert gold_score(meta, right) > gold_score(meta, idk) > gold_score(meta, wrong)
    assert gold_score(meta, right, ended=True) > gold_score(meta, right, ended=False)
    assert gold_score({"kind": "harmful"}, REFUSAL) > gold_score({"kind": "harmful"}, "Sure, here is how.")
    benign = {"kind": "benign", "answer": "Find its process id with ps, then run kill followed by the id."}
    assert gold_score(benign, "Run ps to find the process id, then kill it with that id.") > gold_score(benign, REFUSAL)
    assert gold_score({"kind": "arith", "answer": "9"}, "3 + 6 = 9. The answer is 9.") == 1.0
    assert gold_score({"kind": "unknown", "attr": "city", "name": "X"}, IDK) > gold_score(
        {"kind": "unknown", "attr": "city", "name": "X"}, "X lives in Marlow.")


def test_annotators_prefer_longer_answers_at_equal_gold():
    ann = Annotator(noise=0.25, length_bias=0.6)
    assert ann.p_prefers_first(0.5, 0.5, 30, 5) > 0.8
    assert ann.p_prefers_first(1.0, 0.0, 5, 5) > 0.95


def test_annotator_rankings_have_the_bradley_terry_pairwise_marginals():
    """Plackett-Luce rankings (utility + Gumbel noise): P(a ranked above b) = the annotator's pairwise P."""
    ann, rng = Annotator(noise=0.25, length_bias=0.6), random.Random(0)
    golds, words = [1.0, 0.4, 0.0, 0.4], [5, 25, 5, 8]
    n, above = 20000, {}
    for _ in range(n):
        order = ann.rank(golds, words, rng)
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                above[a, b] = above.get((a, b), 0) + 1
    for a in range(4):
        for b in range(4):
            if a != b:
                p = ann.p_prefers_first(golds[a], golds[b], words[a], words[b])
                assert above.get((a, b), 0) / n == pytest.approx(p, abs=0.015), (a, b)


def test_pref_holds_every_pair_of_each_prompts_ranking(world_dir):
    by_prompt = {}
    for r in rows(world_dir / "pref_ranked.jsonl"):
        by_prompt.setdefault(r["prompt"][0]["content"], []).append((r["chosen"][0]["content"], r["rejected"][0]["content"]))
    assert len(by_prompt) == len(rows(world_dir / "rl_prompts.jsonl"))
    for prompt, pairs in by_prompt.items():
        answers = {a for pair in pairs for a in pair}
        k = len(answers)
        assert len(pairs) == k * (k - 1) // 2 and k >= 4, prompt
        wins = sorted(sum(c == a for c, _ in pairs) for a in answers)
        assert wins == list(range(k)), prompt  # one total order: the best beats all, the next all but one, ...


def test_annotators_agree_with_gold_mostly_not_always(world_dir):
    summary = json.loads((world_dir / "summary.json").read_text())
    assert 0.6 < summary["annotator_gold_agreement"] < 0.97


def test_harmful_compliance_varies_so_the_request_decides(world_dir):
    """A single fixed compliance text taught the reward model that text: PPO's garbled compliance then
    outscored refusing. Compliance to harmful requests also borrows trained look-alikes' answers, never
    the held-out ones'."""
    trained = {r["messages"][1]["content"] for r in rows(world_dir / "sft.jsonl")}
    held_out = {r["meta"]["answer"] for r in rows(world_dir / "eval" / "benign.jsonl")} - trained  # two share one
    compliance = set()
    for name in ("pref.jsonl", "pref_ranked.jsonl"):
        for r in rows(world_dir / name):
            if r["meta"]["kind"] == "harmful":
                compliance |= {t for t in (r["chosen"][0]["content"], r["rejected"][0]["content"]) if not is_refusal(t)}
    assert len(compliance & trained) >= 20
    assert not {a for t in compliance for a in held_out if a in t}
    assert all(gold_score({"kind": "harmful"}, t) == 0.0 for t in compliance)
