"""`alignkit eval` end to end on the tiny fixture model and on given completions, judged by reward functions:
the outputs, numbers that must agree with each other or with hand counts, and one-line user errors."""

import json
from pathlib import Path

import pytest

from alignkit.cli import run as cli
from alignkit.errors import UserError
from alignkit.world.gold import gold_reward

HERE = Path(__file__).resolve()


def words(prompts, completions, **kwargs):
    """A judge that prefers the longer answer and nothing else."""
    return [float(len((c if isinstance(c, str) else c[0]["content"]).split())) for c in completions]


def chars(prompts, completions, **kwargs):
    """A judge that prefers the longer answer in characters (the tiny random model writes whitespace)."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path, assets):
    rows = [json.loads(line) for line in (assets / "instructions.jsonl").read_text().splitlines()[:6]]
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["messages"][:1], "meta": {"n": i}}
                                                   for i, r in enumerate(rows)])


def test_a_model_against_itself_ties_everywhere(tiny_model, prompts, tmp_path):
    """Greedy answers of the same model are identical: every verdict is exactly a tie, the win rate and the LC
    win rate are 0.5 with a zero-width interval, and under itself as --base every answer token is its top one."""
    out = tmp_path / "eval"
    res = cli(["eval", "--model", f"tiny={tiny_model}", "--baseline", str(tiny_model), "--base", str(tiny_model),
               "--data", str(prompts), "--reward", f"{HERE}:words", "--max-new-tokens", "12", "--output", str(out),
               "--bootstrap", "200", "--no-progress"])
    m = res["models"]["tiny"]
    assert m["win_rate"] == {"win_rate": 0.5, "ci95": [0.5, 0.5], "n": 6}
    assert m["lc_win_rate"]["lc_win_rate"] == 0.5 and m["lc_win_rate"]["ci95"] == [0.5, 0.5]
    assert (m["wins"], m["ties"], m["losses"]) == (0, 6, 0)
    assert m["mean_length"] == m["baseline_mean_length"] == res["baseline"]["mean_length"]
    assert m["token_shift"]["unshifted"] == 1.0 and m["token_shift"]["shifted"] == 0.0
    profile = m["token_shift"]["by_position"]
    assert sum(profile["tokens"]) > 0 and all(s == 0.0 for s, t in zip(profile["shifted"], profile["tokens"]) if t)
    rows = read_jsonl(out / "rows" / "tiny.jsonl")
    assert len(rows) == 6 and all(r["completion"] == r["baseline_completion"] and r["prob"] == 0.5
                                  and r["win"] == 0.5 for r in rows)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in read_jsonl(prompts)]
    assert m["ended_rate"] == sum(r["ended"] for r in rows) / 6
    assert m["garbled_rate"] == sum(r["garbled"] for r in rows) / 6
    for name in ("results.json", "report.md", "report.html", "config.yaml", "plots/win_rate.png",
                 "plots/lengths.png", "plots/token_shift.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["models"]["tiny"]["win_rate"]["win_rate"] == 0.5
    report = (out / "report.md").read_text()
    assert "## tiny" in report and "0.500 [0.500, 0.500]" in report
    assert "plots/win_rate.png" in (out / "report.html").read_text()
    # an output directory is not replaced without --overwrite
    with pytest.raises(UserError, match="not empty"):
        cli(["eval", "--model", str(tiny_model), "--baseline", str(tiny_model), "--data", str(prompts),
             "--reward", f"{HERE}:words", "--output", str(out)])


ARITH = [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8"), ("What is 7 + 1?", "8"), ("What is 6 + 3?", "9")]


def test_given_completions_judged_by_gold_with_the_ended_column(tmp_path):
    """Completions files judged by the world's gold reward through --reward: P(better) = sigmoid(gold_m - gold_b),
    so the win counts follow gold by hand; the answers' "ended" reaches gold (not ending costs 0.3)."""
    data = write_jsonl(tmp_path / "arith.jsonl",
                       [{"prompt": q, "meta": {"kind": "arith", "answer": a}} for q, a in ARITH])

    def answers(name, texts, ended=None):
        ended = ended or [True] * len(texts)
        return write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": q, "completion": t, "ended": e}
                                                        for (q, _), t, e in zip(ARITH, texts, ended)])

    base = answers("base", ["It is 5.", "It is 7.", "It is 2.", "It is 1."])  # right on the first only
    good = answers("good", ["It is 5.", "It is 8.", "It is 8.", "It is 3."])  # right on the first three
    cut = answers("cut", ["It is 5.", "It is 7.", "It is 2.", "It is 1."], [False, True, True, True])
    out = tmp_path / "eval"
    res = cli(["eval", "--completions", str(good), "--completions", f"same-but-cut={cut}", "--baseline-completions",
               str(base), "--data", str(data), "--reward", "alignkit.world.gold:gold_reward", "--output", str(out),
               "--bootstrap", "300"])
    g = res["models"]["good"]
    # gold: prompt 1 both right (tie), 2 and 3 only good right (wins), 4 both wrong (tie): (0.5 + 1 + 1 + 0.5) / 4
    assert (g["wins"], g["ties"], g["losses"]) == (2, 2, 0)
    assert g["win_rate"]["win_rate"] == 0.75
    assert g["mean_length"] == 3.0 and res["baseline"]["mean_length"] == 3.0
    # equal lengths everywhere: no length term, LC = raw
    assert g["lc_win_rate"]["lc_win_rate"] == pytest.approx(0.75, abs=1e-9)
    c = res["models"]["same-but-cut"]
    # the same texts, the first not ended: gold 1 - 0.3 against 1 -> one loss, three ties
    assert (c["wins"], c["ties"], c["losses"]) == (0, 3, 1) and c["win_rate"]["win_rate"] == 0.375
    assert c["ended_rate"] == 0.75 and c["garbled_rate"] == 0.25  # an answer that did not stop is garbled
    rows = read_jsonl(out / "rows" / "same-but-cut.jsonl")
    assert [r["win"] for r in rows] == [0.0, 0.5, 0.5, 0.5] and rows[0]["ended"] is False
    assert (out / "rows" / "good.jsonl").is_file() and not (out / "plots" / "token_shift.png").exists()
    # distinct-1 of "good": 12 words, of which it, is, 5., 8., 3. distinct
    assert g["distinct_1"] == pytest.approx(5 / 12)


