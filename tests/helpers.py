"""Helpers shared by test files (importable because pytest puts tests/ on sys.path, see pyproject)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `alignkit ...` in a fresh interpreter (for kill/resume and torchrun tests)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], env=full_env, capture_output=True,
                          text=True, **kwargs)


@contextlib.contextmanager
def one_multiprocess_run():
    """Hold the lock that lets one torchrun launch run at a time across pytest's workers: two at once
    oversubscribe the CI machine's 2 cores and race for the free ports their rendezvous picks."""
    with open(Path(tempfile.gettempdir()) / "alignkit-tests-torchrun.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def torchrun_cmd(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


def children(pid: int) -> list[int]:
    """Pids of the processes whose parent is `pid` (torchrun starts each worker in a session of its own)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def kill_all(pids, sig) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def run_torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node NPROC -m alignkit.cli ARGS`, one launch at a time; a run still going after
    `timeout` seconds fails the test with each worker's Python stacks (faulthandler, on SIGABRT)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    with one_multiprocess_run():
        proc = subprocess.Popen([*torchrun_cmd(nproc), "-m", "alignkit.cli", *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            workers = children(proc.pid)
            kill_all(workers, signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                kill_all([*workers, proc.pid], signal.SIGKILL)
                out, err = proc.communicate()
            raise AssertionError(f"torchrun {args[0]} hung for {timeout:.0f}s; stacks:\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# Message builders and a loss-mask reader for the data-layer tests.
def u(x):
    return {"role": "user", "content": x}


def a(x):
    return {"role": "assistant", "content": x}


def s(x):
    return {"role": "system", "content": x}


def spans(tokenizer, ex):
    """Decoded text of the trained-on tokens, one string per contiguous masked span."""
    out, cur = [], []
    for t, m in zip(ex.input_ids + [None], ex.loss_mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    return out


def shuffled_answer_pairs(assets, rows=slice(None), seed=0):
    """From the shipped instructions: (prompt messages, right answer, the same words shuffled) — pairs a
    preference learner can separate."""
    rng = random.Random(seed)
    for line in (Path(assets) / "instructions.jsonl").read_text().splitlines()[rows]:
        user, assistant = (m["content"] for m in json.loads(line)["messages"])
        words = shuffled = assistant.split()
        while shuffled == words:
            shuffled = rng.sample(words, len(words))
        yield ([{"role": "user", "content": user}], [{"role": "assistant", "content": assistant}],
               [{"role": "assistant", "content": " ".join(shuffled)}])


def toy_preferences(assets, path, rows=slice(None), seed=0, margin=None):
    """Separable {prompt, chosen, rejected} pairs (chosen = the right answer, rejected = its words shuffled)."""
    with Path(path).open("w") as f:
        for prompt, chosen, rejected in shuffled_answer_pairs(assets, rows, seed):
            rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(rec if margin is None else {**rec, "margin": margin}) + "\n")
    return path


def ranked_preferences(assets, path, prompts: int = 4):
    """All three pairs of a ranking of three answers per prompt: the right answer, then its words
    shuffled, then its first two words."""
    rows = []
    for seed in range(prompts):
        (prompt, right, worse), = shuffled_answer_pairs(assets, slice(seed, seed + 1), seed)
        worst = [{"role": "assistant", "content": " ".join(right[0]["content"].split()[:2])}]
        rows += [{"prompt": prompt, "chosen": c, "rejected": r} for c, r in ((right, worse), (right, worst), (worse, worst))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class PerturbedEngine:
    """A rollout engine that samples from its own copy of the policy with noise added to every weight after
    each refresh (as a bf16 inference engine differs from an fp32 trainer), and returns that copy's log-probs."""

    def __init__(self, model_dir, tokenizer, noise: float, logps_temperature: float = 1.0):
        import torch

        from alignkit.engines import LocalEngine
        from alignkit.models import load_causal_lm

        self.inner = LocalEngine(load_causal_lm(model_dir), tokenizer, owns_copy=True, logps_temperature=logps_temperature)
        self.noise, self.gives_logps, self.seen = noise, True, []
        self.gen = torch.Generator().manual_seed(0)

    def load_weights(self, weights):
        import torch

        self.inner.load_weights(weights)
        with torch.no_grad():
            for p in self.inner.model.parameters():
                p.add_(torch.randn(p.shape, generator=self.gen) * self.noise * p.std())

    def generate(self, *args, **kwargs):
        out = self.inner.generate(*args, **kwargs)
        self.seen.append(out)
        return out


def make_reward_model(policy_dir, out, scale=1.0, nan=False):
    """Toy RM: the policy's own backbone plus a score head along a random direction u, so the score is
    ~ u . (final hidden state at the last token), which depends mostly on the last token's identity
    (std 1 over the vocabulary): easy to raise by favouring high-scoring final tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    cfg = AutoConfig.from_pretrained(policy_dir)
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    rm = AutoModelForSequenceClassification.from_config(cfg)
    rm.model.load_state_dict(AutoModelForCausalLM.from_pretrained(policy_dir).model.state_dict())
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, t] for t in range(cfg.vocab_size)])
        hidden = rm.model(ids).last_hidden_state[:, -1]  # (V, d)
        u = torch.randn(hidden.shape[1], generator=torch.Generator().manual_seed(1))
        rm.score.weight.copy_(float("nan") if nan else scale * u[None] / (hidden @ u).std())
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out
