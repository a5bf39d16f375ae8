"""The data the issue-19 experiments build from a world: kinds of demonstration, people absent from pretraining,
equal-size variants, safety doses and the planted records of the noisy pool."""

import json

from alignkit.world.experiments import data_selection, safety_dose, sft_data, unknown_facts
from alignkit.world.facts import REFUSAL


class FakeContext:
    def __init__(self, out, seed=0):
        self.out, self.seed = out, seed

    def derived(self, experiment, name, rows):
        path = self.out / experiment / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path


def test_every_world_demonstration_has_one_kind(world_dir):
    groups = sft_data.by_kind(world_dir)
    n = len(sft_data.read_jsonl(world_dir / "sft.jsonl"))
    assert sum(map(len, groups.values())) == n
    assert all(len(groups[k]) > 0 for k in sft_data.KINDS)
    assert all(r["messages"][-1]["content"] == REFUSAL for r in groups["harmful"])
    names = {p.name for p in sft_data.world_of(world_dir).people}
    assert all(any(r["messages"][-1]["content"].startswith(name) for name in names) for r in groups["fact"])


def test_absent_people_are_in_no_world_file(world_dir):
    people = sft_data.absent_people(world_dir, 20, seed=0)
    assert len({p.name for p in people}) == 20
    text = "".join((world_dir / f).read_text() for f in ("corpus.jsonl", "sft.jsonl")) + "".join(
        p.read_text() for p in (world_dir / "eval").glob("*.jsonl"))
    assert not any(p.name in text for p in people)


def test_unknown_fact_variants_have_equal_size_and_the_stated_shares(world_dir, tmp_path):
    out = unknown_facts.variants(FakeContext(tmp_path), world_dir)
    sizes = {name: len(sft_data.read_jsonl(path)) for name, (path, _, _) in out.items()}
    assert len(set(sizes.values())) == 1, sizes
    for share in unknown_facts.SHARES:
        _, known, absent = out[unknown_facts.label(share)]
        assert len(absent) / (len(known) + len(absent)) == share


def test_safety_doses_are_counted_refusals_of_training_requests(world_dir):
    demos = safety_dose.refusal_demos(world_dir, 100, seed=0)
    assert len(demos) == 100 and all(d["messages"][-1]["content"] == REFUSAL for d in demos)
    held_out = {json.loads(line)["prompt"][-1]["content"] for line in (world_dir / "eval" / "harmful.jsonl").open()}
    assert not held_out & {d["messages"][0]["content"] for d in demos}


def test_the_noisy_pool_plants_what_it_says(world_dir):
    records, kinds = data_selection.noisy_pool(world_dir, seed=0)
    n_clean = len(sft_data.read_jsonl(world_dir / "sft.jsonl"))
    assert len(records) == n_clean + sum(data_selection.PLANTED.values())
    assert {k: kinds.count(k) for k in data_selection.PLANTED} == data_selection.PLANTED
    text = [r["messages"][-1]["content"] for r in records]
    assert all(not t.endswith(".") for t, k in zip(text, kinds) if k == "truncated")
    assert all(t.startswith(("####", "{{", "[[")) for t, k in zip(text, kinds) if k == "off_format")
    lines = [json.dumps(r) for r in records]
    assert all(lines.count(line) >= 2 for line, k in zip(lines, kinds) if k == "duplicate")