def test_gold_reward_reads_meta_and_ended():
    meta = [{"kind": "arith", "answer": "9"}] * 3
    got = gold_reward(["q"] * 3, ["The answer is 9.", [{"role": "assistant", "content": "9"}], "9"], meta,
                      ended=[True, True, False])
    assert got == [1.0, 1.0, pytest.approx(0.7)]
    assert gold_reward(["q"], ["8"], meta[:1]) == [0.0]  # ended defaults to True


def test_mismatched_completions_are_one_line_and_write_nothing(tmp_path):
    data = write_jsonl(tmp_path / "arith.jsonl", [{"prompt": q} for q, _ in ARITH])
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": q, "completion": "x"} for q, _ in ARITH[:1] + ARITH[2:]])
    base = write_jsonl(tmp_path / "base.jsonl", [{"prompt": q, "completion": "y"} for q, _ in ARITH])
    out = tmp_path / "eval"
    args = ["--baseline-completions", str(base), "--data", str(data), "--reward", f"{HERE}:words", "--output", str(out)]
    with pytest.raises(UserError) as e:
        cli(["eval", "--completions", str(wrong), *args])
    message = str(e.value)
    assert f"{wrong}:2" in message and f"{data}:2" in message and "\n" not in message
    with pytest.raises(UserError, match="no such file") as e:
        cli(["eval", "--completions", str(tmp_path / "missing.jsonl"), *args])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--bootstrap must be >= 1"):
        cli(["eval", "--completions", str(base), "--bootstrap", "0", *args])
    assert not out.exists() and not (tmp_path / ".eval.tmp").exists()


def test_decoding_options_reach_the_evaluated_model_not_the_baseline(tiny_model, prompts, tmp_path):
    """With a large EOS boost the model's answers end at their second token while the baseline (the same model,
    greedy and plain) runs on: the length judge then never prefers the model's answer."""
    res = cli(["eval", "--model", f"boosted={tiny_model}", "--baseline", str(tiny_model), "--data", str(prompts),
               "--reward", f"{HERE}:chars", "--length-unit", "characters", "--max-new-tokens", "12",
               "--eos-boost", "100", "--bootstrap", "50",
               "--output", str(tmp_path / "eval"), "--no-progress"])
    m = res["models"]["boosted"]
    assert m["mean_length"] < res["baseline"]["mean_length"] and m["wins"] == 0
    assert m["ended_rate"] == 1.0 and res["decoding"]["eos_boost"] == 100.0
