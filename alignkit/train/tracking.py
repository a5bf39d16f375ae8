"""metrics.jsonl, the progress bar, and graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.errors import UserError, writing


class MetricsWriter:
    """Appends one JSON object per logging step to OUTPUT/metrics.jsonl (main process only).

    On resume, rows logged after the checkpoint being resumed are dropped first, so the file reads as
    one uninterrupted run; a last row cut short by a kill mid-write is dropped with a warning."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        if not enabled:
            return
        with writing(self.path, "metrics"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.write_text("")
            elif self.path.exists():
                keep = [row for row in self.read() if not row.get("final") and row["step"] <= resume_step]
                self.path.write_text("".join(json.dumps(row) + "\n" for row in keep))

    def read(self) -> list[dict]:
        lines = self.path.read_text().splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines):
                    raise UserError(f"{self.path}:{i}: not a JSON row; the metrics file is damaged") from None
                print(f"warning: {self.path}:{i}: dropped a partial last row (the run was killed while writing it)",
                      file=sys.stderr)
        return rows

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
        with writing(self.path, "metrics"), self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


class GracefulStop:
    """Turns the first SIGTERM/SIGINT into a request to checkpoint and exit at the end of the step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up waiting
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived signal {signum}: saving a checkpoint at the end of this step", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def progress(total: int, initial: int, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                file=sys.stderr)


class Throughput:
    """Tokens/s over the interval since the last call (wall clock)."""

    def __init__(self):
        self.t0 = self.start = time.perf_counter()
        self.tokens = 0

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return r

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
