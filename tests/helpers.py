"""Helpers shared by test files (importable because pytest puts tests/ on sys.path, see pyproject)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `alignkit ...` in a fresh interpreter (for kill/resume and torchrun tests)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], env=full_env, capture_output=True,
                          text=True, **kwargs)


# Message builders and a loss-mask reader for the data-layer tests.
def u(x):
    return {"role": "user", "content": x}


def a(x):
    return {"role": "assistant", "content": x}


def s(x):
    return {"role": "system", "content": x}


def spans(tokenizer, ex):
    """Decoded text of the trained-on tokens, one string per contiguous masked span."""
    out, cur = [], []
    for t, m in zip(ex.input_ids + [None], ex.loss_mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    return out
