"""Reward functions: loading by MODULE:FUNCTION, the built-in verifiable rewards, scoring with errors that
name the function and the offending sample, and the reward-model scorer's padding."""

import math
import sys

import pytest
import torch

from alignkit.rewards import (RewardError, RewardModelScorer, format_check, load_reward_function, numeric_match,
                              score_completions)

MSG = [{"role": "user", "content": "What is 2 plus 3?"}]


def test_load_reward_function_by_module_and_file(tmp_path):
    assert load_reward_function("alignkit.rewards:numeric_match") is numeric_match
    f = tmp_path / "my_rewards.py"
    f.write_text("def score(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"
                 "NOT_CALLABLE = 3\n")
    fn = load_reward_function(f"{f}:score")
    assert fn(["p"], ["abc"]) == [3.0]
    with pytest.raises(SystemExit, match="no attribute 'nope'.*score"):
        load_reward_function(f"{f}:nope")
    with pytest.raises(SystemExit, match="not a function"):
        load_reward_function(f"{f}:NOT_CALLABLE")
    with pytest.raises(SystemExit, match="does not exist"):
        load_reward_function(f"{tmp_path}/missing.py:score")
    with pytest.raises(SystemExit, match="cannot import module"):
        load_reward_function("no_such_module_xyz:score")
    with pytest.raises(SystemExit, match="MODULE:FUNCTION"):
        load_reward_function("numeric_match")


def test_reward_file_can_import_its_sibling_modules(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "ak_reward_helpers_xyz.py").write_text("def bonus():\n    return 2.0\n")
    f = tmp_path / "sibling_rewards.py"
    f.write_text("from ak_reward_helpers_xyz import bonus\n"
                 "def score(prompts, completions, **kw):\n    return [bonus() for _ in completions]\n")
    assert load_reward_function(f"{f}:score")(["p"], ["a", "b"]) == [2.0, 2.0]
    assert sys.path[-1] == str(tmp_path.resolve())


