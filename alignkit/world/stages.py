"""The stages a world experiment is made of, run once per world directory and reused by content.

A stage is an ordinary `alignkit` command (printed, so a run doubles as a tutorial). Its output directory is
named by a key over everything that decides its result: the command line, the content of its input files,
the preset's budget, the seed and the alignkit source, so a second experiment that needs the same base or
SFT model finds it instead of retraining it, and a changed input or code version trains a new one. A stage
is complete only once its `.complete` marker exists (written last): a killed stage is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import os
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

from alignkit.cli import run as alignkit

# Optimizer-step budgets per preset. tiny is sized for <= 10 minutes on 2 CPU cores; smoke only checks
# the pipeline end to end (CI) and shows no effects, so it also trains DPO and PPO on smaller batches
# (pref_batch; the others train at the ladder's 16).
PRESETS = {
    "smoke": dict(world="smoke", pretrain_steps=10, sft_steps=10, rm_steps=5, dpo_steps=3, ppo_steps=2,
                  grpo_steps=2, bon_prompts=8, bon_n=4, pref_batch=4, judge_sft_steps=10, feedback_prompts=8,
                  judge_items=48),
    "tiny": dict(world="tiny", pretrain_steps=350, sft_steps=400, rm_steps=130, dpo_steps=75, ppo_steps=30,
                 grpo_steps=50, bon_prompts=64, bon_n=32, judge_sft_steps=500, feedback_prompts=96, judge_items=-1),
    "small": dict(world="small", pretrain_steps=6000, sft_steps=1200, rm_steps=350, dpo_steps=500, ppo_steps=150,
                  grpo_steps=120, bon_prompts=200, bon_n=64, judge_sft_steps=1500, feedback_prompts=300, judge_items=-1),
}
DEFAULT_LENGTH_BIAS = 0.6  # the annotator pool of `alignkit world build`


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's relative paths and file contents. A complete stage directory is
    named by its key, which already decides its content (its logs and timings differ from run to run)."""
    path = Path(path)
    if (path / ".complete").is_file():
        return (path / ".complete").read_text().strip()
    h = hashlib.sha256()
    if path.is_file():
        _hash_file(path, h)
        return h.hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"stage input {path} does not exist")
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        _hash_file(f, h)
    return h.hexdigest()


# The world's driver: code that decides which stages run and reports on them, not what a stage computes.
OUTSIDE_STAGES = {"world/run.py", "world/stages.py", "world/report.py", "world/stats.py", "report.py"}


