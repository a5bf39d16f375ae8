"""Rewards for online RL (GRPO) and rejection sampling (best-of-n): user reward functions, built-in
verifiable rewards, and a reward-model scorer.

Reward-function convention (the same as TRL's GRPOTrainer, so functions written for TRL carry over):

    def my_reward(prompts, completions, **kwargs) -> list[float | None]

* ``prompts``: the prompt field of each sample as written in the data file: a string, or a list of
  messages for conversational data. Repeated once per completion (G times per prompt in GRPO).
* ``completions``: the decoded completions (special tokens skipped). For conversational prompts each
  is ``[{"role": "assistant", "content": text}]``, for string prompts the text itself (exactly TRL).
* ``kwargs``: every other column of the data file (e.g. ``answer``) as a list aligned with
  ``completions``; ``completion_ids`` (token id lists, incl. the stop token when one was produced);
  ``prompt_ids``; ``trainer_state`` (an object with ``global_step`` and ``max_steps``). Functions with
  ``**kwargs`` receive all of them; functions without it receive only the arguments they name.
* Return one value per completion. ``None`` means "not applicable" (TRL): that function then adds
  nothing to that sample's total (a sample where every function returns None gets 0, with a warning).

`score_completions` calls each function, checks what it returned, and reports a failure with the
function's name and the offending sample (prompt, completion, columns); a call that does not return
within --reward-timeout seconds is such a failure too, so a hanging reward function stops the run
instead of hanging it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import numbers
import re
import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

# ----------------------------------------------------------------------------------------------
# Loading user functions
# ----------------------------------------------------------------------------------------------


def load_reward_function(spec: str) -> Callable:
    """``MODULE:FUNCTION`` -> the function. MODULE is an importable module path
    (``alignkit.rewards:numeric_match``) or a path to a .py file (``/path/my_rewards.py:score``)."""
    module_part, sep, fn_name = spec.rpartition(":")
    if not sep or not module_part or not fn_name:
        raise SystemExit(f"error: --reward {spec!r}: expected MODULE:FUNCTION, e.g. alignkit.rewards:numeric_match "
                         "or path/to/my_rewards.py:score")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise SystemExit(f"error: --reward {spec!r}: file {path} does not exist")
        name = f"alignkit_user_rewards_{abs(hash(str(path.resolve())))}"
        # The file may import its sibling modules, as it could when run as a script. Appended, not
        # prepended: a sibling named like an installed module must not shadow it.
        if str(path.resolve().parent) not in sys.path:
            sys.path.append(str(path.resolve().parent))
        if name not in sys.modules:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise SystemExit(f"error: --reward {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        module = sys.modules[name]
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as e:
            raise SystemExit(f"error: --reward {spec!r}: cannot import module {module_part!r} ({e}); give an "
                             "importable module path or a path to a .py file") from None
        except Exception as e:
            raise SystemExit(f"error: --reward {spec!r}: importing {module_part} failed: "
                             f"{type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise SystemExit(f"error: --reward {spec!r}: {module_part} has no attribute {fn_name!r}; "
                         f"callables there: {', '.join(public) or 'none'}")
    if not callable(fn):
        raise SystemExit(f"error: --reward {spec!r}: {fn_name} is a {type(fn).__name__}, not a function")
    return fn


def reward_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


# ----------------------------------------------------------------------------------------------
# Built-in verifiable rewards
# ----------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the content of its message list."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def _to_number(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    m = _NUMBER.search(str(x))
    return float(m.group().replace(",", "")) if m else None


def numeric_match(prompts, completions, answer=None, **kwargs) -> list[float]:
    """1.0 if the last number in the completion equals the ``answer`` column numerically
    ("47", "47.0" and "The answer is 47." all match answer "47"), else 0.0."""
    if answer is None:
        raise ValueError("numeric_match needs an 'answer' column in the prompt data")
    out = []
    for c, a in zip(completions, answer):
        nums = _NUMBER.findall(completion_text(c))
        target = _to_number(a)
        if target is None:
            raise ValueError(f"numeric_match: answer {a!r} is not a number")
        got = float(nums[-1].replace(",", "")) if nums else None
        out.append(1.0 if got is not None and abs(got - target) <= 1e-9 * max(1.0, abs(target)) else 0.0)
    return out


def format_check(prompts, completions, **kwargs) -> list[float]:
    """1.0 if the completion is well-formed: non-empty, contains a number (an answer), and ends cleanly,
    i.e. its last non-space character is a digit or one of . ! ? (not cut mid-word); else 0.0."""
    out = []
    for c in completions:
        text = completion_text(c).strip()
        ok = bool(text) and bool(_NUMBER.search(text)) and (text[-1].isdigit() or text[-1] in ".!?")
        out.append(1.0 if ok else 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------


def is_sequence_classifier(architectures) -> bool:
    """Whether a config's `architectures` name a trained sequence classifier (not a causal LM)."""
    return any("SequenceClassification" in a for a in architectures or [])


