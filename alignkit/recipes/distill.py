"""alignkit distill: token-level knowledge distillation from a frozen teacher, off- and on-policy (GKD).

At every trained position the student's next-token distribution over the whole vocabulary is pulled
toward the teacher's (not only toward the data's one token): `--loss forward_kl` is classic KD,
KL(teacher || student) (Hinton et al. 2015); `reverse_kl` is KL(student || teacher), mode seeking
(MiniLLM, Gu et al. 2024); `jsd` is GKD's generalised Jensen-Shannon divergence with teacher weight
`--beta` (Agarwal et al. 2024). Both distributions are softmax(logits / --temperature); the loss is not
rescaled by temperature^2 (Hinton et al. do that only to balance soft and hard targets; there is no hard
target here, as in TRL's GKDTrainer).

Off-policy steps train on the data's responses (any SFT format, the loss on their loss_mask tokens, as
`alignkit sft`). On-policy steps (GKD) replace each example's last response by the student's own sample
for the same context (`--max-new-tokens`, `--sampling-temperature`), scored by teacher and student on the
sampled tokens. Which steps are on-policy: a coin per optimizer step, heads with probability
`--on-policy-fraction`, seeded by (--seed, step) alone, so a resumed run and every DDP process flip the
same coins; the samples are seeded by (seed, step, micro-batch position) as in `alignkit grpo`.

The teacher is frozen (eval, no gradients) on the student's device and must share the student's
tokenizer (vocabulary and special tokens; checked). Sequence-level distillation (the teacher generates,
the student is SFT-trained on it; Kim & Rush 2016) needs no command of its own: `alignkit generate
--model TEACHER --data prompts.jsonl --output teacher.jsonl`, then `alignkit sft --data teacher.jsonl`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch

from alignkit import lora
from alignkit.config import TrainConfig
from alignkit.data import Example, load_sft
from alignkit.errors import UserError
from alignkit.generation import generate
from alignkit.logprobs import shifted_logits
from alignkit.losses import aggregate, forward_kl, generalized_jsd, masked_sum, reverse_kl
from alignkit.models import ModelDirError, load_causal_lm, load_tokenizer, prepare
from alignkit.recipes.grpo import sample_seed
from alignkit.train import parallel
from alignkit.train.batching import StepPlan, collate, epoch_batches
from alignkit.train.optim import adamw
from alignkit.train.run import Run
from alignkit.train.step import accumulate, optimizer_step, schedule_lr


@dataclass
class DistillConfig(TrainConfig):
    """Token-level distillation of a teacher into --model on SFT data, optionally on the student's own samples (GKD)."""

    teacher: str = ""
    """Teacher model directory (or a LoRA run's adapter directory); frozen. It must share --model's tokenizer."""
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """forward_kl = KL(teacher || student), classic KD (Hinton 2015); reverse_kl = KL(student || teacher) (MiniLLM, Gu 2024); jsd = GKD's generalised JSD (Agarwal 2024)."""
    beta: float = 0.5
    """jsd only: the teacher's weight in [0, 1] (TRL's convention); 0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD."""
    temperature: float = 1.0
    """Softmax temperature of both teacher and student in the loss (> 0; higher = softer targets)."""
    on_policy_fraction: float = 0.0
    """Share of optimizer steps trained on the student's own samples instead of the data's responses (GKD's lambda), a seeded coin per step."""
    max_new_tokens: int = 64
    """On-policy steps: longest sampled response in tokens (and prompt + response at most --max-length)."""
    sampling_temperature: float = 1.0
    """On-policy steps: the student's sampling temperature (0 = greedy)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    group_by_length: bool = True
    """Batch sequences of similar length together (less padding, same expected gradient)."""


# A micro-batch: its sequences and their loss masks (1 = the token is trained on, as a label).
Batch = tuple[list[list[int]], list[list[int]]]


def check_config(cfg: DistillConfig) -> None:
    if not cfg.teacher:
        raise UserError("--teacher is required (the teacher's model directory)")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature must be > 0 (it divides the logits; got {cfg.temperature})")
    if cfg.beta > 1:
        raise UserError(f"--beta must be between 0 and 1 (the teacher's weight in the JSD; got {cfg.beta})")


def load_teacher_tokenizer(cfg: DistillConfig):
    try:
        return load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    except ModelDirError as e:
        raise UserError(f"--teacher: {e}") from None


def tokenizer_difference(student, teacher) -> str | None:
    """The first difference between two tokenizers' special tokens or vocabularies (by id), or None."""
    s_special, t_special = student.special_tokens_map, teacher.special_tokens_map
    for name in sorted(set(s_special) | set(t_special)):
        if s_special.get(name) != t_special.get(name):
            return f"{name} is {s_special.get(name)!r} in --model's, {t_special.get(name)!r} in --teacher's"
    s_ids = {i: t for t, i in student.get_vocab().items()}
    t_ids = {i: t for t, i in teacher.get_vocab().items()}
    for i in sorted(set(s_ids) | set(t_ids)):
        if s_ids.get(i) != t_ids.get(i):
            return f"token id {i} is {s_ids.get(i)!r} in --model's, {t_ids.get(i)!r} in --teacher's"
    return None


