"""The plumbing every recipe shares, so that a recipe file holds only its algorithm and its loop:
processes and device, the output directory (locked, never mixed with another run), resolved config,
metrics.jsonl, progress bar, checkpoints + resume, graceful stop on SIGTERM/SIGINT, non-finite loss
policy, final save. No control flow is hidden here: the recipe calls `begin`, then per step `check`,
`log`, `end_step`, then `finish`.
"""

from __future__ import annotations

import fcntl
import math
import os
import sys
from pathlib import Path

import torch
import yaml

from alignkit import lora
from alignkit.config import RUN_ONLY_FIELDS, save_config, to_dict
from alignkit.errors import UserError, writing
from alignkit.models import save_model
from alignkit.train import checkpoint, dist as distributed, parallel
from alignkit.train.tracking import GracefulStop, MetricsWriter, Throughput, check_tracker, open_tracker, progress

# Lock files of the outputs this process holds, and its open tracker, closed when its command ends however it ends.
_held: list = []


def release_outputs() -> None:
    while _held:
        _held.pop().close()


def lock_output(out: Path):
    """An exclusive lock on OUTPUT/.lock (an open file, freed when closed or when the process dies),
    or None if another process holds it."""
    with writing(out, "--output"):
        f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held.append(f)
    return f


class Run:
    def __init__(self, cfg, name: str):
        """Set up processes and device, and check --output before any model is loaded: writable, not
        in use, and holding no other run unless --resume (same settings and data) or --overwrite."""
        self.cfg, self.name = cfg, name
        if cfg.resume and cfg.overwrite:
            raise UserError("--resume and --overwrite exclude each other: continue the run in --output, or replace it")
        check_tracker(cfg.report_to)
        self.dist = distributed.setup(cfg.device, getattr(cfg, "fsdp", False))
        self.device = self.dist.device
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.output)
        self.fingerprint = checkpoint.fingerprint(cfg, self.world_size)
        self._lock = None
        if self.is_main:
            checkpoint.probe_writable(self.out)
        if self.dist.any(self.is_main and self.out.is_dir()):
            self._claim()
        self.checkpoint: Path | None = checkpoint.latest_checkpoint(cfg.output) if cfg.resume else None
        if self.checkpoint:
            self._check_resumable(self.checkpoint)
        elif cfg.resume and (self.out / "config.yaml").is_file():
            self._check_config_yaml(self.out / "config.yaml")
        self.skipped_steps = 0
        self.speed = Throughput()
        self._stop = GracefulStop()

    def _claim(self, fresh: bool = False) -> None:
        """Lock OUTPUT, then refuse another run's files in it, or delete them with --overwrite, and
        remove checkpoints half-written by a run that died while saving. `fresh`: OUTPUT was created
        by this run a moment ago, so any run in it started meanwhile."""
        if self.is_main:
            self._lock = lock_output(self.out)
        if self.dist.any(self.is_main and self._lock is None):
            release_outputs()
            raise UserError(f"--output {self.out} is in use by another alignkit run; wait for it to finish "
                            "or choose another --output")
        found = checkpoint.run_files(self.out)
        if found and not self.cfg.overwrite and (fresh or not self.cfg.resume):
            release_outputs()
            raise UserError(f"--output {self.out} already holds a run or model ({', '.join(found)}); "
                            "continue it with --resume, replace it with --overwrite, or choose another --output")
        if self.is_main:
            with writing(self.out, "--output"):
                if found and self.cfg.overwrite:
                    checkpoint.clear_run(self.out)
                    print(f"--overwrite: deleted the previous run in {self.out}")
                for stale in checkpoint.remove_stale_temps(self.out):
                    print(f"removed {stale}: a checkpoint left half-written by an earlier run")
        self.dist.barrier()

    def _check_resumable(self, path: Path) -> None:
        """--resume continues the same run only: the checkpoint's settings and data must be these."""
        saved = checkpoint.load_fingerprint(path)
        if saved is None:
            if self.is_main:
                print(f"warning: {path} does not record the settings it was trained with; cannot check that "
                      "--resume continues the same run", file=sys.stderr)
            return
        differences = checkpoint.fingerprint_differences(saved, self.fingerprint)
        if differences:
            release_outputs()
            raise UserError(f"--resume: {path} was trained with other settings or data: {'; '.join(differences)}. "
                            "Resume with the same ones, or start over with --overwrite or another --output")

    def _check_config_yaml(self, path: Path) -> None:
        """--resume of a run that died before its first checkpoint restarts it, with its own settings only."""
        saved = yaml.safe_load(path.read_text()) or {}
        current = {k: v for k, v in to_dict(self.cfg).items() if k not in RUN_ONLY_FIELDS}
        differences = [f"{k} {saved[k]} -> {v}" for k, v in current.items() if k in saved and saved[k] != v]
        if differences:
            release_outputs()
            raise UserError(f"--resume: {path} has other settings: {'; '.join(differences)}. Resume with the same "
                            "ones, or start over with --overwrite or another --output")

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def begin(self, model, tokenizer, optimizer, total_steps: int, totals: tuple[str, ...] = ("tokens",),
              trained=None) -> int:
        """Restore optimizer and RNG state when resuming, write config.yaml, open metrics.jsonl and the
        progress bar. Returns the first step to run. `model` is what gets checkpointed and saved
        (the unwrapped model, PEFT-wrapped when training LoRA adapters). `trained`: the module whose
        parameters `optimizer` updates when it holds more than `model` (PPO's actor-critic); under --fsdp its
        sharded state is what checkpoints hold. `totals` names the whole run's counts (`count`), which
        checkpoints carry across --resume and the final row reports."""
        self.model, self.tokenizer, self.optimizer, self.total_steps = model, tokenizer, optimizer, total_steps
        self.trained = trained if trained is not None else model
        if not self.dist.any(self._lock is not None):  # OUTPUT did not exist when the run started
            if self.is_main:
                with writing(self.out, "--output"):
                    self.out.mkdir(parents=True, exist_ok=True)
            self.dist.barrier()
            self._claim(fresh=True)
        sharded = self.trained if parallel.is_sharded(self.trained) else None
        start = checkpoint.load_checkpoint(self.checkpoint, optimizer, sharded)["step"] if self.checkpoint else 0
        self.state = checkpoint.load_state(self.checkpoint) if self.checkpoint else {}
        self.totals = {name: self.state.get(name, 0) for name in totals}
        self._totals_at_start = dict(self.totals)
        resume_step = start if self.checkpoint else None
        tracker, failure = None, None
        if self.is_main:
            try:
                tracker = open_tracker(self.cfg.report_to, self.out, to_dict(self.cfg), resume_step)
            except UserError as e:
                failure = str(e)
            if tracker is not None:
                _held.append(tracker)
        if self.dist.any(failure is not None):  # every process stops, not only the one that saw the error
            release_outputs()
            raise UserError(failure or f"--report-to {self.cfg.report_to}: the tracker did not start on process 0")
        if self.is_main:
            with writing(self.out / "config.yaml", "config"):
                save_config(self.cfg, self.cfg.output, self.name)
            if self.checkpoint:
                print(f"resuming from {self.checkpoint} (step {start})")
        self.metrics = MetricsWriter(self.cfg.output, self.is_main, resume_step=resume_step, tracker=tracker)
        self.bar = progress(total_steps, start, self.cfg.progress and self.is_main, self.name)
        self._stop.__enter__()
        return start

    def check(self, loss: float, step: int, detail: str = "") -> bool:
        """True if the step's loss is finite. A NaN/inf stops the run before it reaches saved weights,
        or, with --skip-nonfinite, the caller drops the step's gradients and goes on (counted)."""
        if math.isfinite(loss):
            return True
        if self.cfg.skip_nonfinite:
            self.skipped_steps += 1
            print(f"warning: non-finite loss {loss} at step {step}{detail}; step skipped (--skip-nonfinite)")
            return False
        raise SystemExit(f"error: loss is {loss} at step {step}{detail}; stopping before the model is corrupted "
                         "(lower --lr, check the data, resume from the last checkpoint, or pass --skip-nonfinite)")

    def log(self, step: int, row: dict, tokens: int = 0) -> None:
        """Count `tokens` processed in this step; write a metrics row every --log-every steps."""
        self.speed.add(tokens)
        if "loss" in row:  # before update, so a plain progress line shows this step's loss
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        self.bar.update(1)
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            # tokens since the previous row and seconds since the start, so throughput can be read
            # after a warm-up (alignkit bench)
            self.metrics.log({"step": step, **row, "tokens": self.speed.tokens, "tokens_per_s": self.speed.rate(),
                              "elapsed": self.speed.elapsed()})

    def count(self, **amounts) -> None:
        """Add this step's amounts (e.g. pairs=8, tokens=512) to the run's totals."""
        for name, amount in amounts.items():
            self.totals[name] += amount

    def counted_this_launch(self, name: str):
        """How much of total `name` this launch counted (the whole run's total less what a resumed checkpoint held)."""
        return self.totals[name] - self._totals_at_start[name]

    def end_step(self, step: int, state: dict | None = None, save_extra=None) -> None:
        """Checkpoint when due (every --save-every steps, at the end, or on SIGTERM/SIGINT) and exit
        after a signal. `state` is JSON the recipe needs to resume (e.g. an adaptive KL coefficient);
        `save_extra(dir)` writes other trained modules into the checkpoint directory (e.g. a value model)."""
        done = step == self.total_steps
        # Every process stops at the same step, whichever of them got the signal.
        stop = self.dist.any(self._stop.requested)
        if stop or (self.cfg.save_every and step % self.cfg.save_every == 0) or done:
            if parallel.is_sharded(self.trained):  # every process writes its shards
                checkpoint.save_sharded_checkpoint(self.cfg.output, step, self.model, self.tokenizer, self.optimizer,
                                                   self.dist, extra={**self.totals, **(state or {})},
                                                   keep=self.cfg.save_total_limit, save_extra=save_extra,
                                                   run=self.fingerprint, trained=self.trained)
            elif self.is_main:
                checkpoint.save_checkpoint(self.cfg.output, step, self.model, self.tokenizer, self.optimizer,
                                           extra={**self.totals, **(state or {})}, keep=self.cfg.save_total_limit,
                                           save_extra=save_extra,
                                           run=self.fingerprint)
            self.dist.barrier()
        if stop and not done:
            self._stop.__exit__(None, None, None)
            self.bar.close()
            print(f"stopped at step {step}; continue with --resume", file=sys.stderr)
            release_outputs()
            raise SystemExit(0)  # a requested stop that saved its checkpoint is not a failure

    def finish(self, final: dict) -> dict:
        """Write the final metrics row and the model (merged LoRA weights with --merge-lora)."""
        self._stop.__exit__(None, None, None)
        self.bar.close()
        final = {"step": self.total_steps, "final": True, **self.totals, **final, "seconds": self.speed.elapsed(),
                 "skipped_nonfinite_steps": self.skipped_steps}
        self.metrics.log(final)
        merge = getattr(self.cfg, "merge_lora", False)
        if parallel.is_sharded(self.model):  # the full weights, gathered to process 0
            # training is over: drop gradients and optimizer state so the gathered copy does not add to them
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.state.clear()
            if merge and lora.is_peft(self.model):  # peft merges a plain model: rebuild one on the CPU
                state = parallel.full_state_dict(self.model)
                if self.is_main:
                    model = lora.load_trainable(self.cfg, None, torch.device("cpu"))
                    model.load_state_dict(state)
                    with writing(self.out, "the model to"):
                        save_model(lora.merged(model), self.tokenizer, self.cfg.output)
                del state
            else:
                parallel.save_sharded(self.model, self.tokenizer, self.out, self.is_main)
        elif self.is_main:
            model = lora.merged(self.model) if merge else self.model
            with writing(self.out, "the model to"):
                save_model(model, self.tokenizer, self.cfg.output)
        self.dist.barrier()
        release_outputs()
        return final