@cache
def source_version() -> str:
    """sha256 of the alignkit source a stage's command runs (every alignkit/**/*.py but the world's experiment
    driver and reports, which never run inside a stage): a change to it invalidates the cache."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if f.relative_to(root).as_posix() in OUTSIDE_STAGES or f.parent == root / "world" / "experiments":
            continue
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class Context:
    """One seed of a world run: its directory, budget and the cached stages every experiment shares."""

    def __init__(self, out: str | Path, seed: int, preset: str, progress: bool = False, stages: str = "all",
                 at_once: int = 1):
        self.out, self.seed, self.preset, self.progress = Path(out), seed, preset, progress
        self.budget = PRESETS[preset]
        self.stages = stages  # the ladder's --stages subset
        self.at_once = at_once  # independent training stages run at once (stages_at_once)
        self.commands: list[str] = []
        self.timings: dict[str, float] = {}
        self._done: set[str] = set()
        self._sets: dict[Path, dict] = {}
        self._answers: dict[tuple[Path, Path], dict] = {}
        self._evaluations: dict[tuple[Path, Path], dict] = {}

    def time(self, label: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), its wall time added to timings[label]."""
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[label] = self.timings.get(label, 0.0) + time.perf_counter() - t

    def key(self, command: list[str], inputs: list[Path]) -> str:
        # Paths are keyed relative to this seed's directory, so a moved world directory keeps its cache.
        argv = [a.replace(str(self.out), "$OUT") for a in command]
        spec = {"argv": argv, "inputs": [content_hash(p) for p in inputs], "budget": self.budget,
                "seed": self.seed, "source": source_version()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def _plan(self, label: str, command: list[str], inputs: list[Path], tail: list[str]):
        """(output dir, key, argv, whether it still has to run); says the command once per context."""
        key = self.key([*command, *tail], inputs)
        out = self.out / "cache" / f"{label}-{key[:12]}"
        argv = [*command, "--output", str(out), *tail]
        if key in self._done:  # already run or found by this context
            return out, key, argv, False
        self._done.add(key)
        line = "alignkit " + shlex.join(argv)
        cached = (out / ".complete").is_file()
        self.commands.append(f"{line} (cached)" if cached else line)
        print(f"\n== {label}: {line}{' (cached)' if cached else ''}", flush=True)
        if cached:
            self.timings.setdefault(label, 0.0)
        elif out.exists():  # a stage killed before its marker: start it again from nothing
            shutil.rmtree(out)
        return out, key, argv, not cached

    def _cached(self, label: str, command: list[str], inputs: list[Path], tail: list[str],
                quiet: list[str] = ()) -> Path:
        """Run `alignkit *command --output DIR *tail (*quiet)` unless DIR is complete; `quiet` is left out of
        the key and of the printed command (it only silences progress bars)."""
        out, key, argv, todo = self._plan(label, command, inputs, tail)
        if todo:
            self.time(label, alignkit, [*argv, *quiet])
            (out / ".complete").write_text(key + "\n")
        return out

    def stages_at_once(self, specs: dict[str, tuple[list[str], list[Path]]], at_once: int) -> dict[str, Path]:
        """Independent training stages (label -> (command, inputs)); those not cached run `at_once` at a time,
        each in its own single-threaded `alignkit` process (its output in cache/LABEL-KEY.log, printed when it
        ends). With at_once 1 they run one after the other in this process, as stage() does."""
        if at_once <= 1:
            return {label: self.stage(label, command, inputs) for label, (command, inputs) in specs.items()}
        tail = ["--seed", str(self.seed), "--overwrite", "--no-progress"]
        plans = {label: self._plan(label, command, inputs, tail[:-1]) for label, (command, inputs) in specs.items()}
        todo = [label for label, plan in plans.items() if plan[3]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        running: list = []
        while todo or running:
            while todo and len(running) < at_once:
                label = todo.pop(0)
                out, key, argv, _ = plans[label]
                log = open(out.parent / f"{out.name}.log", "w")
                proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *argv, "--no-progress"], stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
                running.append((label, proc, log, time.perf_counter()))
            time.sleep(0.5)
            for item in [r for r in running if r[1].poll() is not None]:
                label, proc, log, t = item
                running.remove(item)
                log.close()
                self.timings[label] = self.timings.get(label, 0.0) + time.perf_counter() - t
                out, key = plans[label][:2]
                print(f"\n-- {label} (own process):\n" + Path(log.name).read_text(), end="", flush=True)
                if proc.returncode != 0:
                    for other in running:
                        other[1].kill()
                    raise SystemExit(f"error: stage {label} failed (exit {proc.returncode}); see {log.name}")
                (out / ".complete").write_text(key + "\n")
        return {label: plan[0] for label, plan in plans.items()}

    def stage(self, label: str, command: list[str], inputs: list[Path], trains: bool = True,
              seeded: bool = True) -> Path:
        """A command's output directory, run now or found in the cache (see the module doc); `seeded=False`
        for a deterministic command that takes no --seed (the key holds the seed all the same)."""
        quiet = [] if self.progress or not trains else ["--no-progress"]
        tail = ["--seed", str(self.seed), "--overwrite"] if seeded else ["--overwrite"]
        return self._cached(label, command, inputs, tail, quiet)

    def data(self, length_bias: float = DEFAULT_LENGTH_BIAS) -> Path:
        """The world's data files for these build options (built once)."""
        bias = [] if length_bias == DEFAULT_LENGTH_BIAS else ["--length-bias", str(length_bias)]
        return self._cached("data", ["world", "build", "--preset", self.budget["world"], *bias], [],
                            ["--seed", str(self.seed)])

    def sets(self, data: Path) -> dict:
        from alignkit.world.evaluate import load_eval_sets

        if data not in self._sets:
            self._sets[data] = load_eval_sets(data)
        return self._sets[data]

    def base(self) -> Path:
        """Tokenizer, initial model and pretraining on the world's corpus."""
        data = self.data()
        corpus, sft = data / "corpus.jsonl", data / "sft.jsonl"
        tokenizer = self._cached("tokenizer", ["train-tokenizer", "--data", str(corpus), "--data", str(sft),
                                               "--vocab-size", "1024"], [corpus, sft], [])
        init = self._cached("init", ["init-model", "--arch", "llama", "--size",
                                     "small" if self.preset == "small" else "tiny", "--tokenizer", str(tokenizer)],
                            [tokenizer], ["--seed", str(self.seed)])
        return self.stage("pretrain", ["pretrain", "--model", str(init), "--data", str(corpus), "--max-steps",
                                       str(self.budget["pretrain_steps"]), "--batch-size", "16", "--max-length", "128",
                                       "--lr", "2e-3", "--warmup-steps", "40"], [init, corpus])

    def sft(self) -> Path:
        base, data = self.base(), self.data()
        return self.stage("sft", ["sft", "--model", str(base), "--data", str(data / "sft.jsonl"), "--max-steps",
                                  str(self.budget["sft_steps"]), "--batch-size", "16", "--max-length", "192",
                                  "--lr", "1e-3"], [base, data / "sft.jsonl"])

    def judge_sft(self) -> Path:
        """SFT with judgement demonstrations (Yuan et al. 2024's IFT + EFT, from the base model): a policy that
        can also judge, pairwise and pointwise, through `alignkit judge`'s default templates."""
        base, data = self.base(), self.data()
        sft, eft = data / "sft.jsonl", data / "eft.jsonl"
        return self.stage("judge-sft", ["sft", "--model", str(base), "--data", str(sft), "--data", str(eft),
                                        "--max-steps", str(self.budget["judge_sft_steps"]), "--batch-size", "16",
                                        "--max-length", "256", "--lr", "1e-3"], [base, sft, eft])

    def helpful_sft(self) -> Path:
        """Helpful-only SFT (no refusals) that has seen critique/revision and harmlessness-judgement
        demonstrations on half the training harmful requests: Constitutional AI's starting point."""
        base, data = self.base(), self.data()
        helpful = data / "sft_helpful.jsonl"
        return self.stage("sft-helpful", ["sft", "--model", str(base), "--data", str(helpful), "--max-steps",
                                          str(self.budget["sft_steps"]), "--batch-size", "16", "--max-length", "256",
                                          "--lr", "1e-3"], [base, helpful])

    def derived(self, experiment: str, name: str, rows: list[dict]) -> Path:
        """A data file an experiment makes from stage outputs (DERIVED/EXPERIMENT/NAME), as a later stage's
        input: it is keyed by its content like any other input."""
        path = self.out / "derived" / experiment / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
        return path

    def reward_model(self, data: Path, ranked: Path | None = None, label: str = "reward") -> Path:
        """The proxy reward model on `data`'s annotator rankings (or another file of ranked pairs), from the SFT
        model. Whole rankings (4 prompts a batch, each answer scored once), as InstructGPT trained its reward
        model, beat singly labelled pairs at the same cost (docs/world.md); the tiny budget is 1.3 epochs of them."""
        sft, ranked = self.sft(), ranked or data / "pref_ranked.jsonl"
        return self.stage(label, ["reward", "--model", str(sft), "--data", str(ranked), "--max-steps",
                                     str(self.budget["rm_steps"]), "--group-by-prompt", "--batch-size", "4",
                                     "--max-length", "192", "--lr", "1e-3"], [sft, ranked])

    def answers(self, model_dir: Path, data: Path) -> dict:
        """Greedy answers of a model to `data`'s held-out sets (memoised)."""
        from alignkit.world.evaluate import answer_all

        if (model_dir, data) not in self._answers:
            self._answers[model_dir, data] = answer_all(model_dir, self.sets(data))
        return self._answers[model_dir, data]

    def rows_path(self, experiment: str, label: str) -> Path:
        return self.out / "rows" / experiment / f"{label}.jsonl"

    def rows(self, experiment: str, label: str) -> list[dict]:
        return [json.loads(line) for line in self.rows_path(experiment, label).read_text().splitlines()]

    def evaluate(self, experiment: str, label: str, model_dir: Path, data: Path,
                 baseline: str | tuple[str, ...] | None = None, sets: tuple[str, ...] | None = None,
                 decoding=None) -> dict:
        """The gold judge's metrics of a model on near and far held-out frames; its per-prompt rows are written
        to rows/EXPERIMENT/LABEL.jsonl (with "win_vs_B" against each baseline label B's rows when given, and "win"
        against the first). `sets`: only these held-out sets, answered on their own and without the option
        calibration (cheaper). `decoding` (alignkit.decoding.DecodingOptions): the model answers with these
        rules and in-context prefix, on the sets given (default all) and without calibration."""
        from alignkit.world.evaluate import (EVAL_SETS, answer_all, compare, option_calibration, prompt_rows, score,
                                             set_metrics)

        if decoding is not None and sets is None:
            sets = EVAL_SETS
        if sets is not None:
            chosen = {name: self.sets(data)[name] for name in sets}
            answers = self.time(f"eval {label}", answer_all, model_dir, chosen, decoding=decoding)
            rows = prompt_rows(chosen, answers)
            metrics = {d: {k: v for k, v in m.items() if v == v} for d, m in score(rows).items()}  # NaN: no such rows
        else:
            all_sets = self.sets(data)
            answers = self.time(f"eval {label}", self.answers, model_dir, data)
            if (model_dir, data) not in self._evaluations:
                done_rows = prompt_rows(all_sets, answers)
                self._evaluations[model_dir, data] = {
                    "rows": done_rows, "score": score(done_rows),
                    "calibration": self.time(f"eval {label}", option_calibration, model_dir, all_sets)}
            done = self._evaluations[model_dir, data]
            rows = [dict(r) for r in done["rows"]]
            metrics = {d: {**done["score"][d], **done["calibration"][d]} for d in ("near", "far")}
        for d in ("near", "far"):
            metrics[d] |= set_metrics([r for r in rows if r["distance"] == d])
        for i, name in enumerate((baseline,) if isinstance(baseline, str) else baseline or ()):
            compare(rows, self.rows(experiment, name), name, metrics, first=i == 0)
        path = self.rows_path(experiment, label)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for d in ("near", "far"):
            print(f"-- {label} ({d}): " + ", ".join(f"{k}={v:.3f}" for k, v in metrics[d].items()), flush=True)
        return metrics
