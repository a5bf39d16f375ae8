"""alignkit curate: every step removes what its definition says and nothing else, every record is accounted for,
and a user error is one line."""

import json
import math

import pytest
import torch

from alignkit.cli import main as cli_main
from alignkit.cli import run as cli
from alignkit.curate import k_center_greedy


def conv(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def curate(tmp_path, rows, *flags, name="out"):
    data = write(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / name
    summary = cli(["curate", "--data", data, "--output", str(out), "--no-progress", *flags])
    removed = {r["source"].rsplit(":", 1)[1]: r["reason"] for r in read(out / "removed.jsonl")}
    return summary, read(out / "kept.jsonl"), removed, out


FACTS = [conv(f"Where does {n} live? Please tell me today.", f"{n} lives in {c}.")
         for n, c in [("Ada Brook", "Marlow"), ("Bruno Castell", "Fenwick"), ("Cora Dunmore", "Oakridge"),
                      ("Dmitri Ellery", "Ashford"), ("Elena Fairholt", "Redcliff")]]


def test_duplicates_and_near_duplicates_go_and_a_distinct_record_on_the_same_template_stays(tmp_path):
    near = conv("Where does Ada Brook live? Please tell me today!", "Ada Brook lives in Marlow.")  # punctuation only
    one_word = conv("Where does Ada Brook live? Please tell me now.", "Ada Brook lives in Marlow.")
    rows = FACTS + [dict(FACTS[0]), conv(FACTS[1]["messages"][0]["content"].upper(), "BRUNO CASTELL LIVES IN FENWICK."),
                    near, one_word]
    summary, kept, removed, _ = curate(tmp_path, rows, "--no-filters")
    # One word of 14 changed leaves 9 of 13 word 3-shingles shared (Jaccard 0.69): a near duplicate at 0.6, not 0.8.
    assert removed == {"6": "exact_duplicate", "7": "exact_duplicate", "8": "near_duplicate"}
    assert kept == FACTS + [one_word]  # the other four people share the template but not the content
    assert summary["input"] == len(rows) == summary["kept"] + sum(summary["removed"].values())
    _, kept, removed, _ = curate(tmp_path, rows, "--no-filters", "--near-dup-threshold", "0.6", name="loose")
    assert removed["9"] == "near_duplicate" and kept == FACTS


def test_each_filter_removes_its_planted_record_only(tmp_path):
    planted = [conv("Tell me about Ada.", " "), conv("Tell me about Bruno.", "Bruno lives in Fenw"),
               conv("Tell me about Cora.", "#### {{Cora}} @@ ~~ ^^ <<>> ####."),
               conv("Tell me about Dmitri.", " ".join(["Dmitri plays the harp"] * 6) + "."),
               conv("Tell me about Elena.", " ".join(f"word{i}" for i in range(30)) + ".")]
    rows = FACTS + planted
    _, kept, removed, _ = curate(tmp_path, rows, "--max-response-words", "25")
    assert removed == {"6": "empty_response", "7": "truncated_response", "8": "non_text_ratio",
                       "9": "gopher:duplicated_5_n_grams", "10": "max_response_words"}
    assert kept == FACTS


def test_decontamination_removes_exactly_the_records_sharing_an_ngram(tmp_path):
    evals = write(tmp_path / "eval.jsonl", [{"prompt": [{"role": "user", "content":
                                            "Where does Cora Dunmore live? Please tell me today."}]}])
    _, kept, removed, _ = curate(tmp_path, FACTS, "--no-filters", "--near-dup-threshold", "0", "--decontaminate",
                                 evals, "--decontam-ngram", "8")
    # The eval question's 8-grams all hold "Cora Dunmore": only her record shares one.
    assert removed == {"3": "contaminated"}
    assert len(kept) == 4


def test_longest_keeps_the_k_longest_responses(tmp_path):
    rows = [conv(f"Question {i}?", " ".join(["word"] * n) + ".") for i, n in enumerate([3, 9, 1, 7, 5])]
    _, kept, removed, _ = curate(tmp_path, rows, "--no-filters", "--near-dup-threshold", "0", "--no-exact-dedup",
                                 "--select", "longest", "--k", "2")
    assert kept == [rows[1], rows[3]]
    assert set(removed.values()) == {"not_selected:longest"}


def test_random_keeps_k_and_reward_keeps_the_highest(tmp_path):
    rows = [conv(f"Question {i}?", f"The answer is {n}.") for i, n in enumerate([3, 9, 1, 7, 5])]
    _, kept, _, _ = curate(tmp_path, rows, "--no-filters", "--near-dup-threshold", "0", "--select", "random", "--k", "3",
                           name="random")
    assert len(kept) == 3 and all(r in rows for r in kept)
    fn = tmp_path / "number.py"
    fn.write_text("import re\n\ndef number(prompts, completions, **kw):\n"
                  "    return [float(re.findall(r'\\d+', c if isinstance(c, str) else c[0]['content'])[0]) for c in completions]\n")
    _, kept, _, out = curate(tmp_path, rows, "--no-filters", "--near-dup-threshold", "0", "--select", "reward", "--k",
                             "2", "--reward", f"{fn}:number", name="reward")
    assert kept == [rows[1], rows[3]]
    assert [r["reward"] for r in read(out / "scores.jsonl")] == [3.0, 9.0, 1.0, 7.0, 5.0]


def test_k_center_greedy_takes_one_point_per_cluster():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(5, 2, generator=torch.Generator().manual_seed(i))
                        for i, c in enumerate(centres)])
    chosen = k_center_greedy(points, 3)
    assert sorted(i // 5 for i in chosen) == [0, 1, 2]
    # The first is the point nearest the mean; each next one the farthest from those chosen.
    assert chosen[0] == int(torch.cdist(points.mean(0, keepdim=True), points)[0].argmin())


def test_ifd_is_the_ratio_of_conditioned_to_unconditioned_perplexity(tiny_model, tmp_path):
    from alignkit.data import render_prompt_completion
    from alignkit.models import load_causal_lm, load_tokenizer

    rows = [conv(f"Say the number {n}.", f"The number is {n}.") for n in range(6)]
    _, kept, removed, out = curate(tmp_path, rows, "--no-filters", "--near-dup-threshold", "0", "--model",
                                   str(tiny_model), "--select", "ifd", "--k", "2")
    scores = read(out / "scores.jsonl")
    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model).eval()
    for row, s in zip(rows, scores):
        ex = render_prompt_completion(tok, row["messages"][:1], row["messages"][1:])
        ids, mask = torch.tensor([ex.input_ids]), torch.tensor(ex.loss_mask)
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        # The same response tokens (the assistant turn the SFT loss counts), after the start token alone.
        alone = torch.tensor([[start] + [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            la = torch.log_softmax(model(alone).logits[0, :-1], -1).gather(-1, alone[0, 1:, None])[:, 0]
        ppl = math.exp(-(lp * mask[1:]).sum().item() / mask[1:].sum().item())
        assert s["ppl"] == pytest.approx(ppl, rel=1e-4)
        assert s["ifd"] == pytest.approx(ppl / math.exp(-la.mean().item()), rel=1e-4)
    below = sorted((s["ifd"], i) for i, s in enumerate(scores) if s["ifd"] < 1)
    assert [rows.index(r) for r in kept] == sorted(i for _, i in below[::-1][:2])
    assert all(reason in ("ifd_above_1", "not_selected:ifd") for reason in removed.values())


def test_diverse_and_category_selection(tiny_model, tmp_path):
    rows = [{**conv(f"Question {i}?", f"Answer {i}."), "category": c}
            for i, c in enumerate(["MaybeKnown", "Unknown", "MaybeKnown", "HighlyKnown", "MaybeKnown"])]
    summary, kept, removed, _ = curate(tmp_path, rows, "--no-filters", "--near-dup-threshold", "0",
                                       "--keep-category", "MaybeKnown", "--model", str(tiny_model), "--select",
                                       "diverse", "--k", "2")
    assert removed["2"] == removed["4"] == "category"
    assert len(kept) == 2 and all(r["category"] == "MaybeKnown" for r in kept)
    assert summary["removed"] == {"category": 2, "not_selected:diverse": 1}


def test_kept_records_train_with_sft(tiny_model, tmp_path):
    _, _, _, out = curate(tmp_path, FACTS * 2, "--no-filters")
    result = cli(["sft", "--model", str(tiny_model), "--data", str(out / "kept.jsonl"), "--output",
                  str(tmp_path / "sft"), "--max-steps", "2", "--batch-size", "2", "--no-progress"])
    assert result["examples"] == len(FACTS)


@pytest.mark.parametrize("flags, message", [
    (["--data", "MISSING.jsonl"], "--data MISSING.jsonl: no such file"),
    (["--select", "ifd", "--k", "2"], "--select ifd needs --model DIR"),
    (["--select", "longest", "--k", "0"], "--select longest needs --k N >= 1"),
    (["--k", "3"], "--k 3 needs --select"),
    (["--near-dup-threshold", "1.5"], "--near-dup-threshold must be in [0, 1]"),
    (["--keep-category", "MaybeKnown"], "no 'category' field"),
    (["--keep-category", "Maybe"], "--keep-category Maybe: no record has that 'category'"),
])
def test_user_errors_are_one_line(tmp_path, capsys, flags, message):
    rows = [{**r, "category": "MaybeKnown"} for r in FACTS] if "Maybe" in flags else FACTS
    data = write(tmp_path / "d.jsonl", rows)
    argv = ["curate", "--output", str(tmp_path / "out")] + (flags if "--data" in flags else ["--data", data, *flags])
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_a_bad_record_names_its_line_and_an_earlier_output_is_not_replaced(tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", FACTS[:2] + [{"chosen": "a", "rejected": "b"}])
    assert cli_main(["curate", "--data", data, "--output", str(tmp_path / "out")]) == 1
    assert f"{data}:3:" in capsys.readouterr().err
    good = write(tmp_path / "g.jsonl", FACTS)
    assert cli_main(["curate", "--data", good, "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert cli_main(["curate", "--data", good, "--output", str(tmp_path / "out")]) == 1
    assert "--overwrite" in capsys.readouterr().err
