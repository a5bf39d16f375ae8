"""`alignkit world build | eval | run` configs and entry points."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from alignkit.decoding import DecodingOptions


@dataclass
class WorldBuildConfig:
    """Write the world's data files (corpus, SFT, preference, RL prompts, held-out eval sets)."""

    output: str = "runs/world"
    """Directory for the data files."""
    preset: Literal["smoke", "tiny", "small"] = "tiny"
    """World size: tiny (80 people) or small (240 people); smoke is the tiny world, named for a pipeline check."""
    seed: int = 0
    """Seed of the world (people, attributes, splits, annotator labels)."""
    length_bias: float = 0.6
    """Mean length bias of the simulated annotators (0: none); changes only the preference files."""


def build_main(cfg: WorldBuildConfig) -> dict:
    from alignkit.world.build import build

    summary = build(cfg.output, cfg.preset, cfg.seed, cfg.length_bias)
    print(json.dumps(summary, indent=1))
    return summary


@dataclass
class WorldEvalConfig(DecodingOptions):
    """Score a model on the world's held-out sets with the gold judge, on near and on far frames apart; the
    model answers with the decoding rules and in-context prefix given (the baseline without them)."""

    model: str = ""
    """Model directory to evaluate."""
    world: str = "runs/world"
    """Directory written by `alignkit world build`."""
    baseline: str | None = None
    """Optional second model: adds win_rate_vs_baseline (gold judge, ties count half) and token_shift_vs_baseline
    (how the baseline ranks this model's answer tokens; Lin et al. 2023)."""
    output: str | None = None
    """Write the metrics as JSON here too."""


def eval_main(cfg: WorldEvalConfig) -> dict:
    from alignkit.world.evaluate import evaluate

    if not cfg.model:
        raise SystemExit("error: alignkit world eval needs --model DIR")
    metrics = evaluate(cfg.model, cfg.world, cfg.baseline, cfg)
    text = json.dumps(metrics, indent=1)
    print(text)
    if cfg.output:
        with open(cfg.output, "w") as f:
            f.write(text + "\n")
    return metrics
