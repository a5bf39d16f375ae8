"""report.md / report.html and plots for `alignkit world run`, for one seed (OUT/seed-S) and for the aggregate over
seeds (OUT), made from results.json, timings.json and each stage's metrics.jsonl (never from inside a training loop).

Each experiment renders its own section (experiments/NAME.py's report(section)); the helpers here (fmt, near_far_table)
render a figure the same way whether it is one seed's number or the aggregate's {"mean", "per_seed", "ci95"} leaf.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

SMOKE_NOTE = ("A smoke run: these figures mean nothing. The smoke preset trains each stage for a few steps only, "
              "to check that the pipeline runs end to end; run --preset tiny or small for figures.")
# The held-out metrics the per-stage plot shows, when a stage has them.
PLOTTED = ("qa_accuracy_seen", "harmful_refusal", "benign_overrefusal", "arith_accuracy", "eos_rate", "gold_reward",
           "mean_length")


def is_leaf(value) -> bool:
    """An aggregate figure: {"mean", "per_seed", "ci95", "method"}."""
    return isinstance(value, dict) and "mean" in value and "ci95" in value


def mean_of(value) -> float:
    """The point estimate of a number or an aggregate leaf (NaN for anything else)."""
    if is_leaf(value):
        return value["mean"]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def interval_of(value) -> tuple[float, float]:
    return tuple(value["ci95"]) if is_leaf(value) else (math.nan, math.nan)


def fmt(value, digits: int = 3) -> str:
    """A number as "0.512", an aggregate leaf as "0.512 [0.430, 0.590] (0.48 0.55 0.51)": mean, 95% interval,
    the seeds' values (the interval is left out where one seed gives none)."""
    if value is None:
        return ""
    if is_leaf(value):
        text = f"{value['mean']:.{digits}f}"
        lo, hi = value["ci95"]
        if not (math.isnan(lo) or math.isnan(hi)):
            text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
        if len(value["per_seed"]) > 1:
            text += " (" + " ".join(f"{v:.{max(digits - 1, 1)}f}" for v in value["per_seed"]) + ")"
        return text
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value.get("per_seed", value)) if isinstance(value, dict) else str(value)
    return f"{value:.{digits}f}"


def near_far_table(rows: dict[str, dict], columns: list[str], digits: int = 3) -> list[str]:
    """Markdown table: one line per label of `rows` ({label: {"near": {...}, "far": {...}}}), each column's
    near and far figures side by side."""
    head = " | ".join(f"{c} near | {c} far" for c in columns)
    lines = [f"| | {head} |", "|---" * (2 * len(columns) + 1) + "|"]
    for label, value in rows.items():
        cells = [fmt(value.get(side, {}).get(c), digits) for c in columns for side in ("near", "far")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def evaluations(section: dict) -> dict[str, dict]:
    """Every evaluation {label: {"near": {...}, "far": {...}}} in a section, at any depth, in order (a paired
    effect, which names its "pair", is not one)."""
    found = {}
    for key, value in section.items():
        if isinstance(value, dict) and isinstance(value.get("near"), dict) and isinstance(value.get("far"), dict):
            if "pair" not in value:
                found[key] = value
        elif isinstance(value, dict):
            found |= evaluations(value)
    return found


def curves(section: dict, path: str = "") -> dict[str, dict]:
    """Every best-of-n style curve in a section: a dict holding equal-length lists "kl" and "gold_reward"."""
    found = {}
    for key, value in section.items():
        if not isinstance(value, dict):
            continue
        if isinstance(value.get("kl"), list) and isinstance(value.get("gold_reward"), list):
            found[path + key] = value
        else:
            found |= curves(value, f"{path}{key}/")
    return found


def generic_report(section: dict) -> str:
    """A section of an experiment this build does not know: every figure by its path."""
    lines = ["| figure | value |", "|---|---|"]

    def walk(value, path):
        if isinstance(value, dict) and not is_leaf(value):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list) and not all(isinstance(v, (int, float)) for v in value):
            lines.append(f"| {path} | " + ", ".join(fmt(v) for v in value).replace("|", "\\|") + " |")
        else:
            lines.append(f"| {path} | {fmt(value)} |".replace("\n", " "))

    walk(section, "")
    return "\n".join(lines)


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stage_dirs(out: Path) -> dict[str, Path]:
    """The cached stages of a seed directory by label (cache/LABEL-KEY12/)."""
    dirs = {}
    for d in sorted((out / "cache").glob("*-*")):
        label = re.sub(r"-[0-9a-f]{12}$", "", d.name)
        if (d / "metrics.jsonl").is_file():
            dirs[label] = d
    return dirs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_plot(out: Path) -> Path | None:
    """One seed's training curves: loss of the supervised and preference stages, RL reward and answer length."""
    stages = _stage_dirs(out)
    if not stages:
        return None
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(16, 4))
    for label, d in stages.items():
        rows = _metrics(d / "metrics.jsonl")
        loss = [r for r in rows if "loss" in r and not r.get("final") and "reward_mean" not in r]
        if loss:
            ax[0].plot([r["step"] for r in loss], [r["loss"] for r in loss], label=label)
        reward = [r for r in rows if "reward_mean" in r]
        if reward:
            ax[1].plot([r["step"] for r in reward], [r["reward_mean"] for r in reward], label=label)
        length = [r for r in rows if "completion_length" in r]
        if length:
            ax[2].plot([r["step"] for r in length], [r["completion_length"] for r in length], label=label)
    ax[0].set(title="training loss", xlabel="step", yscale="log")
    ax[1].set(title="RL reward during training", xlabel="step")
    ax[2].set(title="sampled answer length during RL", xlabel="step", ylabel="tokens")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    p = out / "training.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


