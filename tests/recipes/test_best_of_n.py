"""alignkit best-of-n: the kept completions score above a random sample, the outputs are SFT/preference data
the loaders accept, truncated completions are not kept by default, and 2 processes write the same files."""

import json

import pytest
import torch

from alignkit.cli import run as cli
from alignkit.data import load_preference, load_sft
from alignkit.models import load_causal_lm, load_tokenizer, save_model, stop_token_ids
from helpers import read_metrics, run_torchrun

REWARDS = """
def vowels(prompts, completions, **kw):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(1, len(t)) for t in texts]
def truncated(prompts, completions, completion_ids, **kw):  # 1 = no stop token at the end
    return [float(ids[-1] not in STOPS) for ids in completion_ids]
"""


def vowels(text):
    return sum(ch in "aeiou" for ch in text) / max(1, len(text))


@pytest.fixture()
def toy(tmp_path):
    chat = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}]} for i in range(6)]
    plain = [{"prompt": f"Item {i} is"} for i in range(4)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    (tmp_path / "rw.py").write_text(REWARDS)  # STOPS is set by the test that uses it
    return tmp_path


def bon_args(model, toy, out, data="chat.jsonl", reward="vowels", *extra):
    return ["best-of-n", "--model", str(model), "--data", str(toy / data), *(["--output", str(out)] if out else []),
            "--reward", f"{toy / 'rw.py'}:{reward}", "--num-samples", "8", "--batch-size", "4", "--max-new-tokens", "12",
            "--max-length", "64", "--no-progress", *extra]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("data", ["chat.jsonl", "plain.jsonl"])
def test_best_beats_random_sample_and_outputs_load(tiny_model, toy, data):
    out = toy / "out"
    final = cli(bon_args(tiny_model, toy, out, data, "vowels", "--pairs", "--keep-truncated"))
    n_prompts = 6 if data == "chat.jsonl" else 4
    assert final["completions"] == 8 * n_prompts and final["kept"] == n_prompts
    assert final["reward_best"] > final["reward_mean"] + 0.05, final
    best = lines(out / "best.jsonl")
    assert len(best) == n_prompts
    for rec in best:  # the written text is the one that earned the reported reward
        text = rec["messages"][-1]["content"] if "messages" in rec else rec["completion"]
        assert rec["reward"] == pytest.approx(vowels(text))
    assert sum(r["reward"] for r in best) / n_prompts == pytest.approx(final["reward_best"])
    pairs = lines(out / "pairs.jsonl")
    assert len(pairs) == final["pairs"] == n_prompts - final["ties"] and len(pairs) > 0
    for p in pairs:
        text = (lambda c: c if isinstance(c, str) else c[0]["content"])
        assert p["score_chosen"] > p["score_rejected"]
        assert vowels(text(p["chosen"])) == pytest.approx(p["score_chosen"])
        assert vowels(text(p["rejected"])) == pytest.approx(p["score_rejected"])
    tok = load_tokenizer(tiny_model)
    assert len(load_sft([str(out / "best.jsonl")], tok, 256)[0]) == n_prompts
    assert len(load_preference([str(out / "pairs.jsonl")], tok, 256)[0]) == len(pairs)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == ([1, 2, 2] if n_prompts == 6 else [1, 1])
    assert (out / "config.yaml").is_file() and not list(out.glob(".best-of-n-shard-*"))


def test_truncated_completions_are_not_kept_by_default(tiny_model, toy, tmp_path):
    """Reward = 1 for a truncated completion, so one would always win if it were eligible."""
    model, tok = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    with torch.no_grad():  # make stop tokens likely: ~40% of 12-token samples end
        model.get_input_embeddings().weight[stop_token_ids(tok)] *= 16
    save_model(model, tok, tmp_path / "stopping")
    (toy / "rw.py").write_text(f"STOPS = {stop_token_ids(tok)}\n" + REWARDS)
    strict, loose = toy / "strict", toy / "loose"
    f1 = cli(bon_args(tmp_path / "stopping", toy, strict, "chat.jsonl", "truncated"))
    f2 = cli(bon_args(tmp_path / "stopping", toy, loose, "chat.jsonl", "truncated", "--keep-truncated"))
    kept = lines(strict / "best.jsonl")
    assert 0 < len(kept) == f1["kept"] and f1["kept"] + f1["skipped_prompts"] == 6
    assert all(r["reward"] == 0.0 for r in kept)
    assert f2["kept"] == 6 and all(r["reward"] == 1.0 for r in lines(loose / "best.jsonl"))


def test_reward_model_and_two_processes(tiny_model, toy, tmp_path):
    """--reward-model with a weighted reward function; 2 processes write the same files as 1."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(tiny_model).save_pretrained(tmp_path / "rm")
    args = bon_args(tiny_model, toy, None, "chat.jsonl", "vowels", "--keep-truncated", "--pairs",
                    "--reward-model", str(tmp_path / "rm"), "--reward-weights", "0.5", "1.0")
    one, two = toy / "one", toy / "two"
    final = cli(args + ["--output", str(one)])
    assert final["reward_best"] > final["reward_mean"] and "reward/reward_model" in final
    r = run_torchrun(*args, "--output", str(two))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("best.jsonl", "pairs.jsonl"):
        a, b = lines(one / name), lines(two / name)
        assert [x.get("messages", x.get("chosen")) for x in a] == [x.get("messages", x.get("chosen")) for x in b]
        assert [x.get("reward", x.get("score_chosen")) for x in a] == pytest.approx(
            [x.get("reward", x.get("score_chosen")) for x in b], abs=1e-5)


def test_causal_lm_is_refused_as_reward_model(tiny_model, toy):
    """A causal LM has no trained score head: the kept "best" would be chosen by random numbers."""
    with pytest.raises(SystemExit, match="--reward-model .* is not a reward model.*alignkit reward"):
        cli(bon_args(tiny_model, toy, toy / "out", "chat.jsonl", "vowels", "--reward-model", str(tiny_model)))


@pytest.mark.parametrize("flag", ["--group-size", "--n", "--num-samples"])
def test_samples_per_prompt_is_group_size_as_in_ppo_and_grpo(tiny_model, toy, flag):
    """One name for one thing across commands: --group-size, with the older names kept as aliases."""
    args = [a for a in bon_args(tiny_model, toy, toy / "out", "plain.jsonl") if a not in ("--num-samples", "8")]
    final = cli(args + [flag, "3", "--max-prompts", "2", "--max-new-tokens", "4"])
    assert final["completions"] == 2 * 3
