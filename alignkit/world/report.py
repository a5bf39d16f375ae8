"""report.md / report.html and plots for `alignkit world run`, made from results.json and each stage's
metrics.jsonl (never from inside a training loop)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

STAGES = ("base", "sft", "dpo", "simpo", "ln_dpo", "ppo", "grpo")
COLUMNS = ("qa_accuracy_seen", "qa_accuracy_unseen_multi", "qa_accuracy_unseen_single", "arith_accuracy",
           "harmful_refusal", "benign_overrefusal", "idk_on_unknown", "eos_rate", "gold_reward", "win_rate_vs_sft",
           "mean_length")


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plots(out: Path, results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    models = out / "models"
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for stage in ("base", "sft", "rm", "dpo", "simpo", "ln_dpo"):
        rows = [r for r in _metrics(models / stage / "metrics.jsonl") if "loss" in r and not r.get("final")]
        if rows:
            ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label="pretrain" if stage == "base" else stage)
    ax[0].set(title="training loss", xlabel="step", yscale="log")
    ax[0].legend()
    for stage, key in (("ppo", "reward_mean"), ("grpo", "reward_mean")):
        rows = [r for r in _metrics(models / stage / "metrics.jsonl") if key in r]
        if rows:
            ax[1].plot([r["step"] for r in rows], [r[key] for r in rows], label=f"{stage} {key}")
    ax[1].set(title="RL reward during training", xlabel="step")
    ax[1].legend()
    # GRPO finds the worked style of answer on the word problems: its answers lengthen as reward rises.
    for stage in ("ppo", "grpo"):
        rows = [r for r in _metrics(models / stage / "metrics.jsonl") if "completion_length" in r]
        if rows:
            ax[3].plot([r["step"] for r in rows], [r["completion_length"] for r in rows], label=stage)
    ax[3].set(title="sampled answer length during RL", xlabel="step", ylabel="tokens")
    ax[3].legend()
    present = [s for s in STAGES if s in results]
    for key in ("qa_accuracy_seen", "arith_accuracy", "gold_reward"):
        ax[2].plot(present, [results[s].get(key, float("nan")) for s in present], marker="o", label=key)
    ax[2].set(title="held-out metrics per stage (gold judge)")
    ax[2].legend()
    fig.tight_layout()
    p = out / "stages.png"
    fig.savefig(p, dpi=90)
    made.append(p)
    plt.close(fig)

    curve = results.get("overoptimization")
    if curve:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ax[0].plot(curve["kl"], curve["proxy_reward"], marker="o", label="proxy reward (RM)")
        ax2 = ax[0].twinx()
        ax2.plot(curve["kl"], curve["gold_reward"], marker="s", color="C1", label="gold reward")
        ax[0].set(title="best-of-n against the proxy RM", xlabel="KL(best-of-n || SFT), nats", ylabel="proxy")
        ax2.set_ylabel("gold")
        ax[0].legend(loc="upper left")
        ax2.legend(loc="lower right")
        ax[1].plot(curve["kl"], curve["mean_length"], marker="o")
        ax[1].set(title="length of the picked answer", xlabel="KL, nats", ylabel="tokens")
        fig.tight_layout()
        p = out / "overoptimization.png"
        fig.savefig(p, dpi=90)
        made.append(p)
        plt.close(fig)
    return made


def _table(results: dict) -> list[str]:
    present = [s for s in STAGES if s in results]
    lines = ["| stage | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for s in present:
        cells = [results[s].get(c) for c in COLUMNS]
        lines.append(f"| {s} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
    return lines


def _calibration_and_shift(results: dict) -> list[str]:
    """Calibration per stage (the notes: RLHF models grow over-confident) and the token shift (the notes:
    alignment changes few tokens, mostly where the answer ends)."""
    present = [s for s in STAGES if s in results and "fact_calibration_ece" in results[s]]
    if not present:
        return []
    shift = results.get("token_shift", {})
    lines = ["## Calibration and token shift", "",
             "Calibration: the model's belief over every possible answer (multiple choice, as the GPT-4 report "
             "measures it on MMLU) to the held-out fact questions and, answered without working, the held-out "
             "word problems; accuracy / confidence / ECE. Token shift (Lin et al. "
             "2023): of the stage's greedy answer tokens, the share the base model (or SFT) ranks below third; "
             "`at end` = of the answers' end-of-turn tokens.", "",
             "| stage | facts: acc / conf / ECE | arithmetic: acc / conf / ECE | shifted vs base | at end | shifted vs SFT "
             "| at end | most shifted (vs the stage before) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in present:
        r, sh = results[s], shift.get(s, {})
        cells = [" / ".join(f"{r[f'{family}_{k}']:.3f}" for k in ("option_accuracy", "option_confidence", "calibration_ece"))
                 for family in ("fact", "arith")]
        for key in ("vs_base", "vs_sft"):
            cells += [f"{sh[key]['shifted']:.3f}", f"{sh[key]['shifted_at_end']:.3f}"] if key in sh else ["", ""]
        last = sh.get("vs_sft", sh.get("vs_base"))
        # tokens such as <|im_end|> carry the table's separator
        cells.append(", ".join(f"{t!r} {n}".replace("|", "\\|") for t, n in last["top_shifted"][:5]) if last else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines + [""]


SMOKE_NOTE = ("A smoke run: these figures mean nothing. The smoke preset trains each stage for a few steps only, "
              "to check that the pipeline runs end to end; run --preset tiny or small for figures.")


def write_report(out: Path, results: dict) -> None:
    images = plots(out, results)
    smoke = results["preset"] == "smoke"
    md = [f"# alignkit world run ({results['preset']}, seed {results['seed']})", "",
          *([f"**{SMOKE_NOTE}**", ""] if smoke else []),
          f"Total wall time: {results.get('seconds', 0):.0f} s.", "",
          "## Held-out metrics per stage (gold judge; never-trained prompts)", "", *_table(results), ""]
    if "reward_model" in results:
        md += ["## Reward model (proxy)", "", "| " + " | ".join(results["reward_model"]) + " |",
               "|---" * len(results["reward_model"]) + "|",
               "| " + " | ".join(f"{v:.3f}" for v in results["reward_model"].values()) + " |", ""]
    md += _calibration_and_shift(results)
    if "overoptimization" in results:
        c = results["overoptimization"]
        md += ["## Over-optimisation (best-of-n against the proxy RM)", "", "| n | KL | proxy | gold | length |",
               "|---|---|---|---|---|"]
        md += [f"| {n} | {k:.2f} | {p:.3f} | {g:.3f} | {l:.1f} |" for n, k, p, g, l in
               zip(c["n"], c["kl"], c["proxy_reward"], c["gold_reward"], c["mean_length"])] + [""]
    md += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in results.get("timings", {}).items()] + [""]
    md += ["## The commands (each stage is a normal alignkit command)", "", "```"] + results.get("commands", []) + ["```", ""]
    md += [f"![{p.stem}]({p.name})" for p in images]
    (out / "report.md").write_text("\n".join(md) + "\n")
    body = [f"<h1>alignkit world run ({results['preset']}, seed {results['seed']})</h1>"]
    if smoke:
        body.append(f"<p><strong>{html.escape(SMOKE_NOTE)}</strong></p>")
    body.append(f"<pre>{html.escape(chr(10).join(md[:-len(images)] if images else md))}</pre>")
    for p in images:
        body.append(f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">')
    (out / "report.html").write_text("<!doctype html><meta charset=utf-8><title>alignkit world</title>" + "".join(body))
