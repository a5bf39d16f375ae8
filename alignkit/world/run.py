"""`alignkit world run`: the whole ladder in the world, every stage measured against the gold judge.

Each stage is an ordinary `alignkit` command on the world's files (printed, so the run doubles as a
tutorial); after each stage the model answers the held-out sets and the gold judge scores them.
Outputs: OUT/results.json (its keys are a contract, checked by tests/world), OUT/report.md, OUT/report.html,
plots. docs/world.md describes the world and records what it has measured.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignkit.cli import run as alignkit
from alignkit.world.evaluate import (answer_all, load_eval_sets, mean, option_calibration, score, token_shift,
                                     win_rate)

# Optimizer-step budgets per preset. tiny is sized for <= 10 minutes on 2 CPU cores; smoke only checks
# the pipeline end to end (CI) and shows no effects.
PRESETS = {
    "smoke": dict(world="smoke", pretrain_steps=20, sft_steps=10, rm_steps=5, dpo_steps=3, ppo_steps=2,
                  grpo_steps=2, bon_prompts=8, bon_n=4),
    "tiny": dict(world="tiny", pretrain_steps=800, sft_steps=600, rm_steps=190, dpo_steps=75, ppo_steps=30,
                 grpo_steps=50, bon_prompts=96, bon_n=32),
    "small": dict(world="small", pretrain_steps=6000, sft_steps=1200, rm_steps=350, dpo_steps=500, ppo_steps=150,
                  grpo_steps=120, bon_prompts=200, bon_n=64),
}


@dataclass
class WorldRunConfig:
    """Build the world, train tokenizer and model from scratch, run every stage, evaluate, report."""

    output: str = "runs/world"
    """Directory for data, models and the report."""
    preset: Literal["smoke", "tiny", "small"] = "tiny"
    """tiny: <= 10 minutes on 2 CPU cores; small: about an hour, clearer effects; smoke: a 1-2 minute pipeline
    check whose figures mean nothing."""
    seed: int = 0
    """Seed of the world and of every stage."""
    stages: str = "all"
    """Comma-separated subset of: sft,reward,dpo,simpo,ln_dpo,ppo,grpo,overopt (pretraining and the base model always run)."""
    progress: bool = True
    """Show the commands' progress bars."""


