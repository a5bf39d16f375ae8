"""Published chat templates: the loss mask is each assistant content plus its end-of-turn token, prompts
render for generation, and generation stops at the template's end-of-turn token.

The templates are the models' own (tokenizer_config.json of each model); the tokenizers are the shared
byte-level BPE of conftest with each template's special tokens added (nothing is downloaded)."""
import random

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from alignkit.data import (ChatTemplateError, DataError, load_preference, load_sft, load_unpaired, render_messages,
                           render_prompt)
from alignkit.models import stop_token_ids

from helpers import a, s, spans, u  # noqa: E402

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")

# google/gemma-2-2b-it
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# Qwen/Qwen2.5-0.5B-Instruct (a default system prompt when the conversation has none)
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")

# mistralai/Mistral-7B-Instruct-v0.3 (the system message goes into the last user turn, so it is dropped from
# a conversation that ends with the assistant)
MISTRAL = (
    "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n"
    "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n"
    "    {%- if not (message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is defined "
    "and message.tool_calls is not none)) %}\n"
    "        {%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}\n"
    "            {{- raise_exception(\"After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    "            {{- \"[AVAILABLE_TOOLS] [\" }}\n            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n                {{- '{\"type\": \"function\", \"function\": {' }}\n"
    "                {%- for key, val in tool.items() if key != \"return\" %}\n"
    "                    {%- if val is string %}\n                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n                    {%- if not loop.last %}\n"
    "                        {{- \", \" }}\n                    {%- endif %}\n                {%- endfor %}\n"
    "                {{- \"}}\" }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n"
    "                {%- else %}\n                    {{- \"]\" }}\n                {%- endif %}\n"
    "            {%- endfor %}\n            {{- \"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    "        {{- \"[TOOL_CALLS] [\" }}\n        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    "                {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n"
    "            {%- endif %}\n            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n                {{- \", \" }}\n            {%- else %}\n"
    "                {{- \"]\" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n        {{- \" \" + message[\"content\"]|trim + eos_token}}\n"
    "    {%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}\n"
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n        {%- else %}\n"
    "            {%- set content = message.content %}\n        {%- endif %}\n"
    "        {{- '[TOOL_RESULTS] {\"content\": ' + content|string + \", \" }}\n"
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    "            {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n"
    "        {%- endif %}\n        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n        {{- raise_exception(\"Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!\") }}\n    {%- endif %}\n{%- endfor %}\n")

# microsoft/Phi-3-mini-4k-instruct: EOS after the last message unless a generation prompt is asked for, so a
# shorter conversation's rendering is not a prefix of a longer one's
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")

# stanford-crfm/marin-tokenizer (the Olmo 2 template with Llama 3's tokens and {% generation %} markers)
MARIN = ("{{ bos_token }}\n{%- for message in messages -%}\n{%- if message['role'] == 'assistant' -%}\n"
         "    <|start_header_id|>{{ message['role'] }}<|end_header_id|>\n"
         "{% generation %}{{- message['content'] | trim }}<|eot_id|>{% endgeneration %}\\n\n{% else %}\n"
         "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n{{ message['content'] | trim }}<|eot_id|>\n"
         "{% endif %}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
         "<|start_header_id|>assistant<|end_header_id|>\\n{% endif -%}")

# name: (template, special tokens, bos, eos, the template's end-of-turn token, whether it allows a system turn)
TEMPLATES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", True),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>",
              False),
    "qwen2.5": (QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|im_end|>", True),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", False),
    "phi3": (PHI3, ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>",
             "<|end|>", True),
    "marin": (MARIN, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", True),
}


def make(bpe, name, template=None, specials=None, bos=None, eos=None):
    t, sp, b, e, _, _ = TEMPLATES.get(name, (template, specials, bos, eos, None, None))
    tok = Tokenizer.from_str(bpe.to_str())
    tok.add_special_tokens(sp)
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=b, eos_token=e, pad_token=e,
                                 name_or_path=f"test-tokenizers/{name}")
    ft.chat_template = template or t
    return ft


@pytest.fixture(scope="module")
def tokenizers(_tokenizer_object):
    return {name: make(_tokenizer_object, name) for name in TEMPLATES}


def conversation(name, system=True):
    """Multi-turn, with a system turn where the template allows one; Mistral's has none (see below)."""
    allows_system = TEMPLATES[name][5]
    conv = [u("What is the moon?"), a("A rock in the sky."), u("Why?"), a("Because the earth has water.")]
    return ([s("Be brief.")] if system and allows_system else []) + conv


def expected_spans(name, conv):
    eot = TEMPLATES[name][4]
    lead = " " if name == "mistral" else ""  # Mistral writes "[/INST] " + content: the model generates the space
    return [lead + m["content"] + eot for m in conv if m["role"] == "assistant"]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_mask_is_each_assistant_content_and_its_end_of_turn_token(name, tokenizers):
    tok = tokenizers[name]
    conv = conversation(name)
    ex = render_messages(tok, conv)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(conv, tokenize=False)
    assert spans(tok, ex) == expected_spans(name, conv)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_loaders_on_published_templates(name, tokenizers, write_jsonl):
    tok = tokenizers[name]
    conv = conversation(name)
    p = write_jsonl([{"messages": conv}, {"prompt": conv[:-1], "completion": conv[-1:]}])
    if name == "marin":  # its generation prompt is not what it writes before an assistant turn (see below)
        with pytest.raises(DataError, match=":2: the chat template of tokenizer 'test-tokenizers/marin' is not "
                                            "prefix-consistent"):
            load_sft([str(p)], tok, max_length=1024)
        return
    (full, pc), stats = load_sft([str(p)], tok, max_length=1024)
    assert full == render_messages(tok, conv) and stats.kept == 2
    assert spans(tok, pc) == expected_spans(name, conv)[-1:]
    # preference completions end with the end-of-turn token, not with whatever the template writes after it
    p = write_jsonl([{"prompt": conv[:-1], "chosen": [a("Yes.")], "rejected": [a("No.")]}], name="pref.jsonl")
    (pair,), _ = load_preference([str(p)], tok, max_length=1024)
    lead, eot = expected_spans(name, [a("")])[0][:-len(TEMPLATES[name][4])], TEMPLATES[name][4]
    assert tok.decode(pair.chosen_ids) == lead + "Yes." + eot and tok.decode(pair.rejected_ids) == lead + "No." + eot
    assert pair.prompt_ids == render_prompt(tok, conv[:-1])
    (chosen, rejected), _ = load_unpaired([str(p)], tok, max_length=1024)
    assert (chosen.completion_ids, rejected.completion_ids) == (pair.chosen_ids, pair.rejected_ids)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_render_prompt_for_generation(name, tokenizers):
    tok = tokenizers[name]
    for prompt in (conversation(name)[:-1], conversation(name)[:2]):
        if prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert tok.decode(render_prompt(tok, prompt)) == text


def test_qwen_default_system_prompt_and_base_eos(tokenizers):
    tok = tokenizers["qwen2.5"]
    assert tok.eos_token == "<|endoftext|>"  # the base model's EOS, not the end-of-turn token
    ex = render_messages(tok, [u("Hi?"), a("Hello.")])
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert spans(tok, ex) == ["Hello.<|im_end|>"]


@pytest.mark.parametrize("name", ["llama3", "gemma", "mistral"])
def test_trimming_templates_train_on_the_content_they_render(name, tokenizers):
    tok = tokenizers[name]
    ex = render_messages(tok, [u("Hi?"), a("  Hello there.\n")])
    assert spans(tok, ex) == expected_spans(name, [a("Hello there.")])


def test_content_repeated_elsewhere_is_not_mistaken(tokenizers):
    tok = tokenizers["phi3"]
    ex = render_messages(tok, [s("Say yes."), u("yes"), a("yes"), u("yes"), a("yes")])
    assert spans(tok, ex) == ["yes<|end|>", "yes<|end|>"]
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if not m]) == \
        "<|system|>\nSay yes.<|end|>\n<|user|>\nyes<|end|>\n<|assistant|>\n\n<|user|>\nyes<|end|>\n<|assistant|>\n\n" \
        "<|endoftext|>"


def _random_convs(n, system, seed=0):
    rng = random.Random(seed)
    words = "the moon rocket water boil river city people learn teach good bad why how many apples".split()

    def txt():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))).capitalize() + rng.choice(".?!")

    for _ in range(n):
        c = [s(txt())] if system and rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            c += [u(txt()), a(txt())]
        yield c


