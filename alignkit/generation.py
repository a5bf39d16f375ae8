"""Batched generation: greedy or sampled (temperature, top-k, top-p, min-p), with the decoding rules of
`alignkit.decoding` (penalties, logit bias, EOS boost, stop strings), stopping each sequence at its first stop
token (EOS or end-of-turn) or stop string.

Two paths with the same greedy results. Llama-family decoders (Llama, Qwen2, Mistral without sliding
window) go through `KVDecoder`, a plain KV-cached loop over the model's own weights: on a CPU, rollouts
of small models are bound by per-op dispatch overhead more than by FLOPs, and this loop issues far
fewer ops per token than `transformers`' `generate` (measurements in docs/performance.md). Everything else
(other architectures, PEFT-wrapped models) uses `generate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from alignkit.decoding import DecodingRules, sample_next
from alignkit.models import stop_token_ids

FAST_MODEL_TYPES = ("llama", "qwen2", "mistral")


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T): every prompt ends at the same position, so new tokens line up."""
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, T - len(p):] = torch.as_tensor(p)
        attention_mask[i, T - len(p):] = 1
    return input_ids, attention_mask


def linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight_t (+ bias) with weight_t the (in, out) transpose of an nn.Linear weight."""
    y = x @ weight_t
    return y if bias is None else y + bias


def supports_fast_decoding(model) -> bool:
    """True for plain (not PEFT-wrapped) Llama/Qwen2/Mistral decoders without sliding-window attention."""
    cfg, inner = getattr(model, "config", None), getattr(model, "model", None)
    if cfg is None or getattr(cfg, "model_type", None) not in FAST_MODEL_TYPES or hasattr(model, "peft_config"):
        return False
    sliding = getattr(cfg, "use_sliding_window", True) and getattr(cfg, "sliding_window", None)
    return not sliding and getattr(cfg, "pretraining_tp", 1) == 1 and hasattr(inner, "layers") \
        and hasattr(inner, "rotary_emb")


class KVDecoder:
    """Greedy/sampled decoding for Llama-family models with a preallocated KV cache.

    Uses the model's own weights and its rotary-embedding and activation modules; q/k/v and gate/up
    projections are concatenated once per call (the weights change between RL steps) so each layer is
    four matmuls per token. Finished rows are dropped from the batch as they stop."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.embed = model.model.embed_tokens.weight
        self.norm = model.model.norm.weight
        # Weights are stored transposed, (in, out) contiguous: for the few rows of a decode step, x @ W^T
        # runs faster than F.linear(x, W) on the same data on CPU (docs/performance.md).
        self.lm_head, self.lm_head_bias = model.lm_head.weight.t().contiguous(), model.lm_head.bias
        self.scale = self.head_dim ** -0.5
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t().contiguous(), qkv_bias=qkv_bias,
                o=a.o_proj.weight.t().contiguous(), o_bias=a.o_proj.bias,
                gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous(),
                gate_up_bias=None if m.gate_proj.bias is None else torch.cat([m.gate_proj.bias, m.up_proj.bias]),
                down=m.down_proj.weight.t().contiguous(), down_bias=m.down_proj.bias, act=m.act_fn))

    def _forward(self, ids, cos, sin, cache, valid, t0):
        """Logits of the last position for tokens `ids` (B, S) at cache slots t0..t0+S-1, with rotary
        cos/sin (B, S, hd) of their positions. `valid` (B, >= t0+S) marks cache slots holding real tokens."""
        B, S = ids.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.head_dim
        h = F.embedding(ids, self.embed)  # (B, S, D)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, hd), broadcast over heads
        t1 = t0 + S
        if t0 == 0:  # the prompt: causal over real tokens
            eye = torch.eye(S, dtype=torch.bool, device=ids.device)
            # a left-padding query sees no real key and would make NaN (which then leaks through 0 * NaN
            # in later layers); it sees itself instead. Nothing real ever attends to it.
            mask = (valid[:, None, None, :S] & torch.ones_like(eye).tril()) | eye  # (B, 1, S, S)
        else:  # one new token per row
            mask = valid[:, None, None, :t1]  # (B, 1, 1, t1)
        for L, (k_cache, v_cache) in zip(self.layers, cache):
            x = F.rms_norm(h, (h.shape[-1],), L["ln1"], self.eps)
            qkv = linear(x, L["qkv"], L["qkv_bias"]).view(B, S, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H+2Hkv, S, hd)
            qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]
            # rotary embedding (Su et al. 2021) on q and k at once, in transformers' rotate-half layout
            x1, x2 = qk.chunk(2, dim=-1)
            qk = qk * cos + torch.cat((-x2, x1), dim=-1) * sin
            k_cache[:, :, t0:t1] = qk[:, H:]
            v_cache[:, :, t0:t1] = v
            att = F.scaled_dot_product_attention(qk[:, :H], k_cache[:, :, :t1], v_cache[:, :, :t1], attn_mask=mask,
                                                 scale=self.scale, enable_gqa=Hkv != H)  # (B, H, S, hd)
            h = h + linear(att.transpose(1, 2).reshape(B, S, H * hd), L["o"], L["o_bias"])
            x = F.rms_norm(h, (h.shape[-1],), L["ln2"], self.eps)
            gate, up = linear(x, L["gate_up"], L["gate_up_bias"]).chunk(2, dim=-1)
            h = h + linear(L["act"](gate) * up, L["down"], L["down_bias"])
        h = F.rms_norm(h[:, -1], (h.shape[-1],), self.norm, self.eps)  # (B, D)
        return linear(h, self.lm_head, self.lm_head_bias)  # (B, V)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stops: list[int], pad: int,
                 temperature: float = 0.0, top_p: float = 1.0, rules: DecodingRules | None = None) -> list[list[int]]:
        input_ids, attention_mask = left_pad(prompts, pad)
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        B, T = input_ids.shape
        dtype = self.embed.dtype
        total = T + max_new_tokens
        cache = [tuple(torch.zeros(B, self.n_kv, total, self.head_dim, dtype=dtype, device=device) for _ in range(2))
                 for _ in self.layers]
        valid = torch.zeros(B, total, dtype=torch.bool, device=device)
        valid[:, :T] = attention_mask.bool()
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens at 0..len-1
        next_pos = attention_mask.sum(-1, keepdim=True)  # (B, 1)
        stop_ids = torch.tensor(sorted(stops), device=device)
        rows = torch.arange(B, device=device)  # original row of each live row
        out: list[list[int]] = [[] for _ in range(B)]
        # cos/sin of every position once (the model's own rotary module, so rope scaling variants hold)
        cos_table, sin_table = self.model.model.rotary_emb(cache[0][0], torch.arange(total, device=device)[None])
        cos_table, sin_table = cos_table[0].to(dtype), sin_table[0].to(dtype)  # (total, hd)
        logits = self._forward(input_ids, cos_table[positions], sin_table[positions], cache, valid, 0)
        # the rules see what transformers' generate shows its logits processors: (B_live, T + t) ids, prompt
        # left-padded, and which of them are real
        seq, real = input_ids, attention_mask.bool()
        top_k, min_p = (rules.top_k, rules.min_p) if rules is not None else (0, 0.0)
        for t in range(T, total):
            if rules is not None and rules.changes_logits:
                logits = rules.process(seq, real, t - T, logits)
            token = sample_next(logits, temperature, top_p, top_k, min_p)  # (B_live,)
            for r, tok in zip(rows.tolist(), token.tolist()):
                out[r].append(tok)
            finished = torch.isin(token, stop_ids)
            if rules is not None and rules.stop_strings:
                finished |= torch.tensor([rules.hit_stop(out[r]) for r in rows.tolist()], device=device)
            if finished.all() or t == total - 1:
                break
            if rules is not None:
                seq, real = torch.cat([seq, token[:, None]], 1), torch.cat([real, real.new_ones(len(token), 1)], 1)
            if finished.any():
                keep = (~finished).nonzero().squeeze(-1)
                rows, token, next_pos, valid = rows[keep], token[keep], next_pos[keep], valid[keep]
                seq, real = seq[keep], real[keep]
                cache = [(k[keep], v[keep]) for k, v in cache]
            valid[:, t] = True
            logits = self._forward(token[:, None], cos_table[next_pos], sin_table[next_pos], cache, valid, t)
            next_pos = next_pos + 1
        return out


