"""alignkit cai: chains of critique and revision whose final revision is the SFT data, AI-labelled pairs that
dpo trains on, principles drawn per seed, conversations that continue across rounds, one-line errors, and
2 processes writing the same files as 1."""

import json

import pytest
from helpers import read_metrics, run_torchrun

from alignkit.cai import conversation, default_constitution, draw, load_constitution
from alignkit.cli import run as cli
from alignkit.errors import UserError

CONSTITUTION = """
critiques:
  - {critique: Critique it., revision: Now rewrite it.}
  - {critique: 'Is it rude?', revision: Make it polite.}
  - {critique: 'Is it wrong?', revision: Make it right.}
  - {critique: 'Is it long?', revision: Make it short.}
preferences: [Pick the kinder one., Pick the safer one.]
"""


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def toy(tmp_path):
    prompts = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}], "id": i} for i in range(6)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (tmp_path / "constitution.yaml").write_text(CONSTITUTION)
    # the critique turn quotes the answer it is about, so the chain shows which answer that was
    (tmp_path / "critique.jinja").write_text("{{ request }} About: {{ answer }}")
    return tmp_path


def cai_args(model, toy, out, *extra):
    return ["cai", "--model", str(model), "--data", str(toy / "prompts.jsonl"), "--output", str(out),
            "--constitution", str(toy / "constitution.yaml"), "--max-new-tokens", "8", "--max-length", "256",
            "--batch-size", "4", "--no-progress", *extra]


def test_chains_continue_sl_cai_trains_in_sft_and_pairs_in_dpo(tiny_model, toy):
    out = toy / "out"
    final = cli(cai_args(tiny_model, toy, out, "--revisions", "2", "--pairs",
                         "--critique-template", str(toy / "critique.jinja")))
    chains = read(out / "chains.jsonl")
    assert [ch["index"] for ch in chains] == list(range(6))
    done = [ch for ch in chains if ch["stopped"] is None]
    assert len(done) >= 4 and all(len(ch["rounds"]) == 2 for ch in done)
    for ch in done:
        first, second = ch["rounds"]
        assert first["critique_request"] == f"{first_request(first)} About: {ch['answer']}"
        # the second round criticises the first revision, in the same conversation
        assert second["critique_request"].endswith(f"About: {first['revision']}")
        msgs = conversation(ch["prompt"], ch["answer"], ch["rounds"][:1])
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 and msgs[-1]["content"] == first["revision"]
        assert isinstance(ch["answer_ended"], bool) and isinstance(second["revision_ended"], bool)
        assert [r["principle"] for r in ch["rounds"]] == draw(0, ch["index"], 2, load_constitution(
            toy / "constitution.yaml"))[0]
    sl = read(out / "sl_cai.jsonl")
    assert len(sl) == final["kept"] == sum(bool(ch["rounds"]) for ch in chains) > 0
    finals = {ch["index"]: ch["rounds"][-1]["revision"] for ch in chains if ch["rounds"]}
    assert [r["completion"][0]["content"] for r in sl] == list(finals.values())
    assert [r["id"] for r in sl] == list(finals)  # extra columns kept
    pairs = read(out / "pairs.jsonl")
    assert len(pairs) == final["pairs"] == 6 - final["ties"] - final["pairs_empty"] > 0
    assert all(p["judge_prob"] > 0.5 and p["principle"] in ("Pick the kinder one.", "Pick the safer one.")
               for p in pairs)
    assert final["rounds"] == sum(len(ch["rounds"]) for ch in chains) and (out / "config.yaml").is_file()
    assert read_metrics(out)[-1]["final"] and not list(out.glob(".cai-shard-*"))

    sft = cli(["sft", "--model", str(tiny_model), "--data", str(out / "sl_cai.jsonl"), "--output", str(toy / "sft"),
               "--max-steps", "2", "--batch-size", "2", "--max-length", "256", "--no-progress"])
    assert read_metrics(toy / "sft")[-1]["step"] == 2 and (toy / "sft" / "model.safetensors").is_file(), sft
    cli(["dpo", "--model", str(tiny_model), "--data", str(out / "pairs.jsonl"), "--output", str(toy / "dpo"),
         "--max-steps", "2", "--batch-size", "2", "--max-length", "256", "--no-progress"])
    assert read_metrics(toy / "dpo")[-1]["step"] == 2 and (toy / "dpo" / "model.safetensors").is_file()

    # the principles drawn are recorded, and another seed draws others
    other = toy / "seed1"
    cli(cai_args(tiny_model, toy, other, "--revisions", "2", "--seed", "1", "--max-new-tokens", "4"))
    constitution = load_constitution(toy / "constitution.yaml")
    drawn = [[r["principle"] for ch in read(o / "chains.jsonl") for r in ch["rounds"]] for o in (out, other)]
    assert drawn[0] != drawn[1]
    for ch in read(other / "chains.jsonl"):  # the default template asks the drawn principle's request as is
        for r in ch["rounds"]:
            assert r["critique_request"] == constitution.critiques[r["principle"]].critique
            assert r["revision_request"] == constitution.critiques[r["principle"]].revision
    # an output that holds a cai run is refused, and replaced with --overwrite
    with pytest.raises(UserError, match="already holds a run.*--overwrite"):
        cli(cai_args(tiny_model, toy, other, "--max-new-tokens", "4"))
    cli(cai_args(tiny_model, toy, other, "--max-new-tokens", "4", "--overwrite", "--pairs", "--principle", "Be brief."))
    assert all(len(ch["rounds"]) <= 1 for ch in read(other / "chains.jsonl"))
    assert {p["principle"] for p in read(other / "pairs.jsonl")} == {"Be brief."}  # --principle replaces the drawn one


