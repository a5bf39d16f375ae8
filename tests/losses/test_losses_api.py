"""The public names and argument order of alignkit.losses are a contract."""

import inspect

import pytest

import alignkit.losses as L

CONTRACT = {
    "sequence_logps": ["logits", "labels", "loss_mask"],
    "token_logps": ["logits", "labels"],
    "token_entropy": ["logits"],
    "masked_mean": ["x", "mask", "dim"],
    "masked_sum": ["x", "mask", "dim"],
    "aggregate": ["per_token_loss", "mask", "mode", "max_len"],
    "sft_loss": ["logits", "labels", "loss_mask"],
    "bradley_terry_loss": ["chosen_rewards", "rejected_rewards", "margin"],
    "dpo_loss": [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "beta",
        "variant",
        "label_smoothing",
    ],
    "length_normalized_dpo_loss": [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
        "beta",
    ],
    "simpo_loss": [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
        "beta",
        "gamma",
    ],
    "kto_loss": [
        "policy_logps",
        "ref_logps",
        "labels",
        "kl_reference",
        "beta",
        "desirable_weight",
        "undesirable_weight",
    ],
    "kl_penalty": ["logps", "ref_logps", "estimator"],
    "forward_kl": ["logps", "teacher_logps"],
    "reverse_kl": ["logps", "teacher_logps"],
    "generalized_jsd": ["logps", "teacher_logps", "beta"],
    "gae": ["rewards", "values", "mask", "gamma", "lam"],
    "whiten": ["x", "mask", "shift_mean"],
    "ppo_policy_loss": ["logps", "old_logps", "advantages", "mask", "clip_eps", "clip_eps_high", "ratio_level"],
    "ppo_value_loss": ["values", "old_values", "returns", "mask", "clip_eps"],
    "group_advantages": ["rewards", "group_size", "normalize_std", "eps"],
    "rloo_advantages": ["rewards", "group_size"],
    "reinforce_pp_advantages": ["rewards", "group_size", "subtract_group_mean", "batch_mean", "batch_std", "eps"],
}

DEFAULTS = {
    ("dpo_loss", "beta"): 0.1,
    ("dpo_loss", "variant"): "sigmoid",
    ("dpo_loss", "label_smoothing"): 0.0,
    ("simpo_loss", "beta"): 2.0,
    ("simpo_loss", "gamma"): 0.5,
    ("kto_loss", "beta"): 0.1,
    ("gae", "gamma"): 1.0,
    ("gae", "lam"): 0.95,
    ("ppo_policy_loss", "clip_eps"): 0.2,
    ("ppo_policy_loss", "clip_eps_high"): None,
    ("ppo_policy_loss", "ratio_level"): "token",
    ("ppo_value_loss", "clip_eps"): 0.2,
    ("group_advantages", "normalize_std"): True,
    ("group_advantages", "eps"): 1e-6,
    ("aggregate", "max_len"): None,
    ("bradley_terry_loss", "margin"): None,
    ("whiten", "shift_mean"): True,
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_positional_parameters_match_the_contract(name):
    fn = getattr(L, name)
    params = inspect.signature(fn).parameters.values()
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == CONTRACT[name]
    assert name in L.__all__
    assert fn.__doc__ and len(fn.__doc__.strip()) > 40


def test_documented_defaults():
    for (name, arg), value in DEFAULTS.items():
        assert inspect.signature(getattr(L, name)).parameters[arg].default == value, (name, arg)


def test_aggregate_denominator_is_keyword_only():
    p = inspect.signature(L.aggregate).parameters["denominator"]
    assert p.kind is p.KEYWORD_ONLY and p.default is None