def check_same_tokenizer(cfg: DistillConfig, tokenizer, teacher_tokenizer) -> None:
    """Token-level distillation compares distributions over one vocabulary, id by id."""
    difference = tokenizer_difference(tokenizer, teacher_tokenizer)
    if difference:
        raise UserError(f"--teacher {cfg.teacher} and --model {cfg.model} have different tokenizers: {difference}; "
                        "token-level distillation needs one shared vocabulary (for another tokenizer, distil at the "
                        "sequence level: alignkit generate with the teacher, then alignkit sft)")


def check_vocab_rows(model, n_vocab: int, flag: str, path: str) -> None:
    """A model scores every token of the tokenizer: at least one output row per token."""
    if model.config.vocab_size < n_vocab:
        raise UserError(f"{flag} {path} has {model.config.vocab_size} embedding rows for a tokenizer of {n_vocab} "
                        "tokens")


def load_teacher(cfg: DistillConfig, device, n_vocab: int):
    try:
        teacher = load_causal_lm(cfg.teacher, cfg.dtype, cfg.trust_remote_code, device)
    except ModelDirError as e:
        raise UserError(f"--teacher: {e}") from None
    check_vocab_rows(teacher, n_vocab, "--teacher", cfg.teacher)
    return prepare(teacher, cfg).eval().requires_grad_(False)


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (0-based) trains on the student's samples: a coin with P(heads) = fraction,
    seeded by (seed, step) alone (the same on every process and after --resume)."""
    return random.Random(seed * 1_000_003 + step).random() < fraction


def prompt_of(ex: Example) -> list[int]:
    """The context of the example's last response: the tokens before its last trained span (the last
    assistant turn, after earlier turns as they are in the data). At least one token, so that an example
    trained from its first token still has something to continue."""
    start = len(ex.loss_mask)
    while start > 0 and not ex.loss_mask[start - 1]:  # untrained tokens after the last response
        start -= 1
    while start > 0 and ex.loss_mask[start - 1]:
        start -= 1
    return ex.input_ids[:max(start, 1)]


def data_batches(examples: list[Example], micro_batches: list[list[int]]) -> list[Batch]:
    return [([examples[i].input_ids for i in idx], [examples[i].loss_mask for i in idx]) for idx in micro_batches]


def sampled_batches(cfg: DistillConfig, run: Run, model, tokenizer, examples: list[Example],
                    micro_batches: list[list[int]], step: int) -> list[Batch]:
    """The micro-batches with each response replaced by the student's sample for its context, trained on the
    sampled tokens (the stop token included). `generate` runs the model in eval mode without gradients and
    puts it back in training mode."""
    out = []
    for k, idx in enumerate(micro_batches):
        prompts = [prompt_of(examples[i]) for i in idx]
        torch.manual_seed(sample_seed(cfg.seed, step, run.dist.rank + k * run.world_size))
        completions = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.sampling_temperature)
        completions = [c[:cfg.max_length - len(p)] for p, c in zip(prompts, completions)]
        out.append(([p + c for p, c in zip(prompts, completions)],
                    [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]))
    return out


def divergence(cfg: DistillConfig, logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    if cfg.loss == "forward_kl":
        return forward_kl(logps, teacher_logps)
    if cfg.loss == "reverse_kl":
        return reverse_kl(logps, teacher_logps)
    return generalized_jsd(logps, teacher_logps, cfg.beta)


def train_micro_batch(cfg: DistillConfig, ddp_model, teacher, batch: Batch, n_tokens: float, world_size: int,
                      pad_id: int, n_vocab: int, device) -> dict[str, float]:
    """Forward (student and teacher) and backward of one micro-batch; token mean over the whole global batch
    (global denominator `n_tokens`, times world_size for DDP's gradient average, as in `alignkit sft`).
    Returns the micro-batch's share of the step loss and its summed forward KL at temperature 1."""
    inputs = collate(*batch, pad_id, device)
    logits, _, mask = shifted_logits(ddp_model, **inputs)  # (B, T-1, V), (B, T-1)
    with torch.no_grad():
        teacher_logits = shifted_logits(teacher, **inputs)[0]  # (B, T-1, V')
    # Models may have more embedding rows than the tokenizer has tokens (padded for speed, or another model
    # of the same tokenizer); those rows are no tokens, so both distributions are over the tokenizer's ids.
    logits, teacher_logits = logits[..., :n_vocab], teacher_logits[..., :n_vocab]
    logps = (logits / cfg.temperature).log_softmax(-1)  # (B, T-1, V)
    teacher_logps = (teacher_logits / cfg.temperature).log_softmax(-1)  # (B, T-1, V)
    loss = aggregate(divergence(cfg, logps, teacher_logps), mask, "token_mean", denominator=n_tokens) * world_size
    loss.backward()
    with torch.no_grad():  # the same yardstick whatever --loss and --temperature train with
        kl = forward_kl(logits.log_softmax(-1), teacher_logits.log_softmax(-1))  # (B, T-1)
    return {"loss": loss.item(), "kl": masked_sum(kl, mask).item()}


def main(cfg: DistillConfig) -> dict:
    check_config(cfg)
    run = Run(cfg, "distill")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    check_same_tokenizer(cfg, tokenizer, load_teacher_tokenizer(cfg))
    n_vocab = len(tokenizer)
    examples, stats = load_sft(list(cfg.data), tokenizer, cfg.max_length, strict=cfg.strict)
    if run.is_main:
        stats.warn()
    lengths = [len(ex.input_ids) for ex in examples]

    # on-policy steps sample from a full copy on every process, so only off-policy runs build on the meta device
    model = lora.load_trainable(cfg, run.checkpoint, run.device,
                                meta=parallel.builds_on_meta(run, cfg) and cfg.on_policy_fraction == 0)
    check_vocab_rows(model, n_vocab, "--model", cfg.model)
    model.train()
    teacher = load_teacher(cfg, run.device, n_vocab)
    gen_model = parallel.generation_copy(model, cfg) if cfg.on_policy_fraction > 0 else model
    ddp_model = parallel.wrap(model, run, cfg)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    plan = StepPlan(epoch_batches(lengths, cfg.batch_size, cfg.seed, cfg.group_by_length), cfg.grad_accum,
                    run.world_size)
    total_steps = plan.total_steps(cfg.max_steps, cfg.epochs)
    start_step = run.begin(model, tokenizer, optimizer, total_steps, totals=("tokens", "on_policy_steps"))

    for step in range(start_step, total_steps):
        lr = schedule_lr(run, optimizer, step, cfg.schedule)
        on_policy = is_on_policy(cfg.seed, step, cfg.on_policy_fraction)
        micro_batches = plan.micro_batches(step, run.dist.rank)
        if on_policy:
            parallel.refresh(gen_model, model)
        batches = (sampled_batches(cfg, run, gen_model, tokenizer, examples, micro_batches, step) if on_policy
                   else data_batches(examples, micro_batches))
        # Counted over every process before any backward: every micro-batch divides by the same number.
        counts = run.dist.reduce_sums({"label_tokens": sum(sum(m[1:]) for _, ms in batches for m in ms),
                                       "tokens": sum(len(s) for seqs, _ in batches for s in seqs)})
        n_tokens = int(counts["label_tokens"])
        sums = accumulate(ddp_model, batches, lambda b: train_micro_batch(
            cfg, ddp_model, teacher, b, n_tokens, run.world_size, tokenizer.pad_token_id, n_vocab, run.device))
        totals = run.dist.reduce_sums(sums)
        step_loss = totals["loss"] / run.world_size
        detail = f" ({'on-policy samples for ' if on_policy else ''}examples {plan.all_micro_batches(step)})"
        grad_norm = optimizer_step(run, model, optimizer, step_loss, step + 1, detail)
        step_tokens = int(counts["tokens"])
        run.count(tokens=step_tokens, on_policy_steps=int(on_policy))
        run.log(step + 1, {"epoch": (step + 1) / plan.steps_per_epoch, "loss": step_loss,
                           "kl_teacher_student": totals["kl"] / max(n_tokens, 1), "on_policy": int(on_policy),
                           "lr": lr, "grad_norm": grad_norm, "label_tokens": n_tokens}, tokens=step_tokens)
        run.end_step(step + 1)
    return run.finish({"examples": len(examples), "truncated": stats.truncated, "dropped": stats.dropped,
                       "skipped_batches_per_epoch": plan.skipped_per_epoch})
