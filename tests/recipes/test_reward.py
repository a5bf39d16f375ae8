"""alignkit reward: a Bradley-Terry reward model learns separable pairs (held out too), its score
ignores padding, and the saved model is a plain HF sequence classifier with the same scores."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from alignkit.cli import run as cli
from alignkit.data import load_preference
from alignkit.models import load_tokenizer
from alignkit.recipes.reward import evaluate, forward_tokens, load_reward_model, pair_rewards
from alignkit.train.batching import StepPlan, grouped_batches
from helpers import ranked_preferences, read_metrics, run_cli, toy_preferences, run_torchrun


@pytest.fixture(scope="module")
def data(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    return toy_preferences(assets, root / "train.jsonl", slice(0, 320)), toy_preferences(
        assets, root / "eval.jsonl", slice(320, None))


def rm_args(model, train, out, *extra):
    return ["reward", "--model", str(model), "--data", str(train), "--output", str(out), "--max-length", "64",
            "--lr", "3e-3", "--warmup-steps", "5", "--batch-size", "8", "--no-progress", *extra]


def test_reward_model_learns_separable_pairs_and_generalises(tiny_model, data, tmp_path):
    train, held_out = data
    tok = load_tokenizer(tiny_model)
    eval_pairs = load_preference([str(held_out)], tok, 64)[0]
    untrained = evaluate(load_reward_model(tiny_model, pad_token_id=tok.pad_token_id), eval_pairs, None,
                         tok.pad_token_id, 16)

    out = tmp_path / "rm"
    final = cli(rm_args(tiny_model, train, out, "--max-steps", "40", "--eval-data", str(held_out),
                        "--eval-every", "20"))
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r and not r.get("final")]
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in evals] == [20, 40]
    assert sum(r["accuracy"] for r in train_rows[-10:]) / 10 > 0.85
    assert train_rows[-1]["margin"] > train_rows[0]["margin"] + 1
    assert final["eval_accuracy"] >= 0.85 and final["eval_accuracy"] > untrained["accuracy"] + 0.2
    assert final["eval_ece"] < untrained["ece"] + 0.1 and 0 <= final["eval_ece"] <= 1
    assert final["pairs"] == 40 * 8 and final["tokens"] > 0
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == 100 and report["accuracy"] == final["eval_accuracy"]
    assert sum(b["count"] for b in report["bins"]) == 200  # each pair scored both ways

    # The output is a plain HF sequence classifier that gives the same scores as during training.
    saved = AutoModelForSequenceClassification.from_pretrained(out)
    assert saved.config.num_labels == 1 and saved.config.pad_token_id == tok.pad_token_id
    again = evaluate(saved, eval_pairs, None, tok.pad_token_id, 7)
    assert again["accuracy"] == report["accuracy"]
    assert again["margin"] == pytest.approx(report["margin"], abs=1e-5)


def test_score_ignores_padding(tiny_model, data):
    train, _ = data
    tok = load_tokenizer(tiny_model)
    model = load_reward_model(tiny_model, pad_token_id=tok.pad_token_id).eval()
    with torch.no_grad():  # a head whose output varies a lot with the token it reads
        model.score.weight.normal_(0, 1)
    pairs = load_preference([str(train)], tok, 64)[0]
    size = lambda ex: len(ex.prompt_ids) + len(ex.chosen_ids)  # noqa: E731
    short, long = min(pairs, key=size), max(pairs, key=size)
    assert size(long) > size(short) + 5
    with torch.no_grad():
        alone = pair_rewards(model, [short], tok.pad_token_id, "cpu")
        batched = pair_rewards(model, [short, long], tok.pad_token_id, "cpu")
        last_token_moved = pair_rewards(model, [short.__class__(short.prompt_ids, short.chosen_ids[:-1],
                                                                short.rejected_ids)], tok.pad_token_id, "cpu")
    assert alone[0].item() == pytest.approx(batched[0][0].item(), abs=1e-4)
    assert alone[1].item() == pytest.approx(batched[1][0].item(), abs=1e-4)
    assert abs(alone[0].item() - last_token_moved[0].item()) > 1e-2  # the score does read the last token


def test_pairs_of_a_ranking_score_each_answer_once(tiny_model, assets, tmp_path):
    tok = load_tokenizer(tiny_model)
    model = load_reward_model(tiny_model, pad_token_id=tok.pad_token_id).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1)
    pairs = load_preference([str(ranked_preferences(assets, tmp_path / "r.jsonl", prompts=2))], tok, 256)[0]
    with torch.no_grad():
        r_c, r_r, batch = pair_rewards(model, pairs, tok.pad_token_id, "cpu")
        alone = [pair_rewards(model, [p], tok.pad_token_id, "cpu") for p in pairs]
    assert batch["input_ids"].shape[0] == 6  # 2 prompts x 3 answers, not 2 x 6 rows
    assert forward_tokens(pairs) == int((batch["input_ids"] != tok.pad_token_id).sum()) < sum(
        forward_tokens([p]) for p in pairs)
    assert r_c.tolist() == pytest.approx([a[0].item() for a in alone], abs=1e-5)
    assert r_r.tolist() == pytest.approx([a[1].item() for a in alone], abs=1e-5)
    assert r_c[0] == r_c[1] and r_r[1] == r_r[2]  # the same answer, one score


def test_grouped_batches_keep_prompts_whole():
    keys = ["a"] * 3 + ["b"] * 6 + ["c"] * 3 + ["d"] * 1 + ["a"] * 1 + ["e"] * 2
    batches = grouped_batches(keys, groups_per_batch=2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert sorted(len({keys[i] for i in b}) for b in batches) == [1, 2, 2]
    for k in set(keys):
        assert sum(any(keys[i] == k for i in b) for b in batches) == 1, k
    others = [grouped_batches(keys, 2, seed=s) for s in range(1, 6)]
    assert grouped_batches(keys, 2, seed=0) == batches and any(o != batches for o in others)
    assert all(len(o) == len(batches) for o in others)  # the same number of steps in every epoch
    # A sampler whose epochs differ in length would leave steps without data (a NaN loss): refused.
    plan = StepPlan(lambda epoch: [[0], [1], [2]] if epoch == 0 else [[0], [1]], grad_accum=1, world_size=1)
    assert plan.micro_batches(2, 0) == [[2]]
    with pytest.raises(ValueError, match="epoch 1 makes 2 batches"):
        plan.micro_batches(3, 0)


def test_training_reads_the_score_where_the_scorer_does_when_pad_is_eos(tiny_model, data):
    """pad == EOS (load_tokenizer's choice for tokenizers without a pad token, e.g. Llama 3, whose turns end
    with the EOS): HF's classifier reads the rightmost non-pad token, the one before the final EOS. Training
    reads the last real token, as RewardModelScorer does, so PPO scores where the RM was trained."""
    train, _ = data
    tok = load_tokenizer(tiny_model)
    eos = tok.eos_token_id
    model = load_reward_model(tiny_model, pad_token_id=eos).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1)
    ex = load_preference([str(train)], tok, 64)[0][0]
    pair = ex.__class__(ex.prompt_ids, ex.chosen_ids + [eos], ex.rejected_ids + [eos, eos])
    with torch.no_grad():
        r_c, r_r, _ = pair_rewards(model, [pair], eos, "cpu")
        read = [model.score(model.model(input_ids=torch.tensor([pair.prompt_ids + c])).last_hidden_state[0, -1]).item()
                for c in (pair.chosen_ids, pair.rejected_ids)]
        hf = model(input_ids=torch.tensor([pair.prompt_ids + pair.chosen_ids])).logits[0, 0].item()
    assert [r_c.item(), r_r.item()] == pytest.approx(read, abs=1e-5)
    assert abs(hf - read[0]) > 1e-3  # HF's pooling would have read another token


def test_margin_column_enters_the_loss(tiny_model, assets, tmp_path):
    data = toy_preferences(assets, tmp_path / "m.jsonl", slice(0, 32), margin=3.0)
    for flag, low, high in (([], 0.6, 0.8), (["--margin"], 2.9, 3.2)):  # -log sigmoid(~0 - m)
        out = tmp_path / f"m{len(flag)}"
        cli(rm_args(tiny_model, data, out, "--max-steps", "1", *flag))
        assert low < read_metrics(out)[0]["loss"] < high


def test_lora_reward_model_trains_adapters_and_the_head(tiny_model, data, tmp_path):
    pytest.importorskip("peft")
    train, _ = data
    out = tmp_path / "lora"
    cli(rm_args(tiny_model, train, out, "--max-steps", "6", "--lora-r", "4"))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    # peft's SEQ_CLS task keeps the new scalar head trainable and saves it with the adapters
    assert any(k.endswith("score.weight") for k in adapter) and any("lora_" in k for k in adapter)
    assert all("lora_" in k or "score" in k for k in adapter)


@pytest.mark.parametrize("grouping", ["pairs", "rankings"])
def test_two_process_ddp_matches_one_process(tiny_model, data, assets, tmp_path, grouping):
    """DDP wraps the last-token reader (`LastTokenReward`), not the HF classifier: same trajectory. Also
    with whole rankings per micro-batch (--group-by-prompt), whose pair counts differ between ranks."""
    if grouping == "pairs":
        train, flags = data[0], ["--batch-size", "4"]
    else:  # rankings of 3 answers, and a prompt whose ranking has only 2 of its pairs
        train = ranked_preferences(assets, tmp_path / "ranked.jsonl", prompts=8)
        train.write_text("".join(train.read_text().splitlines(keepends=True)[:-1]))
        flags = ["--batch-size", "1", "--group-by-prompt"]
    r = run_cli(*rm_args(tiny_model, train, tmp_path / "one", "--max-steps", "4", *flags, "--grad-accum", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_torchrun(*rm_args(tiny_model, train, tmp_path / "two", "--max-steps", "4", *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = ([row["loss"] for row in read_metrics(tmp_path / run) if "loss" in row] for run in ("one", "two"))
    assert len(a) == 4 and a == pytest.approx(b, abs=1e-5)
    assert a[0] - min(a) > 0.05


def test_autocast_reaches_the_reward_models_forward(tiny_model, data, tmp_path):
    """--autocast applies to the forward `LastTokenReward` runs (the backbone), not only to the
    classifier's own forward, which training never calls."""
    train, _ = data
    losses = {}
    for flag in ("bf16", "none"):
        cli(rm_args(tiny_model, train, tmp_path / flag, "--max-steps", "4", "--autocast", flag))
        losses[flag] = [r["loss"] for r in read_metrics(tmp_path / flag) if not r.get("final")]
    assert losses["bf16"] == pytest.approx(losses["none"], rel=5e-2)
    assert losses["bf16"] != losses["none"]  # bfloat16 matmuls ran


def test_compile_reaches_the_reward_models_forward(tiny_model, data, tmp_path, monkeypatch):
    train, _ = data
    calls = []

    def counting_compile(module, *args, **kwargs):  # eager, but counts the calls that would run compiled
        def compiled_call(*a, **k):
            calls.append(type(module).__name__)
            return module._call_impl(*a, **k)
        module._compiled_call_impl = compiled_call

    monkeypatch.setattr(torch.nn.Module, "compile", counting_compile)
    cli(rm_args(tiny_model, train, tmp_path / "compiled", "--max-steps", "2", "--compile"))
    assert len(calls) >= 2, calls  # at least one compiled forward per step


def test_a_new_head_is_said_once_without_transformers_load_report(tiny_model, data, tmp_path):
    """Starting from a causal LM, the reward model's score head is new, as expected: one plain line says so,
    and transformers' LOAD REPORT listing score.weight as MISSING does not appear (in a fresh process,
    as a user runs it)."""
    r = run_cli(*rm_args(tiny_model, data[0], tmp_path / "rm", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("score head is new") == 1
    assert "LOAD REPORT" not in r.stdout + r.stderr and "MISSING" not in r.stdout + r.stderr