def test_numeric_match_and_format_check():
    comps = ["The answer is 5.", "5", "It is 5.0", "I think 4, no wait: 1,005", "no number", "5 apples, or 6"]
    assert numeric_match([MSG] * 6, comps, answer=["5", "5", 5, "1005", "5", "5"]) == [1, 1, 1, 1, 0, 0]
    conv = [[{"role": "assistant", "content": "2 + 3 = 5"}], [{"role": "assistant", "content": "-5"}]]
    assert numeric_match([MSG] * 2, conv, answer=["5", "5"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        numeric_match([MSG], ["5"])
    assert format_check([MSG] * 5, ["The answer is 5.", "5", "", "The answer is", "5 is the ans"]) == [1, 1, 0, 0, 0]


def test_score_completions_weights_none_and_kwargs(capsys):
    def length(prompts, completions, **kw):
        assert kw["trainer_state"].global_step == 7 and kw["completion_ids"] == [[1], [2, 3], [4]]
        return [len(c) for c in completions]

    def only_answer(completions, answer):  # no **kwargs: gets only the arguments it names
        return [None if a == "skip" else 1.0 for a in answer]

    from types import SimpleNamespace
    total, per = score_completions([length, only_answer], ["p"] * 3, ["a", "bb", "c"],
                                   {"answer": ["1", "skip", "2"]}, weights=[0.5, 2.0],
                                   completion_ids=[[1], [2, 3], [4]], trainer_state=SimpleNamespace(global_step=7))
    assert total.tolist() == [2.5, 1.0, 2.5]  # None adds nothing
    assert per["length"].tolist() == [1, 2, 1] and math.isnan(per["only_answer"][1])
    total, _ = score_completions([only_answer], ["p"], ["x"], {"answer": ["skip"]})
    assert total.tolist() == [0.0] and "every reward function returned None" in capsys.readouterr().err


def test_reward_errors_name_function_and_sample():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    prompts[2] = [{"role": "user", "content": "boom here"}]
    comps = ["a", "b", "c", "d"]

    def fragile(prompts, completions, **kw):
        out = []
        for p in prompts:
            if "boom" in p[0]["content"]:
                raise KeyError("cannot parse")
            out.append(1.0)
        return out

    with pytest.raises(RewardError, match=r"(?s)'fragile' failed on sample 2 of 4.*KeyError.*boom here.*'c'"):
        score_completions([fragile], prompts, comps, {"answer": ["1", "2", "3", "4"]})
    total, per = score_completions([fragile], prompts, comps, {}, on_error="nan")
    assert torch.isnan(total[2]) and total[[0, 1, 3]].tolist() == [1.0, 1.0, 1.0]

    with pytest.raises(RewardError, match="'short' returned 3 values for 4 completions"):
        score_completions([_named("short", lambda prompts, completions, **k: [1.0] * 3)], prompts, comps, {})
    with pytest.raises(RewardError, match=r"(?s)'texty' returned 'good' \(str\) for sample 1 of 4.*'b'"):
        score_completions([_named("texty", lambda prompts, completions, **k: [1.0, "good", 0.0, 0.0])],
                          prompts, comps, {})
    with pytest.raises(RewardError, match=r"(?s)'nanny' returned nan for sample 3.*--skip-nonfinite"):
        score_completions([_named("nanny", lambda prompts, completions, **k: [1.0, 0.0, 0.0, float("nan")])],
                          prompts, comps, {})
    with pytest.raises(RewardError, match="'scalar' returned a float"):
        score_completions([_named("scalar", lambda prompts, completions, **k: 1.0)], prompts, comps, {})
    # numeric_match without an answer column: the error says what is missing, for which sample.
    with pytest.raises(RewardError, match=r"(?s)'numeric_match' failed on sample 0.*needs an 'answer' column"):
        score_completions([numeric_match], prompts, comps, {})


def _named(name, fn):
    fn.__name__ = name
    return fn


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    out = tmp_path_factory.mktemp("rm")
    rm.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def test_reward_model_scorer_padding_and_eos(tiny_model, reward_model_dir):
    """Batched, right-padded scoring reads the head at each sequence's last real token: it equals scoring
    each sequence alone, even when the pad id is the EOS id that completions end with."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    scorer = RewardModelScorer(str(reward_model_dir), tok)
    assert scorer.same_ids
    eos = tok.eos_token_id
    prompt_ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    completion_ids = [[20, 21, eos], [30, eos], [40, 41, 42, 43, 44]]
    scores = scorer(["x"] * 3, ["y"] * 3, completion_ids=completion_ids, prompt_ids=prompt_ids)
    ref = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    with torch.no_grad():
        alone = [ref(input_ids=torch.tensor([p + c])).logits[0, 0].item() for p, c in zip(prompt_ids, completion_ids)]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3
    scorer.batch_size = 2  # batches of similar lengths, scores in the input's order
    assert scorer(["x"] * 3, ["y"] * 3, completion_ids=completion_ids, prompt_ids=prompt_ids) == pytest.approx(alone, abs=1e-5)
    scorer.tokenizer.pad_token = scorer.tokenizer.eos_token  # pad == EOS: still the last real token
    assert scorer(["x"] * 3, ["y"] * 3, completion_ids=completion_ids, prompt_ids=prompt_ids) == pytest.approx(alone, abs=1e-5)
    # Without ids (or with another tokenizer) prompt + completion are rendered by the chat template.
    conv = scorer([MSG], [[{"role": "assistant", "content": "5"}]])
    from alignkit.data import render_prompt_completion
    ids = render_prompt_completion(tok, MSG, [{"role": "assistant", "content": "5"}]).input_ids
    with torch.no_grad():
        assert conv[0] == pytest.approx(ref(input_ids=torch.tensor([ids])).logits[0, 0].item(), abs=1e-5)


def test_reward_model_scorer_refuses_a_causal_lm(tiny_model, reward_model_dir):
    """One loader for every command's reward model (ppo's check): a causal LM's score head would be random."""
    from alignkit.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    with pytest.raises(SystemExit, match="is not a reward model"):
        RewardModelScorer(str(tiny_model), tok)
    assert RewardModelScorer(str(reward_model_dir), tok).model.config.num_labels == 1


def test_a_hanging_reward_function_stops_naming_itself_and_the_sample():
    """A reward that never returns (here: on one prompt) would hang the run; after the timeout the error
    names the function and the sample, even if the function catches every Exception."""
    import time

    prompts = [[{"role": "user", "content": q}] for q in ("q0", "q1", "stuck here", "q3")]

    def sleepy(prompts, completions, **kw):
        try:
            for p in prompts:
                if p[0]["content"] == "stuck here":
                    time.sleep(10 ** 6)
        except Exception:
            pass
        return [1.0] * len(prompts)

    with pytest.raises(RewardError, match=r"(?s)'sleepy' did not return within 0.3 s \(--reward-timeout\) on sample 2 "
                                          r"of 4.*stuck here.*'c'"):
        score_completions([sleepy], prompts, ["a", "b", "c", "d"], {}, timeout=0.3)
    total, _ = score_completions([sleepy], prompts[:2], ["a", "b"], {}, timeout=5)  # a quick call is unaffected
    assert total.tolist() == [1.0, 1.0]