def test_located_content_equals_generation_markers(tokenizers, _tokenizer_object):
    """Marin's template with its markers, and without them: the two ways to find the assistant tokens give
    the same masks.  (Its generation prompt ends with a literal backslash-n, unlike its assistant turns, so
    without markers it is refused as it is published; the comparison uses the generation prompt fixed.)"""
    marin = tokenizers["marin"]
    fixed = make(_tokenizer_object, "marin-fixed", MARIN.replace("<|end_header_id|>\\n{% endif", "<|end_header_id|>\n{% endif"),
                 TEMPLATES["marin"][1], "<|begin_of_text|>", "<|end_of_text|>")
    with pytest.raises(ChatTemplateError, match="not prefix-consistent"):
        render_messages(marin, conversation("marin"), use_generation_markers=False)
    n = 0
    for conv in _random_convs(40, system=True):
        e1 = render_messages(marin, conv)
        assert spans(marin, e1) == expected_spans("marin", conv)
        assert render_messages(fixed, conv, use_generation_markers=False) == render_messages(fixed, conv) == e1
        n += 1
    assert n == 40


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_generation_stops_at_the_templates_end_of_turn_token(name, tokenizers):
    from alignkit.data import end_of_turn_ids

    tok = tokenizers[name]
    eot = tok.convert_tokens_to_ids(TEMPLATES[name][4])
    assert eot in end_of_turn_ids(tok) and eot in stop_token_ids(tok)