def _errorbars(values: list) -> tuple[list[float], list[list[float]] | None]:
    """Means and matplotlib's yerr (distances below and above) when every value has a finite interval."""
    means = [mean_of(v) for v in values]
    spans = [interval_of(v) for v in values]
    if not spans or any(math.isnan(lo) or math.isnan(hi) for lo, hi in spans):
        return means, None
    return means, [[max(m - lo, 0.0) for m, (lo, _) in zip(means, spans)],
                   [max(hi - m, 0.0) for m, (_, hi) in zip(means, spans)]]


def stages_plot(out: Path, name: str, section: dict) -> Path | None:
    """Held-out metrics per evaluated stage, near frames beside far frames, with the 95% interval as error bars."""
    evals = evaluations(section)
    metrics = [m for m in PLOTTED if any(m in e["near"] or m in e["far"] for e in evals.values())]
    wins = sorted({m for e in evals.values() for m in e["near"] if m.startswith("win_rate_vs_")})
    metrics += wins
    if not evals or not metrics:
        return None
    plt = _plt()
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    labels = list(evals)
    for ax, metric in zip(axes.flat, metrics):
        for i, side in enumerate(("near", "far")):
            values = [evals[label][side].get(metric) for label in labels]
            means, yerr = _errorbars(values)
            x = [j + (i - 0.5) * 0.3 for j in range(len(labels))]
            ax.errorbar(x, means, yerr=yerr, fmt="o", capsize=3, label=f"{side} frames")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_title(metric, fontsize=9)
        if metric.startswith("win_rate_vs_"):
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{name}: held-out metrics per stage (gold judge)", fontsize=10)
    fig.tight_layout()
    p = out / f"{name}-stages.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


def curve_plot(out: Path, name: str, key: str, curve: dict) -> Path:
    """A best-of-n curve against KL: proxy and gold reward (mean with a 95% band over seeds) and answer length."""
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    kl = [mean_of(v) for v in curve["kl"]]

    def band(a, values, label, color):
        means = [mean_of(v) for v in values]
        a.plot(kl, means, marker="o", color=color, label=label)
        spans = [interval_of(v) for v in values]
        if not any(math.isnan(lo) for lo, _ in spans):
            a.fill_between(kl, [lo for lo, _ in spans], [hi for _, hi in spans], color=color, alpha=0.2)

    if "proxy_reward" in curve:
        band(ax[0], curve["proxy_reward"], "proxy reward (RM)", "C0")
        ax[0].set_ylabel("proxy")
        gold_ax = ax[0].twinx()
        gold_ax.set_ylabel("gold")
        ax[0].legend(loc="upper left")
    else:
        gold_ax = ax[0]
    band(gold_ax, curve["gold_reward"], "gold reward", "C1")
    gold_ax.legend(loc="lower right")
    ax[0].set(title=f"best-of-n against the proxy RM ({key})", xlabel="KL(best-of-n || policy), nats")
    if "mean_length" in curve:
        band(ax[1], curve["mean_length"], "picked answer", "C2")
    ax[1].set(title="length of the picked answer", xlabel="KL, nats", ylabel="tokens")
    fig.tight_layout()
    p = out / f"{name}-{key.replace('/', '-')}.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


def _experiment_modules() -> dict:
    try:
        from alignkit.world.experiments import EXPERIMENTS
    except ImportError:
        return {}
    return EXPERIMENTS


def write_report(out: Path, results: dict) -> None:
    """OUT/seed-S/report.md for one seed's results.json, or OUT/report.md for the aggregate (it has "seeds");
    report.html beside it holds the same text and the plots."""
    out = Path(out)
    aggregate = "seeds" in results
    smoke = results["preset"] == "smoke"
    modules = _experiment_modules()
    experiments = results.get("experiments", {})
    if aggregate:
        seeds = ", ".join(map(str, results["seeds"]))
        title = f"alignkit world run ({results['preset']}, seeds {seeds}: mean [95% interval] (each seed))"
    else:
        title = f"alignkit world run ({results['preset']}, seed {results['seed']})"
    md = [f"# {title}", "", *([f"**{SMOKE_NOTE}**", ""] if smoke else [])]
    if aggregate:
        md += [results["interval"], ""]
        ran = results.get("experiment_seeds", {})
        md += [f"- {name}: seeds {', '.join(map(str, ran[name]))}" for name in experiments if name in ran] + [""]
    images = []
    for name, section in experiments.items():
        module = modules.get(name)
        md += [f"## {name}" + (f": {module.SUMMARY}" if module else ""), ""]
        md += [module.report(section) if module else generic_report(section), ""]
        p = stages_plot(out, name, section)
        images += [p] if p else []
        images += [curve_plot(out, name, key, c) for key, c in curves(section).items()]
    if not aggregate:
        timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
        timings = {"timings": results.get("timings", {}), "commands": results.get("commands", [])} | timings
        if timings["timings"]:
            md += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
            md += [f"| {k} | {v:.1f} |" for k, v in timings["timings"].items()] + [""]
        if timings["commands"]:
            md += ["## The commands (each stage is a normal alignkit command)", "", "```", *timings["commands"], "```", ""]
        p = training_plot(out)
        images += [p] if p else []
    text = "\n".join(md)
    (out / "report.md").write_text(text + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images))
    body = [f"<h1>{html.escape(title)}</h1>"]
    if smoke:
        body.append(f"<p><strong>{html.escape(SMOKE_NOTE)}</strong></p>")
    body.append(f"<pre>{html.escape(text)}</pre>")
    body += [f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in images]
    (out / "report.html").write_text("<!doctype html><meta charset=utf-8><title>alignkit world</title>" + "".join(body))
