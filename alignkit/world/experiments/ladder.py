"""The ladder: base, SFT, reward model, DPO, PPO, GRPO and best-of-n, each stage an
ordinary `alignkit` command on the world's files, each model scored by the gold judge on held-out prompts
in trained (near) and never-trained (far) frames."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

NAME = "ladder"
SUMMARY = ("the notes' training ladder (pretrain, SFT, reward model, DPO, PPO, GRPO, best-of-n) judged by "
           "the gold judge on near and far frames")
MINUTES = {"smoke": 1.5, "tiny": 9.8, "small": 40.0}
ESTIMATED = {"small"}
# SimPO and LN-DPO live in the dpo-family and length-bias experiments (the same stages, shared by the cache).
STAGES = ("sft", "reward", "dpo", "ppo", "grpo", "overopt")
POLICIES = ("base", "sft", "dpo", "ppo", "grpo")


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


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


def best_of_n_curve(policy: Path, rm_dir: Path, sets: dict, n_prompts: int, n_max: int, seed: int) -> dict:
    """Over-optimisation by best-of-n against the proxy RM (Gao et al. 2023, arXiv 2210.10760): as n
    grows the proxy reward of the pick rises; the gold reward rises, peaks and can fall where the proxy
    rewards what the annotators' bias rewarded. KL(best-of-n || policy) = log n - (n-1)/n (Stiennon et al. 2020)."""
    from alignkit.data import render_prompt
    from alignkit.generation import sample_groups
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.rewards import RewardModelScorer
    from alignkit.world.gold import gold_score

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


def post_sft_commands(ctx, data: Path, sft: Path, rm: Path | None) -> dict[str, tuple[list[str], list[Path]]]:
    """The stages trained from the SFT model: name -> (command, inputs). Each loss gets the learning rate
    and beta at which it moves the tiny SFT model without collapsing (reference-free SimPO collapses at DPO's
    rate; LN-DPO takes Tulu 3's beta = 5), and the RPO term keeps them from degenerating on these off-policy
    pairs (docs/world.md has the measurements)."""
    b, pref = ctx.budget, data / "pref.jsonl"
    batch = str(b.get("pref_batch", 16))
    commands = {}
    for name, loss, beta, lr in (("dpo", "sigmoid", "0.1", "3e-4"), ("simpo", "simpo", "2.0", "5e-5"),
                                 ("ln_dpo", "ln_dpo", "5.0", "3e-4")):
        commands[name] = (["dpo", "--loss", loss, "--beta", beta, "--model", str(sft), "--data", str(pref),
                           "--max-steps", str(b["dpo_steps"]), "--batch-size", batch, "--max-length", "192",
                           "--lr", lr, "--rpo-alpha", "1.0"], [sft, pref])
    if rm is not None:
        prompts = data / "rl_prompts.jsonl"
        commands["ppo"] = (["ppo", "--model", str(sft), "--reward-model", str(rm), "--data", str(prompts),
                            "--max-steps", str(b["ppo_steps"]), "--batch-size", batch, "--max-new-tokens", "48",
                            "--kl-coef", "0.05", "--missing-eos-penalty", "1.0", "--lr", "3e-5"], [sft, rm, prompts])
    # lr 1e-4 is where the policy moves to the worked style of answer (slower rates barely move it, faster
    # ones shorten the samples again; docs/world.md).
    arith = data / "arith_prompts.jsonl"
    commands["grpo"] = (["grpo", "--model", str(sft), "--data", str(arith), "--reward", "alignkit.rewards:numeric_match",
                         "--max-steps", str(b["grpo_steps"]), "--batch-size", "4", "--group-size", "8",
                         "--max-new-tokens", "64", "--lr", "1e-4"], [sft, arith])
    return commands


def shift_vs(ctx, label: str, reference: Path, model: Path, data: Path) -> dict:
    """The token shift of `model`'s greedy held-out answers as ranked by `reference` (timed as the stage's eval)."""
    from alignkit.world.evaluate import token_shift

    return ctx.time(f"eval {label}", token_shift, reference, ctx.sets(data), ctx.answers(model, data))


def run(ctx) -> dict:
    wanted = set(STAGES) if ctx.stages == "all" else {s.strip() for s in ctx.stages.split(",")}
    data = ctx.data()
    sets = ctx.sets(data)
    section: dict = {}
    base = ctx.base()
    section["base"] = ctx.evaluate(NAME, "base", base, data)
    if "sft" not in wanted:
        return section
    sft = ctx.sft()
    section["sft"] = ctx.evaluate(NAME, "sft", sft, data)
    # Which tokens each stage changed (Lin et al. 2023): ranked by the base model and, after SFT, by SFT.
    shift = section["token_shift"] = {"sft": {"vs_base": shift_vs(ctx, "sft", base, sft, data)}}
    rm = None
    if wanted & {"reward", "ppo", "overopt"}:
        rm = ctx.reward_model(data)
        section["reward_model"] = ctx.time("eval reward", reward_model_eval, rm, data)
    specs = {name: spec for name, spec in post_sft_commands(ctx, data, sft, rm).items() if name in wanted}
    for name, model in ctx.stages_at_once(specs, ctx.at_once).items():
        section[name] = ctx.evaluate(NAME, name, model, data, baseline="sft")
        shift[name] = {"vs_base": shift_vs(ctx, name, base, model, data), "vs_sft": shift_vs(ctx, name, sft, model, data)}
        if name == "ppo":
            rows = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
            section["ppo"]["kl"] = next((r["kl"] for r in reversed(rows) if "kl" in r), float("nan"))
    if "overopt" in wanted:
        section["overoptimization"] = ctx.time("overopt", best_of_n_curve, sft, rm, sets, ctx.budget["bon_prompts"],
                                               ctx.budget["bon_n"], ctx.seed)
    return section


