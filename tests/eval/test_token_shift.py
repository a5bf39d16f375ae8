"""Token distribution shift (Lin et al. 2023): ranks against hand values, the summary's arithmetic, and
the invariant that a model's own greedy answers are all unshifted under itself."""

import pytest
import torch

from alignkit.eval.token_shift import answer_ranks, shift_summary, token_ranks


def test_token_ranks_by_hand():
    logits = torch.tensor([[[0.1, 2.0, -1.0, 0.5],    # label 1: the top -> 1
                            [0.1, 2.0, -1.0, 0.5],    # label 3: below 2.0 only -> 2
                            [0.1, 2.0, -1.0, 0.5],    # label 2: the lowest -> 4
                            [3.0, 3.0, 1.0, 0.0]]])   # label 1: tied with the top -> 1
    labels = torch.tensor([[1, 3, 2, 1]])
    assert token_ranks(logits, labels).tolist() == [[1, 2, 4, 1]]
    with pytest.raises(ValueError, match="do not match"):
        token_ranks(logits, labels[:, :3])


def test_shift_summary_by_hand():
    END = 9
    ranks = [[1, 2, 5, 7], [1, 1, 4]]
    answers = [[11, 12, 13, END], [11, 14, END]]
    s = shift_summary(ranks, answers, {END}, decode=lambda ids: f"t{ids[0]}")
    assert s["unshifted"] == pytest.approx(3 / 7)
    assert s["marginal"] == pytest.approx(1 / 7)
    assert s["shifted"] == pytest.approx(3 / 7)
    assert s["shifted_at_end"] == pytest.approx(1.0)  # both answers' ends ranked 7 and 4
    assert s["shifted_elsewhere"] == pytest.approx(1 / 5)  # token 13 only
    assert s["end_share_of_shifted"] == pytest.approx(2 / 3)
    assert s["top_shifted"] == [["t9", 2], ["t13", 1]]
    with pytest.raises(ValueError, match="same lengths"):
        shift_summary([[1, 2]], [[11]], {END})


def test_a_models_own_greedy_answers_are_unshifted_under_itself(tiny_model):
    from alignkit.generation import generate
    from alignkit.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model)
    prompts = [tok(t).input_ids for t in ("The cat", "Once upon a time there", "A")]
    answers = generate(model, tok, prompts, max_new_tokens=6)
    ranks = answer_ranks(model, prompts, answers, tok.pad_token_id, batch_size=2)  # padded batches
    assert [len(r) for r in ranks] == [len(a) for a in answers] and sum(map(len, ranks)) > 6
    assert all(r == 1 for rs in ranks for r in rs)
    # and another model's ranks are not all 1: the measurement can tell models apart
    other = load_causal_lm(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert any(r > 1 for rs in answer_ranks(other, prompts, answers, tok.pad_token_id) for r in rs)
