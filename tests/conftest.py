"""Shared fixtures: a tokenizer trained on the shipped data and a very small random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[1] / "alignkit" / "assets"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are 64 wide: a second thread buys nothing, and where cores are shared two threads
    per process oversubscribe them (several times slower). Subprocess tests set OMP_NUM_THREADS=1."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Tokenizer (BPE on the shipped corpus) + a 2-layer, 64-wide Llama saved as an HF directory."""
    from alignkit.models import init_model, save_model
    from alignkit.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    texts = []
    for name in ("corpus.jsonl", "instructions.jsonl"):
        for line in (ASSETS / name).read_text().splitlines():
            rec = json.loads(line)
            texts += [rec["text"]] if "text" in rec else [m["content"] for m in rec["messages"]]
    tok = train_tokenizer(texts, vocab_size=512)
    model = init_model("llama", "tiny", tok, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    save_model(model, tok, root / "model")
    return root / "model"


# Tests sharing a session fixture too costly to build twice (pytest-xdist builds one per worker) and the
# longest tests. This pytest no longer lets pytest-xdist read the `xdist_group` mark (it renames node ids
# through an attribute pytest 9 dropped), so the scheduler below groups these ids itself.
XDIST_GROUPS = {
    "tests/world/test_world_run.py::test_world_run_smoke": "smoke_ladder",
    "tests/world/test_length_bias.py::test_length_bias_reuses_the_ladders_base_and_sft": "smoke_ladder",
}
LONGEST_FIRST = ("tests/world/test_world_experiments.py::test_same_seed_rerun_is_bit_identical[sft]",
                 "tests/invariants/test_speed_paths.py::test_compile_follows_the_eager_trajectory",
                 "tests/bench/test_bench.py::test_bench_end_to_end",
                 "tests/invariants/test_trajectories.py::test_sigkill_then_resume_matches_uninterrupted[sft]",
                 "tests/invariants/test_trajectories.py::test_sigkill_then_resume_matches_uninterrupted[pretrain]")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Load scheduling by work unit, a group of XDIST_GROUPS being one unit; units of more tests go first (so
    the shared smoke ladder starts at once rather than running alone at the end)."""
    from xdist.scheduler import LoadGroupScheduling

    class Grouped(LoadGroupScheduling):
        def _split_scope(self, nodeid):
            return XDIST_GROUPS.get(nodeid) or super()._split_scope(nodeid)

    return Grouped(config, log) if config.getvalue("dist") in ("load", "loadgroup") else None


def pytest_collection_modifyitems(items):
    """LONGEST_FIRST before the rest (a stable sort), so that no worker runs one of them alone at the end."""
    items.sort(key=lambda item: item.nodeid not in LONGEST_FIRST)
