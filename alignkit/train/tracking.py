"""metrics.jsonl, progress (a bar on a terminal, plain lines otherwise), and graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import importlib.util
import json
import os
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

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None, tracker=None):
        self.enabled, self.tracker = enabled, tracker
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
        if self.tracker is not None:
            self.tracker.log(clean)


def check_tracker(report_to: str) -> None:
    """Before any model is loaded: the tracker's package (named as its extra) is installed."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise UserError(f"--report-to {report_to} needs the {report_to} package: pip install 'alignkit[{report_to}]'")


def scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "final") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """OUTPUT/tensorboard event files; the final row's numbers go under final/."""

    def __init__(self, out: Path, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = out / "tensorboard"
        if resume_step is None:  # a fresh run's curves must not continue an overwritten run's
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step hides the events an interrupted run logged after the checkpoint being resumed.
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, row: dict) -> None:
        prefix = "final/" if row.get("final") else ""
        for k, v in scalars(row).items():
            self.writer.add_scalar(prefix + k, v, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run in OUTPUT/wandb (WANDB_MODE=offline: no network; `wandb sync` uploads it later), resumed
    under the same id by --resume; the final row goes to the run summary."""

    def __init__(self, out: Path, config: dict, resume_step: int | None):
        import wandb

        id_file = out / "wandb" / "alignkit-run-id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "alignkit"), name=out.resolve().name,
                              dir=str(out), config=config, id=run_id, resume="allow" if run_id else None)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.id)

    def log(self, row: dict) -> None:
        if row.get("final"):
            self.run.summary.update(scalars(row))
        else:
            self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A trackio run (local database; TRACKIO_DIR chooses where), resumed by --resume."""

    def __init__(self, out: Path, config: dict, resume_step: int | None):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "alignkit"), name=out.resolve().name, config=config,
                     resume="allow" if resume_step is not None else "never", auto_log_cpu=False)

    def log(self, row: dict) -> None:
        values = scalars(row)
        self.trackio.log({f"final/{k}": v for k, v in values.items()} if row.get("final") else values, step=row["step"])

    def close(self) -> None:
        self.trackio.finish()


def open_tracker(report_to: str, out: Path, config: dict, resume_step: int | None):
    """The --report-to tracker (main process), or None for none."""
    if report_to == "none":
        return None
    check_tracker(report_to)
    kind = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}[report_to]
    try:
        return kind(Path(out), config, resume_step)
    except Exception as e:  # e.g. wandb online without a login or a network: the user's to fix, before training
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--report-to {report_to}: the tracker did not start: {message}") from e


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
    if getattr(sys.stderr, "isatty", lambda: False)():
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
