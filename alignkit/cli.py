"""`alignkit <command>`: one sub-command per recipe, each with a tyro dataclass config."""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, config class, entry function, one-line help). Imported lazily so that
# `alignkit --help` does not pay for importing torch and transformers.
COMMANDS = {
    "demo": ("alignkit.demo", "DemoConfig", "main", "Main job: tokenizer + tiny model from scratch, pretrain, SFT, compare answers"),
    "train-tokenizer": ("alignkit.tokenizer", "TokenizerConfig", "main", "Train a byte-level BPE tokenizer with a chat template"),
    "init-model": ("alignkit.commands", "InitModelConfig", "init_model_main", "Create a randomly initialised Llama/Qwen2 model"),
    "pretrain": ("alignkit.recipes.pretrain", "PretrainConfig", "main", "Next-token prediction on text (cosine or WSD + midtraining)"),
    "sft": ("alignkit.recipes.sft", "SFTConfig", "main", "Supervised fine-tuning on assistant tokens"),
    "distill": ("alignkit.recipes.distill", "DistillConfig", "main", "Token-level distillation from a teacher: forward/reverse KL, GKD's JSD, on-policy samples"),
    "reward": ("alignkit.recipes.reward", "RewardConfig", "main", "Bradley-Terry reward model on preference pairs"),
    "dpo": ("alignkit.recipes.dpo", "DPOConfig", "main", "Offline preference optimisation: DPO, IPO, robust, hinge, LN-DPO, SimPO"),
    "kto": ("alignkit.recipes.kto", "KTOConfig", "main", "KTO on unpaired (or auto-unpaired) preferences"),
    "ppo": ("alignkit.recipes.ppo", "PPOConfig", "main", "RLHF with PPO against a reward model"),
    "grpo": ("alignkit.recipes.grpo", "GRPOConfig", "main", "GRPO with reward functions and/or a reward model"),
    "best-of-n": ("alignkit.recipes.best_of_n", "BestOfNConfig", "main", "Rejection sampling: keep the best of N samples"),
    "self-reward": ("alignkit.recipes.self_reward", "SelfRewardConfig", "main", "Self-rewarding / online iterative DPO: sample, judge, best-vs-worst pairs, DPO, repeat"),
    "curate": ("alignkit.curate", "CurateConfig", "main", "Deduplicate, filter, decontaminate and select SFT data (LIMA, longest-k, IFD, diverse)"),
    "judge": ("alignkit.judge", "JudgeConfig", "main", "Label preferences with a model as judge (RLAIF), a reward model or reward functions"),
    "eval": ("alignkit.eval.run", "EvalConfig", "main", "Judge models against a baseline: win rate with intervals, length-controlled win rate, diversity, token shift"),
    "probe-knowledge": ("alignkit.probe", "ProbeConfig", "main", "SliCK knowledge categories of QA pairs: what the model knows, from few-shot answers"),
    "cai": ("alignkit.cai", "CAIConfig", "main", "Constitutional AI: critique -> revision chains (SL-CAI) and AI-labelled pairs (RL-CAI)"),
    "world build": ("alignkit.world.cli", "WorldBuildConfig", "build_main", "Write the synthetic world's data files"),
    "world eval": ("alignkit.world.cli", "WorldEvalConfig", "eval_main", "Score a model on the world's held-out sets (gold judge)"),
    "world run": ("alignkit.world.run", "WorldRunConfig", "main", "The world's experiments (default: the ladder) over seeds, with a report"),
    "world list": ("alignkit.world.run", "WorldListConfig", "list_main", "What each world experiment shows and how long it takes"),
    "generate": ("alignkit.commands", "GenerateConfig", "generate_main", "Generate completions for prompts"),
    "chat": ("alignkit.commands", "ChatConfig", "chat_main", "Interactive chat with a model"),
    "bench": ("alignkit.bench.cli", "BenchConfig", "main", "Throughput of SFT/DPO/GRPO on a fixed fixture, optionally vs TRL"),
    "report": ("alignkit.report", "ReportConfig", "main", "report.html + PNG curves of one or more runs' metrics.jsonl"),
}


def usage() -> str:
    lines = ["usage: alignkit <command> [--help] [options]", "       alignkit --version", "", "commands:"]
    lines += [f"  {name:<16} {spec[3]}" for name, spec in COMMANDS.items()]
    lines += ["", "Training commands take --config FILE.yaml; flags override it."]
    return "\n".join(lines)


def world_usage() -> str:
    lines = ["usage: alignkit world <command> [--help] [options]", "", "commands:"]
    lines += [f"  {name[6:]:<10} {spec[3]}" for name, spec in COMMANDS.items() if name.startswith("world ")]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as package_version

    try:
        return package_version("alignkit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from alignkit import __version__

        return __version__


def run(argv: list[str] | None = None):
    """Parse and run one command; returns the command's result (used by tests and notebooks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if argv[0] == "--version":
        print(f"alignkit {version()}")
        return None
    name, rest = argv[0], argv[1:]
    if name == "world" and rest and not rest[0].startswith("-"):  # two-word commands: `alignkit world build`
        name, rest = f"world {rest[0]}", rest[1:]
    elif name == "world":
        if rest[:1] in (["-h"], ["--help"]):
            print(world_usage())
            return None
        print(world_usage(), file=sys.stderr)
        raise SystemExit(2)
    if name not in COMMANDS:
        print(f"alignkit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, cfg_name, fn_name, _ = COMMANDS[name]
    from transformers.utils import logging as hf_logging

    from alignkit.config import parse, require

    hf_logging.disable_progress_bar()  # per-file load/save bars drown our own progress bar
    module = importlib.import_module(module_name)
    cfg = parse(getattr(module, cfg_name), rest, prog=f"alignkit {name}")
    require(cfg)
    try:
        return getattr(module, fn_name)(cfg)
    finally:
        # A command that stopped with an error still frees its --output for the next command of this process.
        if "alignkit.train.run" in sys.modules:
            sys.modules["alignkit.train.run"].release_outputs()
        if "alignkit.train.dist" in sys.modules:  # the command's models are freed by now: the group can go
            sys.modules["alignkit.train.dist"].teardown()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit status 0 on success; a user error is one line on stderr and status 1
    (ALIGNKIT_DEBUG=1 shows its traceback)."""
    from alignkit.errors import UserError

    try:
        run(argv)
    except UserError as e:
        if os.environ.get("ALIGNKIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `alignkit ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
