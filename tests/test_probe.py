"""alignkit probe-knowledge: the matcher and the SliCK categories by hand, the four categories from a scripted
model, a tiny model trained on some facts and not others, and bad input as one-line errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from alignkit import probe
from alignkit.cli import main as cli_main
from alignkit.cli import run as cli
from alignkit.errors import DataError, UserError
from alignkit.probe import Question, category, exemplar_sets, first_line, matches, normalize


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa(name, city, **extra):
    return {"messages": [{"role": "user", "content": f"Where does {name} live?"},
                         {"role": "assistant", "content": f"{name} lives in {city}."}], "answer": city, **extra}


# ----------------------------------------------------------------------------------------------
# By hand
# ----------------------------------------------------------------------------------------------


def test_normalize_and_the_three_matchers():
    assert normalize("  The  Marlow, (UK)! ") == "marlow uk"
    assert normalize("An apple a day") == "apple day"
    assert matches("Marlow.", ["marlow"], "normalized") and not matches("Marlow.", ["marlow"], "exact")
    assert matches(" Marlow ", ["Marlow"], "exact") and not matches("marlow", ["Marlow"], "exact")
    sentence = "Ada Brook lives in Marlow."
    assert matches(sentence, ["Marlow"], "contains") and not matches(sentence, ["Marlow"], "normalized")
    assert not matches("Ada Brook lives in Marlowe.", ["Marlow"], "contains")  # whole words only
    assert not matches("Ada lives in Marlow.", ["Brook"], "contains")
    assert matches("She plays the cello.", ["violin", "cello"], "contains")  # any alias
    assert matches("It is in New York City.", ["new york"], "contains")  # a multi-word span
    assert not matches("It is in York.", ["new york"], "contains")
    assert first_line("  \n Ada lives in Marlow.\nQ: Where does Bruno live?") == "Ada lives in Marlow."


def test_category_from_correctness_counts():
    assert category(4, 4, None) == "HighlyKnown"
    assert category(1, 4, None) == category(3, 4, 0) == "MaybeKnown"
    assert category(0, 4, 1) == "WeaklyKnown"
    assert category(0, 4, 0) == "Unknown"
    with pytest.raises(ValueError):
        category(0, 4, None)


def test_records_as_questions(tmp_path):
    data = write(tmp_path / "qa.jsonl", [
        qa("Ada Brook", "Marlow"),
        {"prompt": "Which instrument does Ada play?", "answer": ["violin", "fiddle"], "meta": {"k": 1}},
        {"messages": [{"role": "user", "content": "Cora's year?"}, {"role": "assistant", "content": "Cora was born in 1970."}]},
    ])
    q = probe.read_questions([data], "answer")
    assert [x.text for x in q] == ["Where does Ada Brook live?", "Which instrument does Ada play?", "Cora's year?"]
    assert q[0].references == ["Marlow"] and q[0].shown == "Ada Brook lives in Marlow."
    assert q[1].references == ["violin", "fiddle"] and q[1].shown == "violin"  # no assistant text: the reference
    assert q[2].references == ["Cora was born in 1970."]  # no answer field: the assistant turn
    nested = write(tmp_path / "nested.jsonl", [
        qa("Ada Brook", "Marlow"),
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bruno's city?"}],
         "meta": {"city": "Fenwick"}}])
    with pytest.raises(DataError, match=r"nested.jsonl:2: no reference answer: no 'answer' field"):
        probe.read_questions([nested], "answer")
    ada, bruno = probe.read_questions([nested], "meta.city")
    assert ada.references == ["Ada Brook lives in Marlow."]  # no meta.city: its assistant turn
    assert (bruno.text, bruno.references, bruno.prompt[-1]["content"]) == ("Bruno's city?", ["Fenwick"], "Bruno's city?")


def test_exemplars_never_include_the_question_itself():
    qs = [Question(f"f:{i}", {}, f"q{i % 4}", ["a"], "a", "q") for i in range(6)]  # q0 and q1 asked twice
    sets = exemplar_sets(qs, None, variants=3, shots=3, seed=0)
    for q, variants in zip(qs, sets):
        assert len(variants) == 3 and all(len(ex) == 3 for ex in variants)
        assert all(e.text != q.text for ex in variants for e in ex)
    assert sets == exemplar_sets(qs, None, 3, 3, seed=0) and sets != exemplar_sets(qs, None, 3, 3, seed=1)
    with pytest.raises(UserError, match=r"--shots 5: f:0 has only 4 other records"):
        exemplar_sets(qs, None, 1, 5, 0)


# ----------------------------------------------------------------------------------------------
# The four categories from a scripted model
# ----------------------------------------------------------------------------------------------

PEOPLE = [("Ada", "Marlow"), ("Bruno", "Fenwick"), ("Cora", "Oakridge"), ("Dmitri", "Ashford"), ("Elena", "Redcliff")]


def asked(prompt: str) -> tuple[str, str]:
    """(the question, the exemplar part) of a rendered prompt, plain or chat."""
    if "<|im_start|>user\n" in prompt:
        head, _, last = prompt.rpartition("<|im_start|>user\n")
        return last.split("<|im_end|>")[0], head
    head, _, last = prompt.rpartition("Q: ")
    return last.split("\n")[0], head


def scripted(calls):
    """A fake `generate`: Ada and Elena always answered right; Bruno right when Dmitri is among the exemplars;
    Cora wrong greedily, right in about a third of samples (torch's RNG); Dmitri always wrong."""

    def fake(model, tok, prompts, max_new_tokens, temperature, top_p, batch_size):
        out = []
        for ids in prompts:
            question, exemplars = asked(tok.decode(ids))
            calls.append((question, exemplars, temperature))
            name = question.split()[2]
            city = dict(PEOPLE)[name]
            right = {"Ada": True, "Elena": True, "Bruno": "Dmitri" in exemplars, "Dmitri": False,
                     "Cora": temperature > 0 and float(torch.rand(())) < 0.3}[name]
            answer = f" {name} lives in {city if right else 'Paris'}.\nQ: and then"
            out.append(tok.encode(answer) + [tok.eos_token_id])
        return out

    return fake


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_a_scripted_model_gives_each_category(fmt, tiny_model, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(probe, "generate", scripted(calls))
    data = write(tmp_path / "qa.jsonl", [qa(n, c, meta={"kind": "even" if i % 2 == 0 else "odd"})
                                         for i, (n, c) in enumerate(PEOPLE)])
    out = tmp_path / "probe"
    summary = cli(["probe-knowledge", "--model", str(tiny_model), "--data", str(data), "--output", str(out),
                   "--format", fmt, "--variants", "4", "--shots", "2", "--samples", "8", "--group-by", "meta.kind",
                   "--no-progress"])
    rows = read(out / "categories.jsonl")
    assert [r["category"] for r in rows] == ["HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown", "HighlyKnown"]
    assert [{k: v for k, v in r.items() if k not in probe.ADDED_FIELDS} for r in rows] == read(data)  # verbatim
    # Bruno is right exactly under the variants whose exemplars include Dmitri
    questions = probe.read_questions([data], "answer")
    with_dmitri = sum(any(e.text == "Where does Dmitri live?" for e in ex)
                      for ex in exemplar_sets(questions, None, 4, 2, 0)[1])
    assert 0 < with_dmitri < 4 and rows[1]["greedy_correct"] == with_dmitri
    assert rows[1]["p_correct_greedy"] == with_dmitri / 4
    assert [r["sampled_correct"] is None for r in rows] == [True, True, False, False, True]  # sampling skipped
    assert 0 < rows[2]["sampled_correct"] < 32 and rows[3]["sampled_correct"] == 0
    assert rows[0]["greedy_answers"] == ["Ada lives in Marlow."] * 4  # the first line of the completion
    # 5 x 4 greedy prompts, then 8 samples of each of the 4 variants of Cora and Dmitri; no prompt shows its
    # own question among the exemplars
    assert [t for _, _, t in calls] == [0.0] * 20 + [0.5] * 64
    assert all(question not in exemplars for question, exemplars, _ in calls)
    assert summary["categories"] == {"HighlyKnown": 2, "MaybeKnown": 1, "WeaklyKnown": 1, "Unknown": 1}
    assert summary["questions"] == 5 and summary["shares"]["HighlyKnown"] == 0.4 and summary["format"] == fmt
    assert summary["by_group"]["meta.kind"]["odd"]["categories"] == {"HighlyKnown": 0, "MaybeKnown": 1,
                                                                   "WeaklyKnown": 0, "Unknown": 1}
    assert (summary["sampled_questions"], summary["sampling_skipped"], summary["answers_cut"]) == (2, 3, 0)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "| MaybeKnown | 1 | 0.200 |" in (out / "summary.md").read_text()
    assert (out / "config.yaml").read_text().startswith("# alignkit probe-knowledge\n")

    # a reward function in place of the matcher gives the same verdicts; it receives the record's fields
    fn = tmp_path / "right.py"
    fn.write_text("def right(prompts, completions, answer, **kw):\n"
                  "    texts = [c if isinstance(c, str) else c[0]['content'] for c in completions]\n"
                  "    return [float(a in t) for a, t in zip(answer, texts)]\n")
    again = cli(["probe-knowledge", "--model", str(tiny_model), "--data", str(data), "--output", str(out),
                 "--format", fmt, "--variants", "4", "--shots", "2", "--samples", "8", "--reward", f"{fn}:right",
                 "--overwrite", "--no-progress"])
    assert again["categories"] == summary["categories"] and again["match"].startswith("reward > 0.5")


# ----------------------------------------------------------------------------------------------
# A tiny model trained on some facts and not others
# ----------------------------------------------------------------------------------------------

KNOWN = [("Ada Brook", "Marlow"), ("Bruno Castell", "Fenwick"), ("Cora Dunmore", "Oakridge"),
         ("Dmitri Ellery", "Brightwater"), ("Elena Fairholt", "Stonehaven"), ("Farid Greaves", "Millbrook"),
         ("Greta Hollis", "Ashford"), ("Hugo Ivers", "Redcliff")]
NEVER_SEEN = [("Quill Zarvo", "Vexholm"), ("Yorn Plaskett", "Glimsby"), ("Wendo Krull", "Pyrtown")]


@pytest.fixture(scope="module")
def knowing_model(tiny_model, tmp_path_factory):
    """tiny_model fine-tuned on the KNOWN facts, asked few-shot in both formats (4 exemplars of other known
    facts); the NEVER_SEEN people and cities appear nowhere in its training."""
    root = tmp_path_factory.mktemp("probe")
    questions = [Question("", {}, f"Where does {n} live?", [c], f"{n} lives in {c}.", None) for n, c in KNOWN]
    rng, rows = random.Random(0), []
    for q in questions:
        for _ in range(8):
            ex = rng.sample([e for e in questions if e is not q], 4)
            rows.append({"prompt": probe.plain_prompt(ex, q.text), "completion": " " + q.shown})
            rows.append({"messages": probe.chat_prompt(ex, q.text) + [{"role": "assistant", "content": q.shown}]})
    rng.shuffle(rows)
    cli(["sft", "--model", str(tiny_model), "--data", str(write(root / "train.jsonl", rows)), "--output",
         str(root / "sft"), "--max-steps", "250", "--batch-size", "8", "--max-length", "256", "--lr", "3e-3",
         "--warmup-steps", "10", "--no-progress"])
    return root / "sft", write(root / "qa.jsonl", [qa(n, c) for n, c in KNOWN + NEVER_SEEN])


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_trained_facts_are_known_and_never_seen_ones_unknown(fmt, knowing_model, tmp_path):
    model, data = knowing_model
    out = tmp_path / fmt
    summary = cli(["probe-knowledge", "--model", str(model), "--data", str(data), "--output", str(out), "--format", fmt,
                   "--max-new-tokens", "24", "--no-progress"])
    rows = {r["answer"]: r for r in read(out / "categories.jsonl")}
    assert all(rows[c]["category"] in ("HighlyKnown", "MaybeKnown") for _, c in KNOWN), {c: rows[c] for _, c in KNOWN}
    assert all(rows[c]["category"] == "Unknown" and rows[c]["sampled_correct"] == 0 for _, c in NEVER_SEEN)
    assert summary["categories"]["HighlyKnown"] >= 6 and summary["questions"] == 11


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def one_line_error(argv, capsys) -> str:
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line(tiny_model, tmp_path, capsys):
    data = write(tmp_path / "qa.jsonl", [qa(n, c) for n, c in PEOPLE])
    base = ["probe-knowledge", "--model", str(tiny_model), "--output", str(tmp_path / "out")]
    assert "missing.jsonl: no such file" in one_line_error([*base, "--data", str(tmp_path / "missing.jsonl")], capsys)
    bad = write(tmp_path / "bad.jsonl", [qa("Ada", "Marlow"), {"prompt": "Where is Bruno?"}])
    assert "bad.jsonl:2: no reference answer" in one_line_error([*base, "--data", str(bad)], capsys)
    text = write(tmp_path / "text.jsonl", [{"text": "Ada lives in Marlow."}])
    assert "text.jsonl:1: no question" in one_line_error([*base, "--data", str(text)], capsys)
    assert "--variants must be >= 1 (got 0)" in one_line_error([*base, "--data", str(data), "--variants", "0"], capsys)
    err = one_line_error([*base, "--data", str(data), "--shots", "5"], capsys)
    assert "--shots 5:" in err and "has only 4 other records" in err
    assert "--temperature must be > 0" in one_line_error([*base, "--data", str(data), "--temperature", "0"], capsys)
    assert not (tmp_path / "out").exists()


def test_a_failing_reward_names_the_sample_and_writes_nothing(tiny_model, tmp_path):
    data = write(tmp_path / "qa.jsonl", [qa(n, c) for n, c in PEOPLE])
    fn = tmp_path / "picky.py"
    fn.write_text("def picky(prompts, completions, answer, **kw):\n"
                  "    if 'Fenwick' in answer:\n        raise ValueError('no Fenwick here')\n"
                  "    return [0.0] * len(completions)\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"(?s)failed on sample \d+ .*no Fenwick here.*Where does Bruno live\?"):
        cli(["probe-knowledge", "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--reward",
             f"{fn}:picky", "--variants", "1", "--shots", "2", "--max-new-tokens", "2", "--no-progress"])
    assert not out.exists()


def test_no_silent_overwrite(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "generate", scripted([]))
    data = write(tmp_path / "qa.jsonl", [qa(n, c) for n, c in PEOPLE])
    args = ["probe-knowledge", "--model", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "out"),
            "--variants", "2", "--shots", "1", "--samples", "1", "--no-progress"]
    cli(args)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"categories.jsonl", "summary.json", "summary.md",
                                                              "config.yaml"}
    with pytest.raises(UserError, match="already holds a probe"):
        cli(args)
    assert cli([*args, "--overwrite"])["questions"] == 5


def test_cloze_prompt_and_first_sentence():
    from alignkit.probe import Question, cloze_prompt, first_sentence

    ex = [Question("f:1", {}, "Ada Brook lives in", ["Marlow"], "Marlow.", None),
          Question("f:2", {}, "Bruno Pell plays the", ["harp"], "harp.", None)]
    assert cloze_prompt(ex, "Cora Rook lives in") == "Ada Brook lives in Marlow. Bruno Pell plays the harp. Cora Rook lives in"
    assert first_sentence(" Fenwick. Cora Rook plays the flute.") == "Fenwick."
    assert first_sentence("Fenwick\nQ: next") == "Fenwick"
    assert first_sentence("3.5 km away") == "3.5 km away"
