"""`alignkit report RUN_DIR [RUN_DIR ...]`: a run's metrics.jsonl (and config.yaml) as report.html with one
PNG per logged number (loss, lr, grad norm, then each recipe's own curves), several runs overlaid."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro
import yaml

from alignkit.errors import UserError, writing
from alignkit.train.tracking import MetricsWriter

# Curves every training command logs come first; the recipe's own follow in the order it logs them.
FIRST = ("loss", "lr", "grad_norm")
# Bookkeeping columns: not curves.
NOT_CURVES = {"step", "final"}


@dataclass
class ReportConfig:
    """Plots and a summary table of one or more runs."""

    runs: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR [RUN_DIR ...]")] = ()
    """Run directories (each holding the metrics.jsonl of a training command)."""
    output: Annotated[str | None, tyro.conf.arg(metavar="DIR")] = None
    """Directory for report.html and its PNGs (report/*.png). Default: the run directory when there is one run; required with several."""


@dataclass
class RunData:
    label: str
    path: Path
    command: str
    config: dict
    rows: list[dict]
    final: dict


def load_run(path: Path, label: str) -> RunData:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics}: no such file (is {path} the output directory of a training run?)")
    all_rows = MetricsWriter(path, enabled=False).read()
    rows = [r for r in all_rows if not r.get("final") and "step" in r]
    finals = [r for r in all_rows if r.get("final")]
    if not rows and not finals:
        raise UserError(f"{metrics}: no metrics rows (the run stopped before its first logged step)")
    config, command = {}, ""
    config_path = path / "config.yaml"
    if config_path.is_file():
        text = config_path.read_text()
        first = text.splitlines()[0] if text else ""
        if first.startswith("# alignkit "):  # the command that wrote it (see config.save_config)
            command = first[2:].strip()
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{config_path}: invalid YAML: {e}") from None
    return RunData(label, path, command, config if isinstance(config, dict) else {}, rows, finals[-1] if finals else {})


def labels_for(paths: list[Path]) -> list[str]:
    """Each run's directory name, or its whole path when two runs share a name."""
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v) -> bool:
    return is_number(v) and math.isfinite(v)


def curve_keys(runs: list[RunData]) -> list[str]:
    seen: dict[str, None] = {}
    for run in runs:
        for row in run.rows:
            for k, v in row.items():
                if k not in NOT_CURVES and is_finite(v):
                    seen.setdefault(k, None)
    return [k for k in FIRST if k in seen] + [k for k in seen if k not in FIRST]


def file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"


def plot(key: str, runs: list[RunData], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in runs:
        points = [(r["step"], r[key]) for r in run.rows if is_finite(r.get(key))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=run.label)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(header: list[str], body: list[list]) -> str:
    def cell(v):
        if is_number(v) and not float(v).is_integer():
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def config_differences(runs: list[RunData]) -> list[list]:
    keys = sorted({k for run in runs for k in run.config} - {"output"})
    return [[k, *(run.config.get(k, "") for run in runs)] for k in keys
            if len({repr(run.config.get(k)) for run in runs}) > 1]


def render(runs: list[RunData], images: list[tuple[str, str]]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>alignkit report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{margin:4px}</style></head><body>",
             "<h1>alignkit report</h1>", "<h2>Runs</h2>",
             table(["run", "command", "directory", "logged steps", "last step"],
                   [[r.label, r.command, str(r.path), len(r.rows), r.rows[-1]["step"] if r.rows else ""] for r in runs])]
    final_keys = [k for k in dict.fromkeys(k for r in runs for k in r.final) if k != "final"]
    if final_keys:
        parts += ["<h2>Final row</h2>", table(["run", *final_keys], [[r.label, *(r.final.get(k, "") for k in final_keys)]
                                                                      for r in runs])]
    if len(runs) > 1:
        diffs = config_differences(runs)
        parts += ["<h2>Config differences</h2>",
                  table(["field", *(r.label for r in runs)], diffs) if diffs else "<p>none</p>"]
    parts.append("<h2>Curves</h2>")
    parts += [f"<img src='{html.escape(src)}' alt='{html.escape(key)}'>" for key, src in images]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def main(cfg: ReportConfig) -> Path:
    if not cfg.runs:
        raise UserError("alignkit report needs at least one RUN_DIR")
    if len(cfg.runs) > 1 and not cfg.output:
        raise UserError(f"--output is required with several runs ({len(cfg.runs)} given): where to write the report")
    paths = [Path(p) for p in cfg.runs]
    runs = [load_run(p, label) for p, label in zip(paths, labels_for(paths))]
    out = Path(cfg.output) if cfg.output else paths[0]
    images = []
    with writing(out, "--output"):
        (out / "report").mkdir(parents=True, exist_ok=True)
        for key in curve_keys(runs):
            name = file_name(key)
            plot(key, runs, out / "report" / name)
            images.append((key, f"report/{name}"))
        tmp = out / "report.html.tmp"
        tmp.write_text(render(runs, images))
        tmp.replace(out / "report.html")
    print(f"wrote {out / 'report.html'} ({len(images)} plots in {out / 'report'})")
    return out / "report.html"
