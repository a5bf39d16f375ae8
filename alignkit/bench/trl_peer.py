"""TRL peer for `alignkit bench`: TRL's SFT (padded), DPO or GRPO trainer on the benchmark fixture.

Usage: PEER_PYTHON trl_peer.py TASK FIXTURE STEPS [OUTDIR [JOB_JSON]]

JOB_JSON (from `alignkit bench`'s JOBS) sets batch/max_length/lr (sft, dpo) or prompts/group/new_tokens/lr
(grpo) and gradient_checkpointing; without it the tiny fixture's job runs. "precompute_ref": true (dpo, by
hand only) has DPOTrainer compute the reference log-probs before training instead of keeping a reference copy
of the model, as alignkit's DPO does: a like-for-like memory row (its steps then exclude the reference pass,
which `alignkit bench` charges to alignkit's, so not a throughput row).

Standalone on purpose (torch, transformers, datasets and trl only): the peer virtualenv does not have
alignkit. Same hyper-parameters and reward as the workspace baselines shared/bench/trl_{sft,dpo,grpo}.py,
with TRL's best CPU settings (fp32; gradient checkpointing only when the job asks for it). Prints one JSON line: per-step end times
(seconds since the script started) and TRL's cumulative `num_tokens` after each step, so the caller
can measure throughput over the steps after a warm-up.
"""

import json
import re
import sys
import tempfile
import time

T0 = time.perf_counter()

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402


def correct(completions, answer, **kw):
    """The peer's reward: 1.0 if the last integer in the completion equals the answer."""
    out = []
    for c, a in zip(completions, answer):
        text = c[0]["content"] if isinstance(c, list) else c
        nums = re.findall(r"-?\d+", text)
        out.append(1.0 if nums and nums[-1] == a else 0.0)
    return out


class StepTimes(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - T0)


TINY = {"sft": dict(batch=8, max_length=512, lr=3e-4), "dpo": dict(batch=8, max_length=512, lr=5e-5),
        "grpo": dict(prompts=2, group=8, new_tokens=64, lr=1e-5)}


def make_trainer(task, fx, steps, out, job=None):
    if task not in TINY:
        raise SystemExit(f"error: trl_peer.py: unknown task {task!r} (sft, dpo or grpo)")
    job = job or TINY[task]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(f"{fx}/model")
    model = AutoModelForCausalLM.from_pretrained(f"{fx}/model", dtype=torch.float32)
    # logging_steps=1: TRL's cumulative num_tokens then lands in the log history after every step.
    checkpointing = bool(job.get("gradient_checkpointing", False))
    common = dict(output_dir=out, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
                  use_cpu=True, bf16=False, gradient_checkpointing=checkpointing, seed=0, disable_tqdm=True,
                  learning_rate=job["lr"])
    if checkpointing:
        common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if task == "sft":
        ds = load(fx, "sft.jsonl")
        cfg = trl.SFTConfig(max_length=job["max_length"], per_device_train_batch_size=job["batch"], packing=False,
                            padding_free=False, assistant_only_loss=True, dataloader_num_workers=0, **common)
        return trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    if task == "dpo":
        ds = load(fx, "pref.jsonl")
        cfg = trl.DPOConfig(max_length=job["max_length"], per_device_train_batch_size=job["batch"], beta=0.1,
                            precompute_ref_log_probs=bool(job.get("precompute_ref", False)),
                            dataloader_num_workers=0, **common)
        return trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    G, P = job["group"], job["prompts"]
    ds = load(fx, "prompts.jsonl")
    cfg = trl.GRPOConfig(per_device_train_batch_size=G * P, num_generations=G, max_completion_length=job["new_tokens"],
                         beta=0.0, **common)
    return trl.GRPOTrainer(model=model, args=cfg, train_dataset=ds, reward_funcs=correct, processing_class=tok)


def load(fx, name):
    return datasets.load_dataset("json", data_files=f"{fx}/{name}", split="train")


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    task, fx, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = sys.argv[4] if len(sys.argv) > 4 else tempfile.mkdtemp(prefix=f"trl_{task}_")
    job = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    tr = make_trainer(task, fx, steps, out, job)
    tr.remove_callback(PrinterCallback)  # with tqdm off it would print every log dict
    clock = StepTimes()
    tr.add_callback(clock)
    start = time.perf_counter() - T0
    tr.train()
    num_tokens = {h["step"]: h["num_tokens"] for h in tr.state.log_history if "num_tokens" in h and "step" in h}
    print(json.dumps({"task": task, "steps": steps, "train_start": start, "step_end": clock.times,
                      "num_tokens": [num_tokens.get(s) for s in range(1, len(clock.times) + 1)],
                      "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                   "torch": torch.__version__, "datasets": datasets.__version__},
                      "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
