"""alignkit kto: desirable completions gain implicit reward over undesirable ones; the KL reference
point comes from mismatched pairs and is the same however the global batch is split."""

import json
import random

import pytest
import torch

from alignkit.cli import run as cli
from alignkit.data import load_unpaired
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.recipes.kto import mismatched_pairs, rows_logps
from helpers import read_metrics, shuffled_answer_pairs


def toy_unpaired(assets, path, rows=slice(None), seed=0, paired=False):
    """Desirable = the right answer, undesirable = its words shuffled: unpaired {prompt, completion, label}
    records (one of the two per prompt), or pairs for load_unpaired to split."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for prompt, good, bad in shuffled_answer_pairs(assets, rows, seed):
            if paired:
                f.write(json.dumps({"prompt": prompt, "chosen": good, "rejected": bad}) + "\n")
            else:
                label = rng.random() < 0.5
                f.write(json.dumps({"prompt": prompt, "completion": good if label else bad, "label": label}) + "\n")
    return path


def kto_args(model, data, out, *extra):
    return ["kto", "--model", str(model), "--data", str(data), "--output", str(out), "--max-length", "64",
            "--lr", "3e-3", "--warmup-steps", "2", "--no-progress", *extra]


def rows(out):
    return [r for r in read_metrics(out) if not r.get("final")]


def implicit_reward_gap(model_dir, base_dir, examples, pad_id) -> float:
    """mean log(pi/ref) over desirable minus over undesirable examples (0 when pi == ref)."""
    idx = [(i, i) for i in range(len(examples))]
    with torch.no_grad():
        ratio = (rows_logps(load_causal_lm(model_dir).eval(), examples, idx, pad_id, "cpu")
                 - rows_logps(load_causal_lm(base_dir).eval(), examples, idx, pad_id, "cpu"))  # (N,)
    labels = torch.tensor([ex.label for ex in examples])
    return (ratio[labels].mean() - ratio[~labels].mean()).item()


def test_kto_raises_desirable_over_undesirable_reward(tiny_model, assets, tmp_path):
    data = toy_unpaired(assets, tmp_path / "u.jsonl", slice(0, 320))
    out = tmp_path / "kto"
    final = cli(kto_args(tiny_model, data, out, "--max-steps", "30", "--batch-size", "8"))
    r = rows(out)
    # Step 1: policy == reference, so every reward and the KL estimate are 0 and the loss is 1 - sigmoid(0).
    assert r[0]["loss"] == pytest.approx(0.5, abs=1e-5) and r[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert {"rewards_desirable", "rewards_undesirable", "kl", "pairs_per_s", "lr", "grad_norm"} <= r[0].keys()
    assert final["pairs"] == 30 * 8 and final["tokens"] > 0
    tok = load_tokenizer(tiny_model)
    examples = load_unpaired([str(data)], tok, 64)[0][:80]
    assert implicit_reward_gap(out, tiny_model, examples, tok.pad_token_id) > 2.0
    gaps = [x["reward_gap"] for x in r if x["reward_gap"] is not None]
    assert sum(gaps[-5:]) / 5 > 0.1 + sum(gaps[:3]) / 3


def test_paired_data_is_unpaired_and_grad_accum_matches_bigger_batch(tiny_model, assets, tmp_path):
    data = toy_unpaired(assets, tmp_path / "p.jsonl", slice(0, 64), paired=True)
    a = cli(kto_args(tiny_model, data, tmp_path / "a", "--max-steps", "5", "--batch-size", "8",
                     "--no-group-by-length"))
    cli(kto_args(tiny_model, data, tmp_path / "b", "--max-steps", "5", "--batch-size", "4", "--grad-accum", "2",
                 "--no-group-by-length"))
    assert a["examples"] == 128  # two examples per pair
    la, lb = [x["loss"] for x in rows(tmp_path / "a")], [x["loss"] for x in rows(tmp_path / "b")]
    ka, kb = [x["kl"] for x in rows(tmp_path / "a")], [x["kl"] for x in rows(tmp_path / "b")]
    assert la == pytest.approx(lb, abs=1e-5) and ka == pytest.approx(kb, abs=1e-5)
    assert max(abs(k) for k in ka) > 1e-3 and la[0] - min(la) > 0.005  # trains; the KL term is live


def test_precomputed_reference_equals_per_batch_reference(tiny_model, assets, tmp_path):
    data = toy_unpaired(assets, tmp_path / "u.jsonl", slice(0, 64))
    cli(kto_args(tiny_model, data, tmp_path / "pre", "--max-steps", "4", "--batch-size", "8"))
    cli(kto_args(tiny_model, data, tmp_path / "live", "--max-steps", "4", "--batch-size", "8", "--no-precompute-ref"))
    for key in ("loss", "kl"):
        assert [x[key] for x in rows(tmp_path / "pre")] == pytest.approx([x[key] for x in rows(tmp_path / "live")],
                                                                          abs=1e-5)


def test_mismatched_pairs_shift_completions_to_other_prompts():
    class Ex:
        def __init__(self, prompt):
            self.prompt_ids = prompt

    examples = [Ex([1]), Ex([1]), Ex([2]), Ex([3]), Ex([3]), Ex([4])]  # 0,1 and 3,4 share a prompt
    batches = [[0, 1, 2], [3, 4, 5]]
    kl = mismatched_pairs(batches, examples)
    assert [len(b) for b in kl] == [3, 3]
    flat = [row for b in kl for row in b]
    assert [c for _, c in flat] == [0, 1, 2, 3, 4, 5]  # every completion once, in batch order
    assert all(examples[p].prompt_ids != examples[c].prompt_ids for p, c in flat)
    assert flat[2] == (3, 2) and flat[5] == (0, 5)  # shifted by one across the global batch, cyclically