def first_request(rnd):
    return rnd["critique_request"].split(" About: ")[0]


ANSWER, CRITIQUE, REVISION = "I do not know that.", "It says too little.", "Here is a kind and careful answer."


def test_sl_cai_keeps_the_revision(tiny_model, assets, toy, tmp_path):
    """A model taught to answer every prompt with one sentence, every critique request with another and every
    revision request with a third: sl_cai.jsonl's completions are the third."""
    demos = []
    for i, line in enumerate((assets / "instructions.jsonl").read_text().splitlines()[:200]):
        user = json.loads(line)["messages"][0]["content"]
        k = i % 4
        c = load_constitution(toy / "constitution.yaml").critiques[k]
        demos.append({"messages": [{"role": "user", "content": user},
                                   {"role": "assistant", "content": ANSWER},
                                   {"role": "user", "content": c.critique}, {"role": "assistant", "content": CRITIQUE},
                                   {"role": "user", "content": c.revision},
                                   {"role": "assistant", "content": REVISION}]})
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demos))
    cli(["sft", "--model", str(tiny_model), "--data", str(tmp_path / "demos.jsonl"), "--output", str(tmp_path / "m"),
         "--max-steps", "100", "--batch-size", "16", "--lr", "3e-3", "--max-length", "160", "--warmup-steps", "5",
         "--no-progress"])
    lines = (assets / "instructions.jsonl").read_text().splitlines()
    held_out = [json.loads(line)["messages"][:1] for line in lines[200:206]]
    (toy / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held_out))
    out = tmp_path / "out"
    final = cli(cai_args(tmp_path / "m", toy, out, "--temperature", "0", "--max-new-tokens", "32"))
    sl = read(out / "sl_cai.jsonl")
    assert len(sl) == final["kept"] == 6
    assert [r["completion"][0]["content"] for r in sl] == [REVISION] * 6
    chains = read(out / "chains.jsonl")
    assert [(ch["answer"], ch["rounds"][0]["critique"]) for ch in chains] == [(ANSWER, CRITIQUE)] * 6
    assert final["revised_differs"] == 1.0
    # --revisions 0 --pairs: only pairs, sampled from --pair-model (which answers every prompt with ANSWER)
    # and judged by --model
    pairs_only = tmp_path / "pairs-only"
    final = cli(cai_args(tiny_model, toy, pairs_only, "--pairs", "--revisions", "0",
                         "--pair-model", str(tmp_path / "m"), "--max-new-tokens", "32"))
    assert not (pairs_only / "sl_cai.jsonl").exists() and final["rounds"] == 0
    answers = [a for ch in read(pairs_only / "chains.jsonl") for a in ch["pair"]["answers"]]
    assert answers.count(ANSWER) >= 10, answers
    assert final["ties"] == sum(ch["pair"]["answers"] == [ANSWER, ANSWER] for ch in read(pairs_only / "chains.jsonl"))
    assert not any(k.startswith("_") for ch in read(pairs_only / "chains.jsonl") for k in ch)  # no internal fields


