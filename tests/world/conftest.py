"""Shared world fixtures. The smoke ladder, the suite's longest run, runs once per session: tests/world/test_world_run.py
checks its results and tests/world/test_length_bias.py runs a second experiment on a copy of it. The tests
that use it run on one worker (tests/conftest.py's XDIST_GROUPS), so it is built once. The tiny world's data
(seed 0) is built once per worker."""

import pytest

from alignkit.cli import run as cli
from alignkit.world import stages


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """`alignkit world build --preset tiny --seed 0`'s files (read only)."""
    from alignkit.world.build import build

    out = tmp_path_factory.mktemp("world")
    build(out, "tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def smoke_ladder(tmp_path_factory):
    """(output dir, the first argument of every alignkit command its stages ran) of `alignkit world run
    --preset smoke`: the whole ladder, aggregated and reported."""
    calls = []

    def counting(argv):
        calls.append(argv[0])
        return cli(argv)

    out = tmp_path_factory.mktemp("smoke-ladder") / "world"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "alignkit", counting)
        cli(["world", "run", "--preset", "smoke", "--output", str(out), "--no-progress", "--threads", "1"])
    return out, tuple(calls)
