"""Batched generation with the KV cache of transformers' `generate`: greedy or temperature/top-p
sampling, stopping each sequence at its first stop token (EOS or end-of-turn)."""

from __future__ import annotations

import torch

from alignkit.models import stop_token_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 32) -> list[list[int]]:
    """Returns each prompt's completion ids, ending with the stop token when one was produced."""
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        T = max(len(p) for p in chunk)
        # Left padding: every prompt ends at the same position, so new tokens line up.
        input_ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, T - len(p):] = torch.as_tensor(p)
            attention_mask[i, T - len(p):] = 1
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
        seqs = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                              max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, **kwargs)
        for row in seqs[:, T:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    model.train(was_training)
    return out


def sample_groups(model, tokenizer, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64):
    """`group_size` samples per prompt, consecutive per prompt (rows g*G .. g*G+G-1 belong to prompt g),
    the layout `losses.group_advantages` expects. Returns (completions, ended) where `ended[i]` says
    completion i stopped at a stop token rather than at max_new_tokens."""
    repeated = [p for p in prompts for _ in range(group_size)]
    completions = generate(model, tokenizer, repeated, max_new_tokens, temperature, top_p, batch_size)
    stops = set(stop_token_ids(tokenizer, model))
    ended = [bool(c) and c[-1] in stops for c in completions]
    return completions, ended