def _architectures(path: Path) -> list[str] | None:
    """`architectures` of path/config.json, read before loading; None when the directory has no config.json."""
    config = path / "config.json"
    return json.loads(config.read_text()).get("architectures") if config.is_file() else None


def _not_a_reward_model(flag: str, path: Path, architectures) -> SystemExit:
    return SystemExit(f"error: {flag} {path} is not a reward model (architectures {architectures}); its score head "
                      "would be random. Train one with `alignkit reward`.")


def load_scorer(path, tokenizer, device="cpu", dtype: str = "float32", trust_remote_code: bool = False, *,
                cfg=None, flag: str = "--reward-model", trained: bool = True, same_tokenizer: bool = False):
    """The one loader of reward models (ppo, grpo, best-of-n) and of PPO's value model: a sequence
    classifier with one output (safetensors only), prepared as the policy is (`models.prepare`:
    --autocast and --compile of `cfg`).

    trained=True (a reward model, frozen) refuses a causal LM, whose score head would be random numbers.
    trained=False (a value model, trained from here) accepts one and says once, plainly, that its head is
    new. same_tokenizer=True refuses a directory with another vocabulary than `tokenizer` (for callers that
    feed it the policy's token ids)."""
    from alignkit.models import load_reward_model, prepare

    p = Path(path)
    declared = _architectures(p) if p.is_dir() else None
    new_head = declared is not None and not is_sequence_classifier(declared)
    if new_head and trained:
        raise _not_a_reward_model(flag, p, declared)
    model = load_reward_model(p, dtype, trust_remote_code, device, pad_token_id=tokenizer.pad_token_id)  # says a new head once
    if trained and not is_sequence_classifier(model.config.architectures):  # e.g. a directory without config.json
        raise _not_a_reward_model(flag, p, model.config.architectures)
    if model.config.num_labels != 1:
        raise SystemExit(f"error: {flag} {p} has num_labels={model.config.num_labels}; a reward model has one "
                         "output (num_labels=1)")
    if same_tokenizer and any(p.glob("tokenizer*.json")):
        from transformers import AutoTokenizer

        own = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        if own.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"error: {flag} {p} has a different tokenizer than --model; it would score other tokens "
                             "than the policy samples")
    if trained:
        model.eval().requires_grad_(False)
    return prepare(model, cfg) if cfg is not None else model