# ---- report -----------------------------------------------------------------------------------------------

COLUMNS = ("qa_accuracy_seen", "qa_accuracy_unseen_multi", "qa_accuracy_unseen_single", "arith_accuracy",
           "harmful_refusal", "benign_overrefusal", "idk_on_unknown", "eos_rate", "gold_reward", "win_rate_vs_sft",
           "lc_win_rate_vs_sft", "mean_length", "garbled_rate", "distinct_2")


def fmt(v) -> str:
    """A seed's number, or an aggregate leaf as mean [95% interval]."""
    if v is None:
        return ""
    if isinstance(v, dict):
        lo, hi = v.get("ci95", (float("nan"), float("nan")))
        return f"{v['mean']:.3f}" if lo is None or lo != lo else f"{v['mean']:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{v:.3f}"


def value(v) -> float:
    return v["mean"] if isinstance(v, dict) else v


def _metric_table(section: dict, distance: str) -> list[str]:
    present = [s for s in POLICIES if s in section]
    lines = ["| stage | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for s in present:
        lines.append(f"| {s} | " + " | ".join(fmt(section[s][distance].get(c)) for c in COLUMNS) + " |")
    return lines


def _calibration_and_shift(section: dict) -> list[str]:
    """Calibration per stage (the notes: RLHF models grow over-confident) and the token shift (the notes:
    alignment changes few tokens, mostly where the answer ends)."""
    present = [s for s in POLICIES if s in section and "fact_calibration_ece" in section[s]["far"]]
    if not present:
        return []
    shift = section.get("token_shift", {})
    lines = ["## Calibration and token shift", "",
             "Calibration: the model's belief over every possible answer (multiple choice, as the GPT-4 report "
             "measures it on MMLU) to the held-out fact questions and, answered without working, the held-out "
             "word problems, on far frames; accuracy / confidence / ECE. Token shift (Lin et al. "
             "2023): of the stage's greedy answer tokens, the share the base model (or SFT) ranks below third; "
             "`at end` = of the answers' end-of-turn tokens.", "",
             "| stage | facts: acc / conf / ECE | arithmetic: acc / conf / ECE | shifted vs base | at end | shifted vs SFT "
             "| at end | most shifted (vs the stage before) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in present:
        r, sh = section[s]["far"], shift.get(s, {})
        cells = [" / ".join(fmt(r.get(f"{family}_{k}")) for k in ("option_accuracy", "option_confidence",
                                                                   "calibration_ece"))
                 for family in ("fact", "arith")]
        for key in ("vs_base", "vs_sft"):
            cells += [fmt(sh[key]["shifted"]), fmt(sh[key]["shifted_at_end"])] if key in sh else ["", ""]
        top = sh.get("vs_sft", sh.get("vs_base", {})).get("top_shifted")
        # tokens such as <|im_end|> carry the table's separator; an aggregate has no single token list
        cells.append(", ".join(f"{t!r} {n}".replace("|", "\\|") for t, n in top[:5])
                     if isinstance(top, list) and all(isinstance(x, list) for x in top) else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(section: dict) -> str:
    md = []
    for distance, what in (("far", "frames that appear in no training file"),
                           ("near", "trained frames, held-out content")):
        md += [f"### Held-out metrics per stage, {distance} frames ({what}; gold judge)", "",
               *_metric_table(section, distance), ""]
    if "reward_model" in section:
        rm = section["reward_model"]
        md += ["### Reward model (proxy)", "", "| " + " | ".join(rm) + " |", "|---" * len(rm) + "|",
               "| " + " | ".join(fmt(v) for v in rm.values()) + " |", ""]
    if "ppo" in section and "kl" in section["ppo"]:
        md += [f"PPO's final KL to SFT: {fmt(section['ppo']['kl'])} nats.", ""]
    md += _calibration_and_shift(section)
    if "overoptimization" in section:
        c = section["overoptimization"]
        md += ["### Over-optimisation (best-of-n against the proxy RM)", "", "| n | KL | proxy | gold | length |",
               "|---|---|---|---|---|"]
        md += [f"| {value(n):.0f} | {fmt(k)} | {fmt(p)} | {fmt(g)} | {fmt(l)} |" for n, k, p, g, l in
               zip(*(_elements(c[key]) for key in ("n", "kl", "proxy_reward", "gold_reward", "mean_length")))]
        md += [""]
    return "\n".join(md)


def _elements(curve) -> list:
    """A curve's points: a seed's list, or an aggregate's element-wise leaves (a list of leaf dicts, or one
    dict of lists)."""
    if isinstance(curve, dict):
        ci = curve.get("ci95") or [[float("nan")] * len(curve["mean"])] * 2
        return [{"mean": m, "ci95": [lo, hi]} for m, lo, hi in zip(curve["mean"], *ci)]
    return curve
