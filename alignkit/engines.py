"""Rollout engines: what samples completions for ppo, grpo, best-of-n, self-reward and eval.

An engine takes token-id prompts and sampling settings and returns completions (ids, whether each ended at a
stop token, and where it has them the engine's own log-prob of each sampled token); after each policy update
the trainer hands it the new weights with `load_weights`.

- `LocalEngine` (`--rollout-engine local`, the default): `alignkit.generation.sample_groups`, i.e. the
  KV-cached decoder or transformers' `generate` with the decoding rules, over a model it is given. Usually that
  model is the policy itself and `load_weights` has nothing to copy; given a separate copy (`owns_copy=True`,
  e.g. an unsharded copy of an FSDP policy) it copies the weights into it. It returns no log-probs by default:
  over the policy itself they would equal the trainer's (every importance weight 1); with `logps_temperature`
  it scores its samples with one teacher-forced forward of its own model (used to test truncated importance
  sampling with a perturbed engine).
- `VLLMEngine` (`--rollout-engine vllm`, `pip install 'alignkit[vllm]'`, CUDA only, untested by the project's
  CPU CI): a colocated in-process `vllm.LLM` per process, weights pushed in place after each update.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from alignkit.decoding import DecodingRules
from alignkit.errors import UserError

ENGINES = ("local", "vllm")


@dataclass
class EngineOptions:
    """Which engine samples the rollouts."""

    rollout_engine: Literal["local", "vllm"] = "local"
    """local: alignkit's KV-cached decoder (or transformers' generate) on the loaded model; vllm: a colocated
    in-process vLLM engine per process, in training commands refreshed with the policy's weights after each update
    (needs CUDA and pip install 'alignkit[vllm]'; not run by the project's CPU CI)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Fraction of GPU memory the colocated vLLM engine may take (weights + KV cache); the trainer gets the rest."""


@dataclass
class Samples:
    """`n` consecutive completions per prompt (rows g*n .. g*n+n-1 belong to prompt g)."""

    completion_ids: list[list[int]]
    ended: list[bool]  # stopped at a stop token or stop string rather than at max_new_tokens
    logps: list[list[float]] | None = None  # the engine's log-prob of each sampled token, where it has them


class RolloutEngine(Protocol):
    gives_logps: bool

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, rules: DecodingRules | None = None, seed: int | None = None,
                 batch_size: int = 64) -> Samples: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def check_engine(name: str) -> None:
    """One clear line, before any model is loaded, when the engine cannot run on this machine."""
    if name not in ENGINES:
        raise UserError(f"--rollout-engine must be one of {', '.join(ENGINES)} (got {name!r})")
    if name == "vllm":
        cuda, vllm = torch.cuda.is_available(), importlib.util.find_spec("vllm") is not None
        if not (cuda and vllm):
            has = {(False, False): "no CUDA device and no vllm", (False, True): "vllm but no CUDA device",
                   (True, False): "CUDA but no vllm"}[(cuda, vllm)]
            raise UserError(f"--rollout-engine vllm: needs CUDA and vllm (pip install 'alignkit[vllm]'); "
                            f"this machine has {has}")


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the full policy under transformers' names, LoRA adapters merged in for the duration
    (the key clean-up TRL's `_move_model_to_vllm` does). Lazy: an engine that copies nothing costs nothing."""
    model = getattr(model, "module", model)  # DDP
    if not hasattr(model, "peft_config"):
        yield from model.state_dict().items()
        return
    model.merge_adapter()
    try:
        prefix = model.prefix  # "lora_"
        for k, v in model.state_dict().items():
            if prefix in k or "original_module" in k:
                continue
            # a copy: unmerging afterwards works in place on these very tensors
            yield k.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.", ""), \
                v.detach().clone()
    finally:
        model.unmerge_adapter()


@torch.no_grad()
def sampled_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                  temperature: float) -> list[list[float]]:
    """log softmax(logits / temperature) of each completion token under `model`, by one teacher-forced forward."""
    from alignkit.logprobs import pack_completions, shifted_logits
    from alignkit.losses import token_logps

    if not completions:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = pack_completions(prompts, completions, pad_id, device)
    logits, labels, _ = shifted_logits(model, **batch)  # (N, T-1, V), (N, T-1)
    logps = token_logps(logits.float() / temperature, labels)  # (N, T-1)
    model.train(was_training)
    return [logps[i, len(p) - 1:len(p) - 1 + len(c)].tolist() for i, (p, c) in enumerate(zip(prompts, completions))]


