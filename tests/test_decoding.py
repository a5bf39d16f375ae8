"""Decoding rules: each with hand-worked logits, checked against transformers' own processors where it has one,
and the KV-cached decoder and transformers' `generate` giving the same greedy tokens with every rule on."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TopKLogitsWarper, TopPLogitsWarper)

from alignkit.decoding import (DecodingOptions, DecodingRules, context_prompt, decode_completion, decoding_rules,
                               eos_boost, frequency_presence_penalty, logit_bias, min_p_filter, no_repeat_ngram,
                               repetition_penalty, sample_next, top_k_filter, top_p_filter)
from alignkit.errors import UserError
from alignkit.generation import generate, supports_fast_decoding
from alignkit.models import init_model, load_tokenizer, stop_token_ids

INF = float("-inf")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = t([2.0, -1.0, 0.5, 3.0])
    ids, real = torch.tensor([[0, 1, 1]]), torch.ones(1, 3, dtype=torch.bool)
    # tokens 0 and 1 were seen: 2.0 / 2 = 1.0, -1.0 * 2 = -2.0; 2 and 3 untouched
    assert repetition_penalty(logits, ids, real, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # padding is not context: token 3 sits in a padded slot
    assert repetition_penalty(logits, torch.tensor([[3, 0]]), torch.tensor([[False, True]]), 2.0).tolist() == \
        [[1.0, -1.0, 0.5, 3.0]]
    assert repetition_penalty(logits, ids, real, 1.0) is logits


def test_frequency_and_presence_penalties_count_answer_tokens():
    # token 1 twice, token 2 once: 1 -> -(0.5 * 2 + 1) = -2, 2 -> -(0.5 + 1) = -1.5
    got = frequency_presence_penalty(torch.zeros(1, 4), torch.tensor([[1, 1, 2]]), 0.5, 1.0)
    assert got.tolist() == [[0.0, -2.0, -1.5, 0.0]]
    assert frequency_presence_penalty(torch.zeros(1, 4), torch.zeros(1, 0, dtype=torch.long), 0.5, 1.0).tolist() == \
        [[0.0] * 4]


def test_no_repeat_ngram_bans_the_token_completing_a_seen_ngram():
    real = lambda n: torch.ones(1, n, dtype=torch.bool)  # noqa: E731
    # bigrams (5,1) (1,2) (2,1); the sequence ends in 1, and (1,2) was seen: 2 is banned
    got = no_repeat_ngram(torch.zeros(1, 6), torch.tensor([[5, 1, 2, 1]]), real(4), 2)
    assert got.tolist() == [[0, 0, INF, 0, 0, 0]]
    # trigrams: (1,2,3) seen, the sequence ends in (1,2): 3 is banned
    got = no_repeat_ngram(torch.zeros(1, 6), torch.tensor([[1, 2, 3, 1, 2]]), real(5), 3)
    assert got.tolist() == [[0, 0, 0, INF, 0, 0]]
    # the bigram (1,2) starts in padding: it does not count
    got = no_repeat_ngram(torch.zeros(1, 4), torch.tensor([[1, 2, 1]]), torch.tensor([[False, True, True]]), 2)
    assert got.tolist() == [[0.0] * 4]


def test_bias_and_eos_boost_add_to_chosen_logits():
    got = logit_bias(torch.zeros(2, 4), torch.tensor([1, 3]), torch.tensor([2.0, -1.5]))
    assert got.tolist() == [[0, 2.0, 0, -1.5]] * 2
    # 4 tokens generated, 0.5 per token: +2 on each stop token
    assert eos_boost(torch.zeros(1, 4), torch.tensor([0, 3]), 4, 0.5).tolist() == [[2.0, 0, 0, 2.0]]
    assert eos_boost(torch.zeros(1, 4), torch.tensor([0]), 0, 0.5).tolist() == [[0.0] * 4]


def test_top_k_top_p_min_p_keep_the_right_tokens():
    assert top_k_filter(t([1.0, 3.0, 2.0, 0.0]), 2).tolist() == [[INF, 3.0, 2.0, INF]]
    logits = torch.log(t([0.5, 0.3, 0.15, 0.05]))
    # min-p 0.4: keep p >= 0.4 * 0.5 = 0.2 -> tokens 0 and 1
    assert torch.isinf(min_p_filter(logits, 0.4)).tolist() == [[False, False, True, True]]
    # top-p 0.75: 0.5 < 0.75 <= 0.8 -> tokens 0 and 1
    assert torch.isinf(top_p_filter(logits, 0.75)).tolist() == [[False, False, True, True]]
    assert top_k_filter(logits, 0) is logits and min_p_filter(logits, 0.0) is logits


def test_rules_agree_with_transformers_processors_on_unpadded_input():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 50), torch.randint(0, 50, (3, 12))
    real = torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(repetition_penalty(logits, ids, real, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))
    assert torch.equal(no_repeat_ngram(logits, ids, real, 2), NoRepeatNGramLogitsProcessor(2)(ids, logits.clone()))
    ids[:, -3:] = ids[:, :3]  # make a trigram repeat possible
    assert torch.equal(no_repeat_ngram(logits, ids, real, 3), NoRepeatNGramLogitsProcessor(3)(ids, logits.clone()))
    assert torch.equal(top_k_filter(logits, 7), TopKLogitsWarper(7)(ids, logits.clone()))
    assert torch.equal(min_p_filter(logits, 0.1).isinf(), MinPLogitsWarper(0.1)(ids, logits.clone()).isinf())
    assert torch.equal(top_p_filter(logits, 0.6).isinf(), TopPLogitsWarper(0.6)(ids, logits.clone()).isinf())


def test_sampling_draws_only_from_the_kept_tokens():
    torch.manual_seed(0)
    logits = torch.log(t([0.5, 0.3, 0.15, 0.05])).repeat(3000, 1)
    assert set(sample_next(logits, 1.0, top_k=2).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, min_p=0.4).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0).tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------------
# Both generation paths, every rule on
# ----------------------------------------------------------------------------------------------


def reference(model, prompt: list[int], n: int, rules: DecodingRules, stops: list[int]) -> list[int]:
    """Greedy decoding the slow, obvious way: one unpadded sequence, a full forward per token."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[:, -1]
        ids = torch.tensor([seq])
        tok = int(rules.process(ids, torch.ones_like(ids, dtype=torch.bool), len(out), logits).argmax(-1))
        seq.append(tok)
        out.append(tok)
        if tok in stops or rules.hit_stop(out):
            break
    return out


