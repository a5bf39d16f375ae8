"""Reading what a stage wrote, for the experiments that compute from stage outputs."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def final_metrics(run_dir: Path) -> dict:
    """The last row of a command's metrics.jsonl: its summary."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")[-1]


def text(message) -> str:
    """An answer's text: a string, or the content of a message list's last message."""
    return message if isinstance(message, str) else message[-1]["content"]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
