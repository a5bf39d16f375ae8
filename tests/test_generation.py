"""The KV-cached decoder against transformers' own `generate` and forward, and the sampling helper."""

from __future__ import annotations

import pytest
import torch

from alignkit.decoding import sample_next
from alignkit.generation import KVDecoder, generate, supports_fast_decoding
from alignkit.models import init_model, load_tokenizer, stop_token_ids


def hf_greedy(model, prompt, n, stops, pad):
    seq = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=stops,
                         pad_token_id=pad)[0, len(prompt):].tolist()
    cut = next((j + 1 for j, t in enumerate(seq) if t in stops), len(seq))
    return seq[:cut]


ARCHS = {  # GQA, biases (qwen2's q/k/v), tied and untied heads
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_transformers_for_every_prompt_length(tiny_model, arch):
    tok = load_tokenizer(tiny_model)
    model = init_model(arch, "tiny", tok, seed=3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       max_position_embeddings=256, **ARCHS[arch]).eval()
    if arch == "qwen2":  # random biases, so a dropped bias would show
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    assert supports_fast_decoding(model)
    stops, pad = stop_token_ids(tok, model), tok.pad_token_id
    prompts = [tok.encode(t) for t in ("Hello there", "a", "The cat sat on the mat and looked at the door", "x y")]
    ours = KVDecoder(model).generate(prompts, 24, stops, pad)  # one left-padded batch
    for p, got in zip(prompts, ours):
        assert got == hf_greedy(model, p, 24, stops, pad)


def test_last_logits_match_the_full_forward(tiny_model):
    """Prefill on a left-padded batch, then token by token: each step's logits equal a plain forward
    over the unpadded sequence so far."""
    from alignkit.generation import left_pad

    tok = load_tokenizer(tiny_model)
    model = init_model("llama", "tiny", tok, seed=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256).eval()
    dec = KVDecoder(model)
    prompts = [tok.encode("one two three four five"), tok.encode("six")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    B, T = ids.shape
    total = T + 3
    cache = [tuple(torch.zeros(B, dec.n_kv, total, dec.head_dim) for _ in range(2)) for _ in dec.layers]
    valid = torch.zeros(B, total, dtype=torch.bool)
    valid[:, :T] = mask.bool()
    cos, sin = model.model.rotary_emb(cache[0][0], torch.arange(total)[None])
    cos, sin = cos[0], sin[0]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        logits = dec._forward(ids, cos[pos], sin[pos], cache, valid, 0)
        nxt = mask.sum(-1, keepdim=True)
        for t in range(T, total):
            for i, s in enumerate(seqs):
                ref = model(input_ids=torch.tensor([s])).logits[0, -1]
                torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)
            token = torch.tensor([7, 9])
            for s, x in zip(seqs, token.tolist()):
                s.append(x)
            valid[:, t] = True
            logits = dec._forward(token[:, None], cos[nxt], sin[nxt], cache, valid, t)
            nxt = nxt + 1


def test_finished_rows_stop_and_others_continue(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = init_model("llama", "tiny", tok, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256).eval()
    prompts = [tok.encode("a b"), tok.encode("c d e"), tok.encode("f")]
    free = KVDecoder(model).generate(prompts, 12, [], tok.pad_token_id)  # no stop tokens: full length
    assert [len(c) for c in free] == [12, 12, 12]
    # Make a token that only the 2nd row produces a stop token: that row ends
    # there, the others are unchanged.
    k = next(k for k in range(12) if free[1][k] not in free[0] + free[2] + free[1][:k])
    got = KVDecoder(model).generate(prompts, 12, [free[1][k]], tok.pad_token_id)
    assert got[1] == free[1][:k + 1] and got[0] == free[0] and got[2] == free[2]


def test_generate_falls_back_to_transformers_for_other_models(tiny_model, monkeypatch):
    tok = load_tokenizer(tiny_model)
    model = init_model("llama", "tiny", tok, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256).eval()
    prompts = [tok.encode("hello world"), tok.encode("x")]
    fast = generate(model, tok, prompts, 10)
    monkeypatch.setattr("alignkit.generation.supports_fast_decoding", lambda m: False)
    assert generate(model, tok, prompts, 10) == fast


def test_sample_next_top_p_keeps_only_the_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    got = sample_next(logits, 1.0, top_p=0.75)  # nucleus {0, 1}: 0.5 < 0.75 <= 0.8
    counts = torch.bincount(got, minlength=4).float() / len(got)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.03
    full = torch.bincount(sample_next(logits, 1.0, top_p=1.0), minlength=4).float() / len(got)
    assert abs(full[3].item() - 0.05) < 0.015
    assert sample_next(logits[:2], 0.0, 1.0).tolist() == [0, 0]
