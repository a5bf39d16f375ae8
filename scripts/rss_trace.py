"""Peak RSS of a command's whole process tree, and of each process in it (e.g. torchrun's ranks).

Usage: python scripts/rss_trace.py TRACE.tsv -- COMMAND ARGS...

Samples /proc every 20 ms; writes "seconds<TAB>MB" (the tree's total) to TRACE.tsv and prints the total's
peak, when it happened, and each process's own peak. docs/performance.md's real-shape traces come from it.
"""

import subprocess
import sys
import time
from pathlib import Path


def tree_rss(root: int) -> dict[int, float]:
    """RSS in MB of `root` and every process below it."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    rss, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
            rss[pid] = int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            pass
        todo += children.get(pid, [])
    return rss


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        raise SystemExit(__doc__.strip().splitlines()[2])
    t0 = time.time()
    proc = subprocess.Popen(sys.argv[3:])
    rows, peaks = [], {}
    while proc.poll() is None:
        rss = tree_rss(proc.pid)
        rows.append((time.time() - t0, sum(rss.values())))
        for pid, mb in rss.items():
            peaks[pid] = max(peaks.get(pid, 0.0), mb)
        time.sleep(0.02)
    Path(sys.argv[1]).write_text("".join(f"{t:.2f}\t{mb:.0f}\n" for t, mb in rows))
    if rows:
        t, mb = max(rows, key=lambda r: r[1])
        print(f"exit {proc.returncode}: tree peak {mb:.0f} MB at {t:.1f} s of {rows[-1][0]:.1f} s; per process: "
              + ", ".join(f"{pid} {mb:.0f} MB" for pid, mb in sorted(peaks.items())), file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