class _RulesProcessor(LogitsProcessor):
    """`DecodingRules` as a transformers logits processor for one left-padded batch."""

    def __init__(self, rules: DecodingRules, attention_mask: torch.Tensor):
        self.rules, self.prompt_real = rules, attention_mask.bool()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, T = self.prompt_real.shape
        real = torch.cat([self.prompt_real, self.prompt_real.new_ones(B, input_ids.shape[1] - T)], 1)
        return self.rules.process(input_ids, real, input_ids.shape[1] - T, scores)


class _StopStrings(StoppingCriteria):
    """`DecodingRules`' stop strings as a transformers stopping criterion for one batch."""

    def __init__(self, rules: DecodingRules, prompt_len: int):
        self.rules, self.T = rules, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([self.rules.hit_stop(row) for row in input_ids[:, self.T:].tolist()],
                            device=input_ids.device)


def _hf_generate(model, input_ids, attention_mask, max_new_tokens, stops, pad, temperature, top_p,
                 rules: DecodingRules | None) -> torch.Tensor:
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    if rules is not None:
        if rules.changes_logits:
            kwargs["logits_processor"] = LogitsProcessorList([_RulesProcessor(rules, attention_mask)])
        if rules.stop_strings:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(rules, input_ids.shape[1])])
        if temperature > 0:
            kwargs.update(top_k=rules.top_k, min_p=rules.min_p or None)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          eos_token_id=stops, pad_token_id=pad, **kwargs)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 32, rules: DecodingRules | None = None,
             fast: bool | None = None) -> list[list[int]]:
    """Returns each prompt's completion ids, ending with the stop token (or the token completing a stop string)
    when one was produced. `rules`: `alignkit.decoding.decoding_rules`; `fast`: force (True) or refuse (False)
    the KV-cached decoder (default: whenever the model supports it)."""
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    use_fast = supports_fast_decoding(model) if fast is None else fast
    if use_fast and not supports_fast_decoding(model):
        raise ValueError(f"generate(fast=True): {type(model).__name__} is not supported by the KV-cached decoder")
    decoder = KVDecoder(model) if use_fast else None
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        if decoder is not None:
            out += decoder.generate(chunk, max_new_tokens, stops, pad, temperature, top_p, rules)
            continue
        input_ids, attention_mask = left_pad(chunk, pad)
        seqs = _hf_generate(model, input_ids.to(device), attention_mask.to(device), max_new_tokens, stops, pad,
                            temperature, top_p, rules)
        for row in seqs[:, input_ids.shape[1]:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            if rules is not None and rules.stop_strings:
                cut = min(cut, rules.stop_at(row[:cut]) or cut)
            out.append(row[:cut])
    model.train(was_training)
    return out


def sample_groups(model, tokenizer, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                  rules: DecodingRules | None = None):
    """`group_size` samples per prompt, consecutive per prompt (rows g*G .. g*G+G-1 belong to prompt g),
    the layout `losses.group_advantages` expects. Returns (completions, ended) where `ended[i]` says
    completion i stopped at a stop token rather than at max_new_tokens."""
    repeated = [p for p in prompts for _ in range(group_size)]
    completions = generate(model, tokenizer, repeated, max_new_tokens, temperature, top_p, batch_size, rules)
    stops = set(stop_token_ids(tokenizer, model))
    ended = [bool(c) and (c[-1] in stops or (rules is not None and rules.hit_stop(c))) for c in completions]
    return completions, ended
