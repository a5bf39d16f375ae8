"""Which tokens did alignment change? The token distribution shift of Lin et al. 2023 ("The Unlocking
Spell on Base LLMs: Rethinking Alignment via In-Context Learning", arXiv 2312.01552, section 2;
the notes' "Unshift / Marginal / Shifted").

The aligned model answers greedily; at every position of that answer the base model, given the same
context (prompt and the aligned answer so far), ranks the token the aligned model chose:

* unshifted: the base model's top token too (rank 1);
* marginal: its second or third choice (rank 2-3);
* shifted: ranked below third.

Lin et al. find few shifted positions, mostly stylistic tokens and the end of the answer: before
alignment the model does not stop, after it, it does.
"""

from __future__ import annotations

from collections import Counter

import torch

from alignkit.logprobs import pack_completions

__all__ = ["token_ranks", "answer_ranks", "shift_summary", "shift_by_position"]


def token_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of each label under its logits: 1 + the number of vocabulary entries scored strictly higher
    (a tie with the top counts as rank 1).

    Args:
        logits: (B, T, V) scores of the next token.
        labels: (B, T) the tokens to rank.

    Returns:
        (B, T) long ranks, 1 = the model's top choice.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"token_ranks: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    target = logits.gather(-1, labels.unsqueeze(-1))  # (B, T, 1)
    return (logits > target).sum(-1) + 1  # (B, T)


@torch.no_grad()
def answer_ranks(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                 batch_size: int = 64) -> list[list[int]]:
    """For each (prompt, answer), `model`'s rank of every answer token given the prompt and the answer's
    earlier tokens: one list per answer, as long as the answer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = pack_completions(prompts[start:start + batch_size], answers[start:start + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        ranks = token_ranks(logits[:, :-1], batch["input_ids"][:, 1:]).cpu()  # (B, T-1)
        mask = batch["loss_mask"][:, 1:].bool().cpu()  # (B, T-1): answer tokens
        out += [r[m].tolist() for r, m in zip(ranks, mask)]
    model.train(was_training)
    return out


def shift_summary(ranks: list[list[int]], answers: list[list[int]], end_ids: set[int], decode=None,
                  top: int = 8) -> dict:
    """Fractions of answer tokens that are unshifted (rank 1), marginal (2-3) and shifted (> 3); how often
    the answer's end-of-turn token is shifted compared with the other tokens; and the most often shifted
    tokens (decoded with `decode` when given)."""
    if len(ranks) != len(answers) or any(len(r) != len(a) for r, a in zip(ranks, answers)):
        raise ValueError("shift_summary: ranks and answers must have the same lengths")
    flat = [(r, t) for rs, a in zip(ranks, answers) for r, t in zip(rs, a)]
    if not flat:
        raise ValueError("shift_summary: no answer tokens")

    def frac(xs) -> float:
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    at_end = [r > 3 for r, t in flat if t in end_ids]
    elsewhere = [r > 3 for r, t in flat if t not in end_ids]
    shifted = Counter(t for r, t in flat if r > 3)
    return {
        "unshifted": frac(r == 1 for r, _ in flat),
        "marginal": frac(1 < r <= 3 for r, _ in flat),
        "shifted": frac(r > 3 for r, _ in flat),
        "shifted_at_end": frac(at_end),
        "shifted_elsewhere": frac(elsewhere),
        "end_share_of_shifted": frac(t in end_ids for r, t in flat if r > 3),
        "top_shifted": [[decode([t]) if decode else t, n] for t, n in shifted.most_common(top)],
    }


def shift_by_position(ranks: list[list[int]], bins: int = 10) -> dict:
    """The share of shifted tokens (rank > 3) per relative position in the answer: token i of an answer of
    length L sits at i / (L - 1) (a one-token answer at 1, its end), in bin min(bins - 1, floor(bins * i / (L - 1)))
    of [0, 1]; the first token falls in the first bin and the last, the answer's end, in the last.

    Returns {"edges": bins + 1 bin edges, "shifted": per bin the share of its tokens shifted (NaN for an empty
    bin), "tokens": per bin its number of tokens}."""
    if bins < 1:
        raise ValueError(f"shift_by_position: bins must be >= 1, got {bins}")
    shifted, tokens = [0] * bins, [0] * bins
    for answer in ranks:
        last = len(answer) - 1
        for i, r in enumerate(answer):
            b = min(bins - 1, (bins * i) // last) if last > 0 else bins - 1
            tokens[b] += 1
            shifted[b] += r > 3
    return {"edges": [k / bins for k in range(bins + 1)],
            "shifted": [s / t if t else float("nan") for s, t in zip(shifted, tokens)], "tokens": tokens}