def tiny(arch: str, tok):
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
    if arch == "gpt2":  # an architecture the KV-cached decoder does not take
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(5)
        cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return GPT2LMHeadModel(cfg).eval()
    heads = dict(num_attention_heads=4, num_key_value_heads=2) if arch == "llama" else \
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return init_model(arch, "tiny", tok, seed=3, **small, **heads).eval()


def all_rules(tok, model, **extra) -> DecodingRules:
    bias = {tok.convert_tokens_to_ids("Ġthe"): -3.0, tok.convert_tokens_to_ids("."): 1.5}
    return DecodingRules(stop_ids=stop_token_ids(tok, model), repetition_penalty=1.4, frequency_penalty=0.3,
                         presence_penalty=0.2, no_repeat_ngram=2, bias=bias, eos_boost=0.25, tokenizer=tok, **extra)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_both_paths_give_the_reference_greedy_tokens_with_every_rule_on(tiny_model, arch):
    tok = load_tokenizer(tiny_model)
    model = tiny(arch, tok)
    assert supports_fast_decoding(model) == (arch != "gpt2")
    stops = stop_token_ids(tok, model)
    prompts = [tok.encode(x) for x in ("Hello there", "a", "The cat sat on the mat and looked at the door", "x y")]
    rules = all_rules(tok, model)
    want = [reference(model, p, 30, rules, stops) for p in prompts]
    plain = generate(model, tok, prompts, 30, fast=False)
    assert plain != want  # the rules change what is generated
    assert generate(model, tok, prompts, 30, rules=rules, fast=False) == want  # transformers' generate
    if arch != "gpt2":
        assert generate(model, tok, prompts, 30, rules=rules, fast=True) == want  # the KV-cached decoder
    # a stop string ends a row at the token completing it, in both paths
    text = tok.decode(want[0], skip_special_tokens=True)
    stop = text.strip()[len(text.strip()) // 2:][:2]
    stopped = all_rules(tok, model, stop_strings=(stop,))
    want = [reference(model, p, 30, stopped, stops) for p in prompts]
    assert len(want[0]) < len(plain[0]) or want[0][-1] not in stops
    for fast in ([False, True] if arch != "gpt2" else [False]):
        got = generate(model, tok, prompts, 30, rules=stopped, fast=fast)
        assert got == want
        text, ended = decode_completion(tok, got[0], stopped, stops)
        assert ended and stop not in text


def test_options_resolve_to_rules_and_bad_values_are_one_line(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    assert decoding_rules(DecodingOptions(), tok) is None  # nothing asked: the plain path
    path = tmp_path / "bias.json"
    path.write_text(json.dumps({"<|im_end|>": 2.0, "Ġthe": -1.0}))
    rules = decoding_rules(DecodingOptions(logit_bias=("Ġthe=-5",), logit_bias_file=str(path)), tok)
    assert rules.bias == {tok.convert_tokens_to_ids("<|im_end|>"): 2.0, tok.convert_tokens_to_ids("Ġthe"): -5.0}
    for opts, message in [(DecodingOptions(logit_bias=("nope",)), "expected TOKEN=VALUE"),
                          (DecodingOptions(logit_bias=("Ġthe=big",)), "not a number"),
                          (DecodingOptions(logit_bias=("hello world=1",)), "is not one token"),
                          (DecodingOptions(top_k=-1), "--top-k"), (DecodingOptions(min_p=1.0), "--min-p"),
                          (DecodingOptions(logit_bias_file=str(tmp_path / "missing.json")), "no such file"),
                          (DecodingOptions(context_format="xml", system_prompt="Be nice."), "--context-format")]:
        with pytest.raises(UserError, match=message):
            decoding_rules(opts, tok)


def test_in_context_prefix_chat_and_plain(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "What is 2+2?", "completion": "4."}) + "\n" +
                     json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                                 "completion": [{"role": "assistant", "content": "Hello!"}]}) + "\n")
    chat = DecodingOptions(system_prompt="Be brief.", demonstrations=str(demos))
    text = tok.decode(context_prompt(tok, [{"role": "user", "content": "Why?"}], chat))
    assert text.index("Be brief.") < text.index("What is 2+2?") < text.index("4.") < text.index("Hello!") < text.index("Why?")
    assert text.endswith(tok.decode(context_prompt(tok, [{"role": "user", "content": "x"}], DecodingOptions()))[-20:])
    plain = DecodingOptions(demonstrations=str(demos), context_format="plain")
    text = tok.decode(context_prompt(tok, [{"role": "user", "content": "Why?"}], plain))
    assert text.endswith("# Query:\n```\nWhy?\n```\n\n# Answer:\n```\n") and "# Answer:\n```\n4.\n```" in text
    rules = decoding_rules(plain, tok)  # the plain layout stops where the model closes its answer
    assert rules.stop_strings == ("```",)
    ids = tok.encode("Because.\n```\n\n# Query", add_special_tokens=False)
    assert decode_completion(tok, ids, rules, []) == ("Because.\n", True)
    assert context_prompt(tok, "plain text", DecodingOptions()) == tok("plain text")["input_ids"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl:1"):
        context_prompt(tok, "x", DecodingOptions(demonstrations=str(bad)))


def test_sampled_generation_respects_top_k(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = tiny("llama", tok)
    torch.manual_seed(0)
    prompts = [tok.encode("a b c")] * 8
    rules = DecodingRules(stop_ids=[], top_k=1, tokenizer=tok)
    greedy = generate(model, tok, prompts[:1], 12)
    for fast in (True, False):  # top-k 1 sampling is greedy, whatever the temperature
        assert generate(model, tok, prompts, 12, temperature=1.5, rules=rules, fast=fast) == greedy * 8


# ----------------------------------------------------------------------------------------------
# The flags reach generation
# ----------------------------------------------------------------------------------------------


def test_generate_flags_change_the_answers_and_best_of_n_records_them(tiny_model, tmp_path):
    import yaml

    from alignkit.cli import run as cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Tell me about {w}."}]}) + "\n"
                               for w in ("the moon", "rivers", "apples")))
    args = ["generate", "--model", str(tiny_model), "--data", str(prompts), "--max-new-tokens", "16"]
    plain = cli(args)  # printed: (prompt, completion text) rows
    # a large EOS boost ends every answer at its second token
    boosted = cli(args + ["--eos-boost", "100"])
    tok = load_tokenizer(tiny_model)
    n_tokens = lambda rows: [len(tok.encode(r["completion"], add_special_tokens=False)) for r in rows]  # noqa: E731
    assert min(n_tokens(plain)) > 3 and max(n_tokens(boosted)) <= 2
    # banning the token the greedy answer starts with changes it
    first = tok.encode(plain[0]["completion"], add_special_tokens=False)[0]
    banned = cli(args + ["--logit-bias", f"{tok.convert_ids_to_tokens(first)}=-inf"])
    assert tok.encode(banned[0]["completion"], add_special_tokens=False)[:1] != [first]
    (tmp_path / "rw.py").write_text("def length(prompts, completions, **kw):\n    return [float(len(str(c))) for c in completions]\n")
    out = tmp_path / "bon"
    cli(["best-of-n", "--model", str(tiny_model), "--data", str(prompts), "--reward", f"{tmp_path / 'rw.py'}:length",
         "--group-size", "2", "--max-new-tokens", "8", "--repetition-penalty", "1.5", "--top-k", "5", "--output", str(out)])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["repetition_penalty"] == 1.5 and saved["top_k"] == 5