def test_end_of_turn_ids_follow_a_changed_template(tokenizers):
    """end_of_turn_ids is remembered per tokenizer; a tokenizer whose chat template changes is probed again."""
    import copy

    from alignkit.data import end_of_turn_ids

    tok = copy.deepcopy(tokenizers["gemma"])
    gemma_eot = tok.convert_tokens_to_ids(TEMPLATES["gemma"][4])
    assert gemma_eot in end_of_turn_ids(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|stop|>"]})
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "<|stop|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    assert tok.convert_tokens_to_ids("<|stop|>") in end_of_turn_ids(tok)


def test_generate_stops_at_gemma_end_of_turn():
    """A model whose logits are all zero greedily predicts token 0, which is Gemma's <end_of_turn> in this
    tokenizer: generation stops right after it (it ran to max_new_tokens when the stop list lacked it)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from alignkit.generation import generate
    from alignkit.models import init_model

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the moon is a rock", "what is the moon"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<end_of_turn>", "<bos>", "<eos>", "<start_of_turn>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = make(bpe, "gemma")
    assert tok.convert_tokens_to_ids("<end_of_turn>") == 0 and tok.eos_token == "<eos>"
    model = init_model("llama", "tiny", tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    prompt = render_prompt(tok, [u("What is the moon?")])
    assert generate(model, tok, [prompt, prompt[:3]], max_new_tokens=5) == [[0], [0]]


# ---------------------------------------------------------------- templates that cannot be handled


def test_gemma_refuses_a_system_turn_naming_the_tokenizer(tokenizers):
    with pytest.raises(ChatTemplateError) as ei:
        render_messages(tokenizers["gemma"], [s("Be brief."), u("Hi?"), a("Hello.")])
    assert "test-tokenizers/gemma" in str(ei.value) and "System role not supported" in str(ei.value)


def test_mistral_system_turn_is_refused_not_dropped(tokenizers, write_jsonl):
    """Mistral's template puts the system message into the last user turn, so a conversation ending with the
    assistant is rendered without it while generation sees it: refused, with the tokenizer and the reason."""
    tok = tokenizers["mistral"]
    conv = [s("Be brief."), u("Hi?"), a("Hello.")]
    assert "Be brief." not in tok.apply_chat_template(conv, tokenize=False)
    p = write_jsonl([{"messages": conv}])
    with pytest.raises(DataError) as ei:
        load_sft([str(p)], tok, max_length=512)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:1: the chat template of tokenizer 'test-tokenizers/mistral'")
    assert "not prefix-consistent" in msg and "system prompt" in msg
    # generation with a system turn works: it is in the prompt
    assert "Be brief." in tok.decode(render_prompt(tok, conv[:2]))


def test_template_that_changes_the_content_is_refused(_tokenizer_object):
    tok = make(_tokenizer_object, "upper", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | replace('.', '!') }}"
               "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
               ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>")
    with pytest.raises(ChatTemplateError) as ei:
        render_messages(tok, [u("Hi?"), a("Hello.")])
    assert "test-tokenizers/upper" in str(ei.value) and "does not render the content of messages[1]" in str(ei.value)


def test_template_without_end_of_turn_token_is_refused(_tokenizer_object):
    tok = make(_tokenizer_object, "plain-text", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}", ["<|eos|>"], None, "<|eos|>")
    with pytest.raises(ChatTemplateError) as ei:
        render_messages(tok, [u("Hi?"), a("Hello."), u("More?"), a("Yes.")])
    assert "test-tokenizers/plain-text" in str(ei.value) and "writes no end-of-turn token" in str(ei.value)


def test_assistant_first_without_markers_is_refused_naming_the_tokenizer(tokenizers):
    with pytest.raises(ChatTemplateError) as ei:
        render_messages(tokenizers["phi3"], [a("Hello."), u("Hi?"), a("Yes.")])
    assert "starts with an assistant turn" in str(ei.value) and "test-tokenizers/phi3" in str(ei.value)
    # with generation markers the turn is simply trained on
    assert spans(tokenizers["marin"], render_messages(tokenizers["marin"], [a("Hello."), u("Hi?"), a("Yes.")])) == \
        ["Hello.<|eot_id|>", "Yes.<|eot_id|>"]


def test_forcing_markers_on_a_template_without_them_is_refused(tokenizers):
    with pytest.raises(ChatTemplateError, match="test-tokenizers/phi3' marked no generation block"):
        render_messages(tokenizers["phi3"], [u("Hi?"), a("Yes.")], use_generation_markers=True)
