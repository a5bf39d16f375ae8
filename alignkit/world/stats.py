"""Intervals over seeds and held-out prompts, and the aggregate of a world run's seeds (OUT/results.json).

A metric computed from per-prompt rows (a rate, a mean gold reward, a win rate) gets a hierarchical percentile
bootstrap: resample the seeds, then the prompts within each resampled seed, so the interval carries both the
training noise (which seed) and the sampling noise of a finite held-out set. Every other number (a training
statistic, a curve point, a reward model's accuracy) gets a Student t-interval over the seeds' values.
A paired effect, {"pair": [LABEL, BASELINE], "near": {"METRIC_change": ...}, "far": ...} in a section, is
bootstrapped from the per-prompt differences of the two evaluations' rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from alignkit.eval.metrics import N_BOOTSTRAP, bootstrap_ci  # noqa: F401 (part of this module's interface)

INTERVAL = ("95% intervals. Figures computed from per-prompt rows (rates, gold reward, and the comparisons, "
            "win rates and changes, which are paired over the same prompts) use a hierarchical percentile bootstrap: 2000 resamples of the seeds, "
            "then of the held-out prompts within each resampled seed; every other figure uses a Student t-interval "
            "over the seeds (none with a single seed).")


def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df, by the closed-form series of Abramowitz & Stegun 26.7.3-4."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... up to cos^(df-2)
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided critical value: P(|T| <= q) = level (bisection on the exact CDF)."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_abs_cdf(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_ci(values: list[float]) -> tuple[float, float]:
    """Student t 95% interval of the mean of the seeds' values; NaN with fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or not np.isfinite(v).all():
        return (math.nan, math.nan)
    half = t_quantile(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return (float(v.mean() - half), float(v.mean() + half))


def paired_differences(rows: list[dict], baseline_rows: list[dict], metric: str,
                       distance: str | None = None) -> list[float]:
    """Per prompt that METRICS[metric] counts (of `distance`, if given), its value on `rows` minus its value on
    `baseline_rows`, which must hold the same prompts in the same order (checked)."""
    from alignkit.world.evaluate import METRICS

    if [(r["set"], r["prompt"]) for r in rows] != [(r["set"], r["prompt"]) for r in baseline_rows]:
        raise ValueError("paired rows must hold the same prompts in the same order")
    counts, value = METRICS[metric]
    return [float(value(a)) - float(value(b)) for a, b in zip(rows, baseline_rows)
            if (distance is None or a["distance"] == distance) and counts(a) and counts(b)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def t_leaf(values: list[float]) -> dict:
    return {"mean": _mean(values), "per_seed": list(values), "ci95": list(t_ci(values)), "method": "t"}


def bootstrap_leaf(values_per_seed: list[list[float]]) -> dict:
    per_seed = [_mean(v) for v in values_per_seed]
    return {"mean": _mean(per_seed), "per_seed": per_seed, "ci95": list(bootstrap_ci(values_per_seed)),
            "method": "bootstrap"}


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Aggregator:
    """Merges one experiment's sections over the seeds that ran it."""

    def __init__(self, out: Path, name: str, seeds: list[int]):
        from alignkit.world.evaluate import METRICS

        self.out, self.name, self.seeds, self.metrics = out, name, seeds, METRICS

    def rows(self, label: str) -> list[list[dict]] | None:
        paths = [self.out / f"seed-{s}" / "rows" / self.name / f"{label}.jsonl" for s in self.seeds]
        return [_read_rows(p) for p in paths] if all(p.is_file() for p in paths) else None

    def evaluation(self, values: list[dict], rows: list[list[dict]]) -> dict:
        """An evaluation's near/far metrics from the rows; its other entries as any other value."""
        merged = {}
        for key in _keys(values):
            here = [v[key] for v in values if key in v]
            if key not in ("near", "far") or not all(isinstance(v, dict) for v in here):
                merged[key] = self.merge(here)
                continue
            side = [[r for r in seed_rows if r["distance"] == key] for seed_rows in rows]
            merged[key] = {}
            for metric in _keys(here):
                if metric in self.metrics:
                    counts, value = self.metrics[metric]
                    merged[key][metric] = bootstrap_leaf([[value(r) for r in s if counts(r)] for s in side])
                elif metric.startswith("win_rate_vs_"):
                    column = f"win_vs_{metric.removeprefix('win_rate_vs_')}"
                    merged[key][metric] = bootstrap_leaf([[r.get(column, r.get("win")) for r in s] for s in side])
                else:
                    merged[key][metric] = self.merge([v[metric] for v in here if metric in v])
        return merged

    def effect(self, values: list[dict], rows: list[list[dict]], baseline_rows: list[list[dict]]) -> dict:
        """A paired effect {"pair": [LABEL, BASELINE], "near": {METRIC_change}, "far": ...}: per prompt, LABEL's
        metric minus BASELINE's on the same prompt, bootstrapped like any row-backed figure."""
        merged = {}
        for key in _keys(values):
            here = [v[key] for v in values if key in v]
            if key not in ("near", "far") or not all(isinstance(v, dict) for v in here):
                merged[key] = self.merge(here)
                continue
            merged[key] = {}
            for name in _keys(here):
                metric = name.removesuffix("_change")
                if name.endswith("_change") and metric in self.metrics:
                    merged[key][name] = bootstrap_leaf([paired_differences(a, b, metric, key)
                                                        for a, b in zip(rows, baseline_rows)])
                else:
                    merged[key][name] = self.merge([v[name] for v in here if name in v])
        return merged

    def merge(self, values: list):
        """Values of one place of the section tree, one per seed that has it."""
        if all(_is_number(v) for v in values):
            return t_leaf(values)
        if all(isinstance(v, dict) for v in values):
            out = {}
            for key in _keys(values):
                here = [v[key] for v in values if key in v]
                whole = len(here) == len(self.seeds) and all(map(_is_evaluation, here))
                pair = here[0].get("pair") if whole else None
                if pair and all(v.get("pair") == pair for v in here):
                    rows, baseline_rows = self.rows(pair[0]), self.rows(pair[1])
                    if rows is not None and baseline_rows is not None:
                        out[key] = self.effect(here, rows, baseline_rows)
                        continue
                rows = self.rows(key) if whole else None
                out[key] = self.evaluation(here, rows) if rows is not None else self.merge(here)
            return out
        if all(isinstance(v, list) for v in values) and all(_is_number(x) for v in values for x in v):
            # A curve: each point over the seeds whose curve reaches it.
            return [t_leaf([v[i] for v in values if i < len(v)]) for i in range(max(map(len, values), default=0))]
        if all(v == values[0] for v in values):
            return values[0]
        return {"per_seed": values}


def _is_evaluation(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("near"), dict) and isinstance(value.get("far"), dict)


def _keys(dicts: list[dict]) -> list:
    """The keys of several dicts in first-seen order."""
    return list(dict.fromkeys(k for d in dicts for k in d))


def aggregate(out: Path, preset: str | None = None) -> dict:
    """Merge every OUT/seed-*/results.json of one preset (the newest run's, unless given) into OUT/results.json:
    the sections' tree with each number replaced by {"mean", "per_seed", "ci95", "method"}, each experiment over
    the seeds that ran it ("experiment_seeds")."""
    out = Path(out)
    found = sorted(((int(p.parent.name.removeprefix("seed-")), p) for p in out.glob("seed-*/results.json")
                    if p.parent.name.removeprefix("seed-").isdigit()))
    if not found:
        raise FileNotFoundError(f"no seed-*/results.json in {out}")
    results = {s: json.loads(p.read_text()) for s, p in found}
    if preset is None:
        preset = results[max(found, key=lambda sp: sp[1].stat().st_mtime)[0]]["preset"]
    skipped = [s for s, r in results.items() if r["preset"] != preset]
    if skipped:
        print(f"aggregate: seeds {skipped} ran another preset than {preset}; left out", flush=True)
    seeds = [s for s in results if s not in skipped]
    experiments, experiment_seeds = {}, {}
    for name in _keys([results[s]["experiments"] for s in seeds]):
        ran = [s for s in seeds if name in results[s]["experiments"]]
        experiment_seeds[name] = ran
        experiments[name] = _Aggregator(out, name, ran).merge([results[s]["experiments"][name] for s in ran])
    agg = {"preset": preset, "seeds": seeds, "interval": INTERVAL, "experiment_seeds": experiment_seeds,
           "experiments": experiments}
    (out / "results.json").write_text(json.dumps(agg, indent=1))
    return agg