class Stages:
    """Runs commands, times them and records them for the report."""

    def __init__(self, out: Path, progress: bool):
        self.out, self.progress, self.timings, self.commands = out, progress, {}, []

    def command(self, stage: str, *args: str, trains: bool = True) -> dict:
        argv = [*args] + ([] if self.progress or not trains else ["--no-progress"])
        self.commands.append("alignkit " + " ".join(shlex.quote(a) for a in argv))
        print(f"\n== {stage}: alignkit {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        result = alignkit(argv)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t
        return result

    def timed(self, stage: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t
        return result


def reward_model_eval(rm_dir: Path, world: Path) -> dict:
    """Held-out pair accuracy of the proxy RM, its agreement with the gold label, and ECE."""
    from alignkit.data import load_preference
    from alignkit.eval.calibration import pairwise_accuracy, preference_calibration_error
    from alignkit.models import load_tokenizer
    from alignkit.rewards import RewardModelScorer

    tok = load_tokenizer(rm_dir)
    rows = [json.loads(line) for line in (world / "pref_eval.jsonl").read_text().splitlines()]
    pairs, _ = load_preference([str(world / "pref_eval.jsonl")], tok, 512)
    rm = RewardModelScorer(str(rm_dir), tok)
    rc = rm.score_ids([p.prompt_ids + p.chosen_ids for p in pairs])
    rr = rm.score_ids([p.prompt_ids + p.rejected_ids for p in pairs])
    if len(pairs) != len(rows):
        raise SystemExit(f"error: {len(rows) - len(pairs)} held-out pairs were dropped; cannot match gold labels")
    # gold_label_accuracy: does the RM rank the pair as the gold judge does (the annotator's label
    # agreed with gold iff gold_agrees)? The annotators' own agreement is the ceiling to compare with.
    rm_agrees = [(c > r) == row["gold_agrees"] for c, r, row in zip(rc, rr, rows)]

    def agreement(keep: list[bool]) -> tuple[float, float]:
        """(RM, annotators) agreement with gold on the kept pairs."""
        return (mean(a for a, k in zip(rm_agrees, keep) if k),
                mean(row["gold_agrees"] for row, k in zip(rows, keep) if k))

    gold, agree = agreement([not row["gold_tie"] for row in rows])
    # Fact pairs split by whether SFT taught the person's facts: only for those can the RM (the SFT model
    # plus a head) know which fact is right. Pairs about non-existent people apart too.
    seen = {p["name"]: p["seen"] for p in json.loads((world / "world.json").read_text())["people"]}
    groups = {"fact_seen": lambda m: m["kind"] == "fact" and seen[m["name"]],
              "fact_unseen": lambda m: m["kind"] == "fact" and not seen[m["name"]],
              "unknown": lambda m: m["kind"] == "unknown"}
    by_group = {f"heldout_accuracy_{name}": pairwise_accuracy(*zip(*[(c, r) for c, r, row in zip(rc, rr, rows)
                                                                      if keep(row["meta"])]))
                for name, keep in groups.items() if any(keep(row["meta"]) for row in rows)}
    # Pairs about unseen people need facts no model trained here has, so the fair ceiling compares RM and
    # annotators on the knowable pairs only.
    gold_k, agree_k = agreement([not row["gold_tie"] and not groups["fact_unseen"](row["meta"]) for row in rows])
    return {"heldout_accuracy": pairwise_accuracy(rc, rr), "gold_label_accuracy": gold,
            "annotator_gold_agreement": agree, "ece": preference_calibration_error(rc, rr), **by_group,
            "gold_label_accuracy_knowable": gold_k, "annotator_gold_agreement_knowable": agree_k}


def best_of_n_curve(policy: Path, rm_dir: Path, world: Path, n_prompts: int, n_max: int, seed: int) -> dict:
    """Over-optimisation by best-of-n against the proxy RM (Gao et al. 2023, arXiv 2210.10760): as n
    grows the proxy reward of the pick rises; the gold reward rises, peaks and can fall where the proxy
    rewards what the annotators' bias rewarded. KL(best-of-n || policy) = log n - (n-1)/n (Stiennon et al. 2020)."""
    from alignkit.data import render_prompt
    from alignkit.generation import sample_groups
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.rewards import RewardModelScorer
    from alignkit.world.gold import gold_score

    sets = load_eval_sets(world)
    rows = [r for name in sets for r in sets[name]]
    rows = rows[:: max(1, len(rows) // n_prompts)][:n_prompts]
    tok = load_tokenizer(policy)
    model = load_causal_lm(policy)
    torch.manual_seed(seed)
    prompt_ids = [render_prompt(tok, r["prompt"]) for r in rows]
    completions, ended = sample_groups(model, tok, prompt_ids, n_max, max_new_tokens=48, temperature=1.0)
    rm = RewardModelScorer(str(rm_dir), tok)
    proxy = rm.score_ids([prompt_ids[i // n_max] + c for i, c in enumerate(completions)])
    texts = [tok.decode(c, skip_special_tokens=True).strip() for c in completions]
    gold = [gold_score(rows[i // n_max]["meta"], t, e) for i, (t, e) in enumerate(zip(texts, ended))]
    lengths = [len(c) for c in completions]
    # Per prompt, the samples ranked by proxy reward (ascending): best-of-n for every n <= n_max is read
    # off the same n_max samples with the unbiased estimator of Nakano et al. 2021 (WebGPT, appendix) used
    # by Gao et al.: the rank-i sample is the pick of a random n-subset with probability
    # C(i-1, n-1) / C(n_max, n). Far less noisy than taking the first n samples.
    ranked = [sorted(range(g * n_max, (g + 1) * n_max), key=lambda i: proxy[i]) for g in range(len(rows))]
    curve = {"n": [], "kl": [], "proxy_reward": [], "gold_reward": [], "mean_length": []}
    n = 1
    while n <= n_max:
        weights = [math.comb(i, n - 1) / math.comb(n_max, n) for i in range(n_max)]  # rank i+1 -> C(i, n-1)
        def expect(values):
            return mean(sum(w * values[i] for w, i in zip(weights, order)) for order in ranked)
        curve["n"].append(n)
        curve["kl"].append(math.log(n) - (n - 1) / n)
        curve["proxy_reward"].append(expect(proxy))
        curve["gold_reward"].append(expect(gold))
        curve["mean_length"].append(expect(lengths))
        n *= 2
    return curve


def main(cfg: WorldRunConfig) -> dict:
    out = Path(cfg.output)
    world, models = out / "data", out / "models"
    budget = PRESETS[cfg.preset]
    wanted = {"sft", "reward", "dpo", "simpo", "ln_dpo", "ppo", "grpo", "overopt"} if cfg.stages == "all" \
        else set(cfg.stages.split(","))
    st = Stages(out, cfg.progress)
    t0 = time.perf_counter()
    seed = str(cfg.seed)
    st.command("build", "world", "build", "--output", str(world), "--preset", budget["world"], "--seed", seed,
               trains=False)
    sets = load_eval_sets(world)
    results: dict = {"preset": cfg.preset, "seed": cfg.seed}

    def evaluate(stage: str, model_dir: Path, baseline: dict | None = None) -> tuple[dict, dict]:
        answers = st.timed(f"eval {stage}", answer_all, model_dir, sets)
        metrics = {**score(sets, answers), **st.timed(f"eval {stage}", option_calibration, model_dir, sets)}
        if baseline is not None:
            metrics["win_rate_vs_sft"] = win_rate(sets, answers, baseline)
        # Which tokens the stage changed (Lin et al. 2023): ranked by the base model and, after SFT, by SFT.
        if stage != "base":
            shift = results.setdefault("token_shift", {})[stage] = {
                "vs_base": st.timed(f"eval {stage}", token_shift, models / "base", sets, answers)}
            if stage != "sft":
                shift["vs_sft"] = st.timed(f"eval {stage}", token_shift, models / "sft", sets, answers)
        print(f"-- {stage}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
        return metrics, answers

    st.command("tokenizer", "train-tokenizer", "--data", str(world / "corpus.jsonl"), "--data", str(world / "sft.jsonl"),
               "--vocab-size", "1024", "--output", str(models / "tokenizer"), trains=False)
    st.command("init", "init-model", "--arch", "llama", "--size", "small" if cfg.preset == "small" else "tiny",
               "--tokenizer", str(models / "tokenizer"), "--output", str(models / "init"), "--seed", seed, trains=False)
    common = ["--seed", seed, "--overwrite"]  # a rerun rebuilds every stage
    st.command("pretrain", "pretrain", "--model", str(models / "init"), "--data", str(world / "corpus.jsonl"),
               "--output", str(models / "base"), "--max-steps", str(budget["pretrain_steps"]), "--batch-size", "16",
               "--max-length", "128", "--lr", "2e-3", "--warmup-steps", "40", *common)
    results["base"], _ = evaluate("base", models / "base")
    if "sft" not in wanted:
        return results
    st.command("sft", "sft", "--model", str(models / "base"), "--data", str(world / "sft.jsonl"), "--output",
               str(models / "sft"), "--max-steps", str(budget["sft_steps"]), "--batch-size", "16", "--max-length", "192",
               "--lr", "1e-3", *common)
    results["sft"], sft_answers = evaluate("sft", models / "sft")

    if wanted & {"reward", "ppo", "overopt"}:
        # Two epochs of whole rankings (4 prompts a batch, each answer scored once), as InstructGPT trained
        # its reward model, beat singly labelled pairs at the same cost (docs/world.md).
        st.command("reward", "reward", "--model", str(models / "sft"), "--data", str(world / "pref_ranked.jsonl"),
                   "--output", str(models / "rm"), "--max-steps", str(budget["rm_steps"]), "--group-by-prompt",
                   "--batch-size", "4", "--max-length", "192", "--lr", "1e-3", *common)
        results["reward_model"] = st.timed("eval reward", reward_model_eval, models / "rm", world)
    # Each loss gets the learning rate and beta at which it moves the tiny SFT model without collapsing
    # (reference-free SimPO collapses at DPO's rate; LN-DPO takes Tulu 3's beta = 5), and the RPO term keeps
    # them from degenerating on these off-policy pairs (docs/world.md has the measurements).
    for loss, beta, lr in (("sigmoid", "0.1", "3e-4"), ("simpo", "2.0", "5e-5"), ("ln_dpo", "5.0", "3e-4")):
        name = {"sigmoid": "dpo"}.get(loss, loss)
        if name not in wanted:
            continue
        st.command(name, "dpo", "--loss", loss, "--beta", beta, "--model", str(models / "sft"), "--data",
                   str(world / "pref.jsonl"), "--output", str(models / name), "--max-steps", str(budget["dpo_steps"]),
                   "--batch-size", "16", "--max-length", "192", "--lr", lr, "--rpo-alpha", "1.0", *common)
        results[name], _ = evaluate(name, models / name, sft_answers)
    if "ppo" in wanted:
        st.command("ppo", "ppo", "--model", str(models / "sft"), "--reward-model", str(models / "rm"), "--data",
                   str(world / "rl_prompts.jsonl"), "--output", str(models / "ppo"), "--max-steps",
                   str(budget["ppo_steps"]), "--batch-size", "16", "--max-new-tokens", "48", "--kl-coef", "0.05",
                   "--missing-eos-penalty", "1.0", "--lr", "3e-5", *common)
        results["ppo"], _ = evaluate("ppo", models / "ppo", sft_answers)
        ppo_rows = [json.loads(line) for line in (models / "ppo" / "metrics.jsonl").read_text().splitlines()]
        results["ppo"]["kl"] = next((r["kl"] for r in reversed(ppo_rows) if "kl" in r), float("nan"))
    if "grpo" in wanted:
        # lr 1e-4 is where the policy moves to the worked style of answer (slower rates barely move it, faster
        # ones shorten the samples again; docs/world.md).
        st.command("grpo", "grpo", "--model", str(models / "sft"), "--data", str(world / "arith_prompts.jsonl"),
                   "--reward", "alignkit.rewards:numeric_match", "--output", str(models / "grpo"), "--max-steps",
                   str(budget["grpo_steps"]), "--batch-size", "4", "--group-size", "8", "--max-new-tokens", "64",
                   "--lr", "1e-4", *common)
        results["grpo"], _ = evaluate("grpo", models / "grpo", sft_answers)
    if "overopt" in wanted:
        results["overoptimization"] = st.timed("overopt", best_of_n_curve, models / "sft", models / "rm", world,
                                               budget["bon_prompts"], budget["bon_n"], cfg.seed)
    results["seconds"] = time.perf_counter() - t0
    results["timings"] = st.timings
    results["commands"] = st.commands
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from alignkit.world.report import SMOKE_NOTE, write_report

    write_report(out, results)
    print("\n== stage timings ==")
    for k, v in st.timings.items():
        print(f"  {k:<16} {v:7.1f} s")
    print(f"  {'total':<16} {results['seconds']:7.1f} s\nreport: {out / 'report.md'}")
    if cfg.preset == "smoke":
        print(SMOKE_NOTE)
    return results