class RewardModelScorer:
    """Scores prompt + completion with a sequence-classification reward model (num_labels=1, e.g. from
    `alignkit reward`, loaded by `load_scorer`): the score head read at the last real token, as in training.

    Input ids are ``prompt_ids + completion_ids`` directly when the reward model's tokenizer and chat
    template are the policy's (the same ids the reward model saw in training, via `alignkit.data`
    loaders); otherwise prompt and decoded completion are rendered with the reward model's own tokenizer
    by `alignkit.data.render_prompt_completion`."""

    __name__ = "reward_model"

    def __init__(self, path: str, tokenizer, device="cpu", batch_size: int = 32, dtype: str = "float32",
                 trust_remote_code: bool = False, cfg=None):
        from alignkit.models import load_tokenizer

        p = Path(path)
        self.model = load_scorer(p, tokenizer, device, dtype, trust_remote_code, cfg=cfg)
        has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        self.tokenizer = load_tokenizer(p, trust_remote_code) if has_tok else tokenizer
        template = lambda t: getattr(t, "chat_template", None)  # noqa: E731
        self.same_ids = self.tokenizer.get_vocab() == tokenizer.get_vocab() and template(self.tokenizer) == template(tokenizer)
        self.device, self.batch_size = device, batch_size

    def sequences(self, prompts, completions, completion_ids=None, prompt_ids=None) -> list[list[int]]:
        if self.same_ids and completion_ids is not None and prompt_ids is not None:
            return [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        from alignkit.data import render_prompt_completion

        return [render_prompt_completion(self.tokenizer, p, c).input_ids for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        from alignkit.models import LastTokenReward
        from alignkit.train.batching import collate

        reward = LastTokenReward(self.model)  # the token training read (not HF's pooling by pad id)
        out = [0.0] * len(seqs)
        # Batches of similar lengths pad less; scores come back in the input's order.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            batch = collate([seqs[i] for i in chunk], [[]] * len(chunk), self.tokenizer.pad_token_id or 0, self.device)
            for i, r in zip(chunk, reward(batch["input_ids"], batch["attention_mask"]).float().tolist()):
                out[i] = r
        return out

    def __call__(self, prompts, completions, completion_ids=None, prompt_ids=None, **kwargs) -> list[float]:
        return self.score_ids(self.sequences(prompts, completions, completion_ids, prompt_ids))


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


class RewardError(SystemExit):
    """A reward function failed or returned something unusable; the message names it and the sample."""


def _accepts(fn) -> tuple[bool, set[str]]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True, set()
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return var_kw, {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _short(x: Any, n: int = 300) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


def describe_sample(i: int, prompts, completions, kwargs: dict) -> str:
    cols = {k: v[i] for k, v in kwargs.items() if isinstance(v, list) and k not in ("completion_ids", "prompt_ids")}
    return (f"  prompt: {_short(prompts[i])}\n  completion: {_short(completions[i])}"
            + (f"\n  columns: {_short(cols)}" if cols else ""))


class _Timeout(BaseException):
    """Raised inside a reward function that ran past its time (a BaseException: user code's `except Exception`
    must not swallow it)."""


def _on_timeout(signum, frame):
    raise _Timeout


def _call(fn, prompts, completions, kwargs: dict, timeout: float | None = None):
    """fn(prompts, completions, **the kwargs it accepts), interrupted with `_Timeout` after `timeout` seconds.

    The function runs in the main thread, where TRL runs it too (reward code such as math-verify sets its own
    SIGALRM timers, which only work there); a timer thread interrupts it with SIGUSR1. Off the main thread,
    or without a timeout, it is a plain call."""
    var_kw, names = _accepts(fn)
    kw = {"prompts": prompts, "completions": completions, **kwargs}
    kw = kw if var_kw else {k: v for k, v in kw.items() if k in names}
    if not timeout or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        return fn(**kw)
    main = threading.main_thread().ident
    timer = threading.Timer(timeout, signal.pthread_kill, (main, signal.SIGUSR1))
    previous = signal.signal(signal.SIGUSR1, _on_timeout)
    try:
        timer.start()
        return fn(**kw)
    finally:
        timer.cancel()
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGUSR1, previous)


def _check_values(name: str, out, n: int, prompts, completions, kwargs, offset: int = 0) -> list[float]:
    """One float per sample (None -> NaN marker handled by the caller via a mask); errors name the sample."""
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().reshape(-1).tolist()
    elif hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"error: reward function {name!r} returned a {type(out).__name__}; it must return a list "
                          f"of {n} numbers (one per completion)")
    if len(out) != n:
        raise RewardError(f"error: reward function {name!r} returned {len(out)} values for {n} completions; it must "
                          "return exactly one reward per completion (None = not applicable)")
    values = []
    for i, v in enumerate(out):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            values.append(None)
        elif isinstance(v, numbers.Real):
            values.append(float(v))
        else:
            raise RewardError(f"error: reward function {name!r} returned {_short(v, 80)} ({type(v).__name__}) for "
                              f"sample {i + offset} of {n}; expected a number or None\n"
                              + describe_sample(i, prompts, completions, kwargs))
    return values


def _run_one(name, fn, prompts, completions, kwargs, on_error: str, timeout: float | None = None) -> list[float | None]:
    n = len(completions)

    def alone(i):  # fn called on sample i alone: (its output, its kwargs)
        one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
        try:
            return _call(fn, prompts[i:i + 1], completions[i:i + 1], one, timeout), one
        except _Timeout:
            raise RewardError(f"error: reward function {name!r} did not return within {timeout:g} s "
                              f"(--reward-timeout) on sample {i} of {n}\n"
                              + describe_sample(i, prompts, completions, kwargs)) from None

    try:
        out = _call(fn, prompts, completions, kwargs, timeout)
    except _Timeout:
        # Call sample by sample to name the one it hangs on; a sample that fails instead is another story.
        for i in range(n):
            try:
                alone(i)
            except RewardError:
                raise
            except Exception:
                pass
        raise RewardError(f"error: reward function {name!r} did not return within {timeout:g} s (--reward-timeout) "
                          f"on the batch of {n} completions, though it did on each one alone; raise "
                          "--reward-timeout") from None
    except Exception as batch_error:
        # Call sample by sample to find (and name) the offending one(s).
        values: list[float | None] = []
        failures = []
        for i in range(n):
            try:
                out_i, one = alone(i)
                values += _check_values(name, out_i, 1, prompts[i:i + 1], completions[i:i + 1], one, offset=i)
            except RewardError:
                raise
            except Exception as e:
                failures.append((i, e))
                values.append(math.nan)
        if not failures:
            raise RewardError(f"error: reward function {name!r} failed on the batch of {n} completions "
                              f"({type(batch_error).__name__}: {batch_error}) but on no single sample") from batch_error
        i, e = failures[0]
        msg = (f"reward function {name!r} failed on sample {i} of {n} ({len(failures)} failing): "
               f"{type(e).__name__}: {e}\n" + describe_sample(i, prompts, completions, kwargs))
        if on_error == "nan":
            print(f"warning: {msg}\n  -> reward set to NaN (--skip-nonfinite)", file=sys.stderr)
            return values
        raise RewardError("error: " + msg) from e
    values = _check_values(name, out, n, prompts, completions, kwargs)
    bad = [i for i, v in enumerate(values) if v is not None and not math.isfinite(v)]
    if bad and on_error == "raise":
        raise RewardError(f"error: reward function {name!r} returned {values[bad[0]]} for sample {bad[0]} of {n} "
                          f"({len(bad)} non-finite); pass --skip-nonfinite to skip such steps\n"
                          + describe_sample(bad[0], prompts, completions, kwargs))
    return values


def score_completions(fns, prompts: list, completions: list, columns: dict[str, list] | None = None,
                      weights=None, *, completion_ids=None, prompt_ids=None, trainer_state=None,
                      on_error: str = "raise", timeout: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total reward per completion, ``sum_f weight_f * r_f`` -> (rewards (N,) float32, {name: (N,)}).

    In the per-function tensors "not applicable" (None) is NaN; in the total it adds 0, as in TRL.
    A function that raises is called sample by sample to name the offending sample; then a
    `RewardError` (SystemExit) is raised, or, with ``on_error="nan"`` (the recipes pass it under
    --skip-nonfinite), the failing samples get NaN with a warning, so the total is NaN and the recipe
    skips the step. Returned NaN/inf are errors too unless ``on_error="nan"``. A call of a reward
    function (not of the reward model) that has not returned after ``timeout`` seconds is an error naming
    the function and the sample it hangs on, whatever ``on_error`` says.
    """
    n = len(completions)
    weights = [1.0] * len(fns) if weights is None or len(weights) == 0 else list(weights)
    if len(weights) != len(fns):
        raise SystemExit(f"error: {len(weights)} reward weights for {len(fns)} reward functions")
    columns = dict(columns or {})
    for reserved in ("completion_ids", "prompt_ids", "trainer_state"):
        if reserved in columns:
            raise SystemExit(f"error: the data has a column {reserved!r}, a name reserved for reward-function "
                             "arguments")
    kwargs: dict[str, Any] = {**columns}
    if completion_ids is not None:
        kwargs["completion_ids"] = [list(c) for c in completion_ids]
    if prompt_ids is not None:
        kwargs["prompt_ids"] = [list(p) for p in prompt_ids]
    if trainer_state is None:
        trainer_state = SimpleNamespace(global_step=0, max_steps=0)
    kwargs["trainer_state"] = trainer_state

    total = torch.zeros(n, dtype=torch.float64)
    applicable = torch.zeros(n, dtype=torch.bool)
    per_function: dict[str, torch.Tensor] = {}
    for fn, w in zip(fns, weights):
        name = reward_name(fn)
        limit = None if isinstance(fn, RewardModelScorer) else timeout  # our code; it may just be slow
        values = _run_one(name, fn, prompts, completions, kwargs, on_error, limit)
        r = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)  # (N,)
        given = torch.tensor([v is not None for v in values], dtype=torch.bool)  # (N,)
        total += torch.where(given, w * r, 0.0)
        applicable |= given
        key, k = name, 2
        while key in per_function:
            key, k = f"{name}_{k}", k + 1
        per_function[key] = r.float()
    if n and not bool(applicable.all()):
        i = int((~applicable).nonzero()[0])
        print(f"warning: every reward function returned None for {int((~applicable).sum())} of {n} completions "
              f"(reward 0), e.g. sample {i}:\n" + describe_sample(i, prompts, completions, kwargs), file=sys.stderr)
    return total.float(), per_function


def score_samples(fns, examples: list, completion_ids: list[list[int]], tokenizer, weights=None, **options):
    """`score_completions` for sampled token ids: `examples` are the prompt records (`alignkit.data.load_prompts`),
    one per completion. Completions are decoded (special tokens skipped) and, for conversational prompts, given
    as assistant messages (TRL's convention); the records' other columns go to the functions. `options` are
    `score_completions`' keyword arguments. Returns (rewards (N,), {name: (N,)}, decoded texts)."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] if isinstance(ex.prompt, list) else t
                   for ex, t in zip(examples, texts)]
    columns = {key: [ex.columns.get(key) for ex in examples] for key in sorted({k for ex in examples for k in ex.columns})}
    rewards, per_function = score_completions(fns, [ex.prompt for ex in examples], completions, columns, weights,
                                              completion_ids=completion_ids,
                                              prompt_ids=[ex.prompt_ids for ex in examples], **options)
    return rewards, per_function, texts


def load_rewards(specs, reward_model: str | None, tokenizer, device, trust_remote_code: bool = False,
                 dtype: str = "float32", cfg=None) -> list:
    """The reward callables of a command: each --reward MODULE:FUNCTION, then --reward-model DIR last
    (prepared with `cfg`'s --autocast/--compile, as the policy)."""
    fns = [load_reward_function(s) for s in specs]
    if reward_model:
        fns.append(RewardModelScorer(reward_model, tokenizer, device, dtype=dtype,
                                     trust_remote_code=trust_remote_code, cfg=cfg))
    if not fns:
        raise SystemExit("error: give at least one --reward MODULE:FUNCTION or a --reward-model DIR")
    return fns
