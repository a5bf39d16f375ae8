"""The plumbing every recipe shares, so that a recipe file holds only its algorithm and its loop:
processes and device, resolved config, metrics.jsonl, progress bar, checkpoints + resume, graceful
stop on SIGTERM/SIGINT, non-finite loss policy, final save. No control flow is hidden here: the
recipe calls `begin`, then per step `check`, `log`, `end_step`, then `finish`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from alignkit import lora
from alignkit.config import save_config
from alignkit.models import save_model
from alignkit.train import checkpoint, dist as distributed
from alignkit.train.tracking import GracefulStop, MetricsWriter, Throughput, progress


class Run:
    def __init__(self, cfg, name: str):
        self.cfg, self.name = cfg, name
        self.dist = distributed.setup(cfg.device)
        self.device = self.dist.device
        torch.manual_seed(cfg.seed)
        self.checkpoint: Path | None = checkpoint.latest_checkpoint(cfg.output) if cfg.resume else None
        self.skipped_steps = 0
        self.speed = Throughput()
        self._stop = GracefulStop()

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def begin(self, model, tokenizer, optimizer, total_steps: int) -> int:
        """Restore optimizer and RNG state when resuming, write config.yaml, open metrics.jsonl and the
        progress bar. Returns the first step to run. `model` is what gets checkpointed and saved
        (the unwrapped model, PEFT-wrapped when training LoRA adapters)."""
        self.model, self.tokenizer, self.optimizer, self.total_steps = model, tokenizer, optimizer, total_steps
        start = checkpoint.load_checkpoint(self.checkpoint, optimizer)["step"] if self.checkpoint else 0
        self.state = checkpoint.load_state(self.checkpoint) if self.checkpoint else {}
        if self.is_main:
            save_config(self.cfg, self.cfg.output)
            if self.checkpoint:
                print(f"resuming from {self.checkpoint} (step {start})")
        self.metrics = MetricsWriter(self.cfg.output, self.is_main, resume_step=start if self.checkpoint else None)
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
        self.bar.update(1)
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            # tokens since the previous row and seconds since the start, so throughput can be read
            # after a warm-up (alignkit bench)
            self.metrics.log({"step": step, **row, "tokens": self.speed.tokens, "tokens_per_s": self.speed.rate(),
                              "elapsed": self.speed.elapsed()})

    def end_step(self, step: int, state: dict | None = None, save_extra=None) -> None:
        """Checkpoint when due (every --save-every steps, at the end, or on SIGTERM/SIGINT) and exit
        after a signal. `state` is JSON the recipe needs to resume (e.g. an adaptive KL coefficient);
        `save_extra(dir)` writes other trained modules into the checkpoint directory (e.g. a value model)."""
        done = step == self.total_steps
        if self._stop.requested or (self.cfg.save_every and step % self.cfg.save_every == 0) or done:
            if self.is_main:
                checkpoint.save_checkpoint(self.cfg.output, step, self.model, self.tokenizer, self.optimizer,
                                           extra=state, keep=self.cfg.save_total_limit, save_extra=save_extra)
            self.dist.barrier()
        if self._stop.requested and not done:
            self.bar.close()
            raise SystemExit(f"stopped at step {step}; continue with --resume")

    def finish(self, final: dict) -> dict:
        """Write the final metrics row and the model (merged LoRA weights with --merge-lora)."""
        self._stop.__exit__(None, None, None)
        self.bar.close()
        final = {"step": self.total_steps, "final": True, **final, "seconds": self.speed.elapsed(),
                 "skipped_nonfinite_steps": self.skipped_steps}
        self.metrics.log(final)
        if self.is_main:
            model = lora.merged(self.model) if getattr(self.cfg, "merge_lora", False) else self.model
            save_model(model, self.tokenizer, self.cfg.output)
        distributed.teardown()
        return final
