"""metrics.jsonl, progress (a bar on a terminal, plain lines otherwise), and graceful stop on SIGTERM/SIGINT."""

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


class PlainProgress:
    """A progress bar's interface printing one plain line every `every` steps or `seconds`, whichever
    comes first, and at the end: logs of CI, `| tee` and nohup get a few readable lines, not thousands
    of carriage returns."""

    def __init__(self, total: int, initial: int, desc: str, every: int | None = None, seconds: float = 30.0,
                 file=None):
        self.total, self.n, self.initial, self.desc = total, initial, initial, desc
        self.every = every or max(10, total // 10)
        self.seconds, self.file = seconds, file or sys.stderr
        self.postfix: dict = {}
        self.start = self.last = time.perf_counter()
        self.printed_at = initial
        self.closed = False

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n - self.printed_at >= self.every or now - self.last >= self.seconds or self.n >= self.total:
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        done = self.n - self.initial
        line = f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%), {elapsed:.1f} s"
        if 0 < done and self.n < self.total:
            line += f", eta {elapsed / done * (self.total - self.n):.0f} s"
        line += "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(line, file=self.file, flush=True)
        self.last, self.printed_at = now, self.n

    def close(self) -> None:
        if not self.closed and self.n > self.printed_at:
            self._print(time.perf_counter())
        self.closed = True


class NoProgress:
    """--no-progress: the same interface, printing nothing."""

    def set_postfix(self, **values) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, initial: int, enabled: bool, desc: str):
    """A tqdm bar when stderr is a terminal, else plain lines (PlainProgress); nothing when not enabled."""
    if not enabled:
        return NoProgress()
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
    return PlainProgress(total, initial, desc)


def progress_iter(items, enabled: bool, desc: str):
    """Iterate over `items` showing progress as `progress` does."""
    items = list(items)
    bar = progress(len(items), 0, enabled, desc)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


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