class LocalEngine:
    """Today's sampling path (`alignkit.generation.sample_groups`) behind the engine interface: the same
    completions as calling it directly after `torch.manual_seed(seed)`."""

    def __init__(self, model, tokenizer, owns_copy: bool = False, logps_temperature: float | None = None):
        self.model, self.tokenizer, self.owns_copy = model, tokenizer, owns_copy
        self.logps_temperature = logps_temperature
        self.gives_logps = logps_temperature is not None

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, rules: DecodingRules | None = None, seed: int | None = None,
                 batch_size: int = 64) -> Samples:
        from alignkit.generation import sample_groups

        if seed is not None:
            torch.manual_seed(seed)
        completions, ended = sample_groups(self.model, self.tokenizer, prompts, n, max_new_tokens, temperature, top_p,
                                           batch_size, rules)
        logps = None
        if self.gives_logps:
            logps = sampled_logps(self.model, [p for p in prompts for _ in range(n)], completions,
                                  self.tokenizer.pad_token_id, self.logps_temperature)
        return Samples(completions, ended, logps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.owns_copy:  # else the engine samples from the policy itself: nothing to copy
            copy_weights(self.model, weights)


@torch.no_grad()
def copy_weights(model, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy (name, tensor) into `model`'s state dict in place, one tensor at a time (no second full copy in
    memory); every weight must be given, and no other."""
    own, seen = model.state_dict(), set()
    for name, tensor in weights:
        if name not in own:
            raise KeyError(f"load_weights: {name!r} is not a weight of the engine's model")
        own[name].copy_(tensor)
        seen.add(name)
    if seen != set(own):
        raise KeyError(f"load_weights: no value for {sorted(set(own) - seen)[:5]}")


class VLLMEngine:
    """A colocated in-process `vllm.LLM` (one per process, tensor parallel size 1, bf16), as TRL's GRPOTrainer
    in `vllm_mode="colocate"` builds it: `LLM(model=..., gpu_memory_utilization=..., dtype=..., max_model_len=...,
    seed=..., distributed_executor_backend="external_launcher" under torchrun, logprobs_mode=...)`, with
    VLLM_ENABLE_V1_MULTIPROCESSING=0 so the engine's model lives in this process.

    Weights follow TRL's `_move_model_to_vllm` (colocate mode): the full state dict (LoRA merged) is passed to
    `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)` (vLLM V1 nests the
    model runner one level deeper, under `.worker`), then `llm.reset_prefix_cache()` so no KV block computed
    with the old weights is reused.

    Sampling: `SamplingParams(n, temperature, top_p, top_k, min_p, max_tokens, stop_token_ids, stop,
    logprobs=0, seed)`; `logprobs=0` returns the sampled token's log-prob only. `logprobs_mode`
    "processed_logprobs" gives them after temperature (and top-k/top-p) scaling, "raw_logprobs" of the model's
    own distribution: the caller picks the one its trainer's log-probs use. Written to vLLM's documented API
    (0.10+); requires CUDA and is never run by the project's CPU CI."""

    gives_logps = True

    def __init__(self, model_dir: str, tokenizer, stop_ids: list[int], gpu_memory_utilization: float,
                 max_model_len: int, seed: int = 0, dtype: str = "bfloat16",
                 logprobs_mode: str = "processed_logprobs"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model must be reachable in-process
        import vllm

        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.llm = vllm.LLM(model=model_dir, tokenizer=model_dir, gpu_memory_utilization=gpu_memory_utilization,
                            dtype=dtype, max_model_len=max_model_len, seed=seed, enable_prefix_caching=True,
                            distributed_executor_backend="external_launcher" if distributed else None,
                            logprobs_mode=logprobs_mode)
        self.tokenizer, self.stop_ids = tokenizer, stop_ids

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, rules: DecodingRules | None = None, seed: int | None = None,
                 batch_size: int = 64) -> Samples:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if rules is not None and rules.changes_logits:
            raise UserError("--rollout-engine vllm: penalties, --logit-bias, --eos-boost and --no-repeat-ngram are "
                            "alignkit's decoding rules, not vLLM's; use --rollout-engine local with them")
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=(rules.top_k if rules and rules.top_k else -1),
            min_p=(rules.min_p if rules else 0.0), max_tokens=max_new_tokens, stop_token_ids=self.stop_ids,
            stop=list(rules.stop_strings) if rules else None, include_stop_str_in_output=True, logprobs=0, seed=seed,
            skip_special_tokens=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        completions, ended, logps = [], [], []
        for request in outputs:
            for out in request.outputs:
                ids = list(out.token_ids)
                completions.append(ids)
                ended.append(out.finish_reason == "stop")
                logps.append([lp[t].logprob for lp, t in zip(out.logprobs, ids)])
        return Samples(completions, ended, logps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        runner = worker.worker.model_runner if hasattr(worker, "worker") else worker.model_runner
        runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()


def build_engine(opts: EngineOptions, model, tokenizer, model_dir: str, *, max_model_len: int, seed: int = 0,
                 logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs",
                 owns_copy: bool = False) -> RolloutEngine:
    """The engine `opts.rollout_engine` names, sampling from `model` (local; `owns_copy`: a copy of the policy,
    e.g. the plain one under --fsdp, refreshed by load_weights) or from a vLLM copy of `model_dir`."""
    check_engine(opts.rollout_engine)
    if opts.rollout_engine == "vllm":
        from alignkit.models import stop_token_ids

        return VLLMEngine(model_dir, tokenizer, stop_token_ids(tokenizer, model), opts.vllm_gpu_memory_utilization,
                          max_model_len, seed, logprobs_mode=logprobs_mode)
    return LocalEngine(model, tokenizer, owns_copy=owns_copy)
