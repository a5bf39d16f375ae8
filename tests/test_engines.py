"""The rollout-engine interface: the local engine gives the samples of today's sampler, copies weights only into a
copy it owns, scores its samples when asked; the vLLM engine fails with one line without CUDA and vllm."""

import pytest
import torch

from alignkit.decoding import DecodingRules
from alignkit.engines import LocalEngine, check_engine, policy_weights, sampled_logps
from alignkit.errors import UserError
from alignkit.generation import sample_groups
from alignkit.logprobs import next_token_logps, pack_completions
from alignkit.models import load_causal_lm, load_tokenizer, stop_token_ids


@pytest.fixture(scope="module")
def policy(tiny_model):
    return load_causal_lm(tiny_model).eval(), load_tokenizer(tiny_model)


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.mark.parametrize("fast", [True, False], ids=["kv-decoder", "hf-generate"])
def test_local_engine_samples_as_sample_groups(policy, fast, monkeypatch):
    model, tok = policy
    if not fast:  # transformers' generate path: the decoder refuses the model
        monkeypatch.setattr("alignkit.generation.supports_fast_decoding", lambda m: False)
    rules = DecodingRules(stop_ids=stop_token_ids(tok, model), repetition_penalty=1.3, top_k=20, tokenizer=tok)
    for kwargs in ({}, {"rules": rules}):
        torch.manual_seed(123)
        want = sample_groups(model, tok, PROMPTS, 4, 10, 1.0, 0.9, 64, kwargs.get("rules"))
        got = LocalEngine(model, tok).generate(PROMPTS, 4, 10, 1.0, 0.9, seed=123, **kwargs)
        assert (got.completion_ids, got.ended) == want and got.logps is None
    assert len(set(map(tuple, got.completion_ids))) > 1  # sampled, not all equal


def test_load_weights_copies_only_into_an_owned_copy(policy, tiny_model):
    model, tok = policy
    LocalEngine(model, tok).load_weights(iter(()))  # the policy itself: nothing to copy, nothing read
    copy = load_causal_lm(tiny_model)
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()
    LocalEngine(copy, tok, owns_copy=True).load_weights(policy_weights(model))
    for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b), name


def test_policy_weights_merge_lora_under_transformers_names(tiny_model):
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(tiny_model)
    names = set(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(x).logits
    weights = dict(policy_weights(model))
    assert set(weights) == names
    plain = load_causal_lm(tiny_model)
    plain.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x).logits, want)  # unmerged again afterwards


def test_sampled_logps_are_the_models_own(policy):
    model, tok = policy
    out = LocalEngine(model, tok, logps_temperature=1.0).generate(PROMPTS, 2, 8, 1.0, seed=0)
    prompts = [p for p in PROMPTS for _ in range(2)]
    logps, mask = next_token_logps(model, **pack_completions(prompts, out.completion_ids, tok.pad_token_id))
    for i, lp in enumerate(out.logps):
        start = len(prompts[i]) - 1
        assert len(lp) == len(out.completion_ids[i])
        torch.testing.assert_close(torch.tensor(lp), logps[i, start:start + len(lp)], atol=1e-5, rtol=1e-5)
    hot = sampled_logps(model, prompts, out.completion_ids, tok.pad_token_id, temperature=0.5)
    assert hot != out.logps


def test_vllm_engine_without_cuda_or_vllm_is_one_clear_line():
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA message")
    with pytest.raises(UserError, match=r"^--rollout-engine vllm: needs CUDA and vllm \(pip install 'alignkit\[vllm\]'\); "
                                        r"this machine has (no CUDA device and no vllm|vllm but no CUDA device)$"):
        check_engine("vllm")
    check_engine("local")
    with pytest.raises(UserError, match="--rollout-engine must be one of local, vllm"):
        check_engine("sglang")
