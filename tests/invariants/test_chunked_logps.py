"""The recipes' log-probs without materialised logits (`models.install_token_logps` ->
`losses.linear_token_logps`) equal today's full-logits path: next_token_logps, completion_logps and PPO's
temperature-scaled log-probs and entropies, in values and in every parameter's gradient, on tied (llama) and
untied (qwen2) embeddings, under LoRA, --autocast bf16 and --compile; models whose output layer is not a plain
nn.Linear take the full-logits path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alignkit import models
from alignkit.logprobs import completion_logps, next_token_logps, pack_completions, shifted_logits
from alignkit.losses import sequence_logps, token_entropy, token_logps
from alignkit.models import init_model, load_causal_lm, load_tokenizer, prepare
from alignkit.recipes.ppo import completion_token_logps, pack_rollout
from alignkit.train.batching import collate


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def make(arch: str, tok, tiny_model):
    """Tiny llama with tied embeddings (the shared fixture) or a tiny qwen2 with an untied lm_head."""
    if arch == "llama":
        return load_causal_lm(tiny_model)
    return init_model("qwen2", "tiny", tok, seed=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)


def sft_batch(tok):
    """Three right-padded rows of different lengths; the first tokens of each (a "prompt") do not count."""
    texts = ["Ada has a dog.", "Dana Jessop lives in a small town by the sea.", "Hi"]
    seqs = [tok.encode(t) for t in texts]
    masks = [[0] * 2 + [1] * (len(s) - 2) for s in seqs]
    return collate(seqs, masks, tok.pad_token_id, "cpu")


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True) if params else ()


def assert_close_grads(got, want, atol=1e-5, rtol=1e-5):
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def full_next_token(model, batch):
    logits, labels, mask = shifted_logits(model, **batch)  # the full-logits path: (B, T-1, V)
    return token_logps(logits, labels), mask.float()


def check_next_token_and_completion(model, tok, atol=1e-5, rtol=1e-5):
    batch = sft_batch(tok)
    logps, mask = next_token_logps(model, **batch)
    ref, ref_mask = full_next_token(model, batch)
    assert torch.equal(mask, ref_mask)
    w = torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    m = mask.bool()
    torch.testing.assert_close(logps[m], ref[m], atol=atol, rtol=rtol)
    assert not logps[~m].any()  # positions that do not count are not scored
    assert_close_grads(grads(model, (logps * w * mask).sum()), grads(model, (ref * w * mask).sum()), atol, rtol)
    packed = pack_completions([tok.encode("Q: hi"), tok.encode("Q: who lives by the sea?")],
                              [tok.encode(" A dog."), tok.encode(" Dana")], tok.pad_token_id)
    sums, lengths, per_token = completion_logps(model, packed)
    logits, labels, cmask = shifted_logits(model, **packed)
    ref_sums, ref_per_token = sequence_logps(logits, labels, cmask, per_token=True)
    torch.testing.assert_close(sums, ref_sums, atol=atol, rtol=rtol)
    torch.testing.assert_close(per_token, ref_per_token, atol=atol, rtol=rtol)
    assert lengths.tolist() == cmask.sum(-1).tolist()
    assert_close_grads(grads(model, sums.sum()), grads(model, ref_sums.sum()), atol, rtol)


def uses_fused_head(model, tok) -> bool:
    """Whether the forward took the hidden-state path (only it returns the last hidden states)."""
    batch = sft_batch(tok)
    labels = batch["input_ids"].clone()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                token_labels=labels)
    return out.last_hidden_state is not None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_next_token_and_completion_logps_equal_the_full_logits_path(arch, tok, tiny_model):
    model = make(arch, tok, tiny_model).train()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch == "llama")
    check_next_token_and_completion(model, tok)
    assert uses_fused_head(model, tok)


def test_next_token_logps_at_a_temperature_are_of_the_scaled_logits(tok, tiny_model):
    """next_token_logps(temperature=T) (GRPO's trainer) is log_softmax(logits / T) at the next token, on the
    chunked path and on the full-logits fallback alike."""
    model = make("llama", tok, tiny_model).eval()
    batch = sft_batch(tok)
    logits, labels, mask = shifted_logits(model, **batch)
    want = torch.log_softmax(logits / 0.5, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    m = mask.bool()
    chunked, _ = next_token_logps(model, **batch, temperature=0.5)
    torch.testing.assert_close(chunked[m], want[m], atol=1e-5, rtol=1e-5)
    plain = lambda **kw: model(**kw)  # not a transformers model: the full-logits fallback
    fallback, _ = next_token_logps(plain, **batch, temperature=0.5)
    torch.testing.assert_close(fallback[m], want[m], atol=1e-5, rtol=1e-5)
    assert (chunked[m] - next_token_logps(model, **batch)[0][m]).abs().max() > 1e-2  # the temperature matters


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ppo_logps_and_entropy_with_temperature_equal_the_full_logits_path(arch, tok, tiny_model):
    model = make(arch, tok, tiny_model).eval()
    prompts = [tok.encode("Q: hi"), tok.encode("Q: who lives by the sea?")]
    completions = [tok.encode(" A dog and a cat."), tok.encode(" Dana")]
    batch = pack_rollout(prompts, completions, 8, tok.pad_token_id, "cpu")
    logps, entropy, _ = completion_token_logps(model, batch, 0.7, entropy=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    rows = torch.arange(2)[:, None]
    logits = out.logits[rows, batch["positions"]] / 0.7  # (B, W, V): today's completion_logits
    ref_logps, ref_entropy = token_logps(logits, batch["labels"]), token_entropy(logits)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(logps.shape, generator=g), torch.randn(logps.shape, generator=g)
    assert_close_grads(grads(model, (logps * w1 + entropy * w2).sum()),
                       grads(model, (ref_logps * w1 + ref_entropy * w2).sum()))


def lora_model(tiny_model, targets="all-linear"):
    import peft

    model = load_causal_lm(tiny_model)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():  # B = 0 at init: move it so the adapters change the outputs
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_lora_equals_the_full_logits_path_with_and_without_adapters(tok, tiny_model):
    from alignkit import lora

    model = lora_model(tiny_model)
    prepare(model, SimpleNamespace())
    check_next_token_and_completion(model, tok)
    assert uses_fused_head(model, tok)
    with lora.reference(model):  # the reference of the preference and RL recipes
        check_next_token_and_completion(model, tok)


def test_lora_on_lm_head_falls_back_to_full_logits(tok, tiny_model):
    model = lora_model(tiny_model, ["q_proj", "lm_head"])
    assert models._fused_head(models._causal_lm(model)) is None
    check_next_token_and_completion(model, tok)
    assert not uses_fused_head(model, tok)


def test_autocast_bf16_equals_the_full_logits_path_under_autocast(tok, tiny_model):
    """Both paths run the output layer's matmul in bfloat16 (the fused one blockwise): equal to bf16 rounding."""
    model = prepare(load_causal_lm(tiny_model), SimpleNamespace(autocast="bf16")).train()
    logps, _ = next_token_logps(model, **sft_batch(tok))
    assert logps.dtype == torch.float32
    exact, _ = next_token_logps(load_causal_lm(tiny_model), **sft_batch(tok))
    assert (logps - exact).abs().max() > 1e-4  # autocast ran
    check_next_token_and_completion(model, tok, atol=2e-2, rtol=2e-2)
    assert uses_fused_head(model, tok)


@pytest.mark.slow  # a minute of compiling; test_speed_paths' --compile trajectory test covers this path in CI
def test_compiled_model_equals_the_eager_full_logits_path(tok, tiny_model):
    """torch.compile (dynamic shapes, as --compile) of the forward that takes token_labels=, on two shapes."""
    eager = load_causal_lm(tiny_model).train()
    compiled = prepare(load_causal_lm(tiny_model), SimpleNamespace(compile=True)).train()
    for batch in (sft_batch(tok), collate([tok.encode("Ada has a small dog by the sea.")] * 2, [[1] * 11] * 2,
                                          tok.pad_token_id, "cpu")):
        logps, mask = next_token_logps(compiled, **batch)
        ref, _ = full_next_token(eager, batch)
        m = mask.bool()
        torch.testing.assert_close(logps[m], ref[m], atol=1e-5, rtol=1e-5)
        assert_close_grads(grads(compiled, (logps * mask).sum()), grads(eager, (ref * mask).sum()), 1e-5, 1e-4)