@pytest.mark.parametrize("text, match", [
    ("critiques: []\npreferences: [a]", r"constitution.yaml: 'critiques' must be a non-empty list"),
    ("critiques:\n  - {critique: a, revision: b}\n  - {critique: c}\n",
     r"constitution.yaml: critiques\[1\] is missing key 'revision'"),
    ("critiques:\n  - {critique: a, revision: 3}\n",
     r"constitution.yaml: critiques\[0\].revision must be a non-empty string"),
    ("critiques:\n  - {critique: a, revision: b}\npreferences: [ok, [x]]\n",
     r"constitution.yaml: preferences\[1\] must be a non-empty string"),
    ("- just a list", r"constitution.yaml: a constitution is a mapping"),
])
def test_bad_constitution_is_one_line_naming_the_entry(tiny_model, toy, text, match):
    (toy / "constitution.yaml").write_text(text)
    with pytest.raises(UserError, match=match) as e:
        cli(cai_args(tiny_model, toy, toy / "out", "--pairs"))
    assert "\n" not in str(e.value) and not (toy / "out").exists()


def test_the_shipped_constitution_loads():
    c = load_constitution(default_constitution(), need_preferences=True)
    assert len(c.critiques) == len(c.preferences) == 8
    assert len({p.critique for p in c.critiques}) == 8 and len(set(c.preferences)) == 8


def test_pairs_need_preference_principles_and_errors_write_nothing(tiny_model, toy):
    (toy / "constitution.yaml").write_text("critiques:\n  - {critique: a, revision: b}\n")
    assert load_constitution(toy / "constitution.yaml").preferences == []  # enough without --pairs
    with pytest.raises(UserError, match="'preferences' must be a non-empty list"):
        cli(cai_args(tiny_model, toy, toy / "out", "--pairs"))
    (toy / "bad.jinja").write_text("{{ request }} {{ critique }}")  # no critique exists before the critique
    with pytest.raises(UserError, match=r"bad.jinja: cannot render: 'critique' is undefined"):
        cli(cai_args(tiny_model, toy, toy / "out", "--critique-template", str(toy / "bad.jinja")))
    (toy / "empty.jsonl").write_text("")
    args = cai_args(tiny_model, toy, toy / "out")
    args[args.index("--data") + 1] = str(toy / "empty.jsonl")
    with pytest.raises(UserError, match="empty.jsonl: has no records"):
        cli(args)
    assert not [p.name for p in (toy / "out").iterdir() if p.name != ".lock"]
    with pytest.raises(UserError, match="--max-length 512 is longer than --model's 256 positions"):
        cli(cai_args(tiny_model, toy, toy / "out", "--max-length", "512"))


def test_too_long_conversations_stop_at_the_last_round_that_fits(tiny_model, toy):
    final = cli(cai_args(tiny_model, toy, toy / "out", "--revisions", "12", "--max-length", "200"))
    chains = read(toy / "out" / "chains.jsonl")
    assert final["stopped_too_long"] == sum(ch["stopped"] == {"reason": "max_length", "round": len(ch["rounds"]) + 1}
                                            for ch in chains) > 0
    assert all(len(ch["rounds"]) < 12 for ch in chains)


@pytest.mark.slow
def test_two_processes_write_the_same_files(tiny_model, toy):
    args = cai_args(tiny_model, toy, toy / "one", "--revisions", "2", "--pairs")
    cli(args)
    two = [a if a != str(toy / "one") else str(toy / "two") for a in args]
    r = run_torchrun(*two)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("chains.jsonl", "sl_cai.jsonl", "pairs.jsonl"):
        a, b = read(toy / "one" / name), read(toy / "two" / name)
        assert [x.get("completion", x.get("chosen", x.get("rounds"))) for x in a] == \
               [x.get("completion", x.get("chosen", x.get("rounds"))) for x in b]
