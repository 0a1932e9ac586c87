"""The end-of-run report: a summary table per round (summary.md, printed) and a plot of evaluation
accuracy per round with 95% intervals (accuracy.png)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness.stats import paired_difference, significance

log = logging.getLogger(__name__)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(history: list[dict]) -> str:
    tasks = sorted({name for h in history for name in h.get("eval", {})})
    head = ["round", "trees", "solved", "pairs", "train loss", "reward margin",
            *[f"{t} acc" for t in tasks], "gen tokens", "FLOPs (cum.)"]
    rows = [head, ["---"] * len(head)]
    for h in history:
        search = h.get("search") or {}
        train = h.get("train") or {}
        ev = h.get("eval", {})
        rows.append([
            str(h["round"]), _fmt(search.get("trees"), "d"), _fmt(search.get("solved"), "d"),
            _fmt((h.get("pairs") or {}).get("count"), "d"), _fmt(train.get("final_loss"), ".3f"),
            _fmt(train.get("reward_margin"), ".3f"),
            *[(f"{100 * ev[t]['accuracy']:.1f}%" if t in ev else "-") for t in tasks],
            _fmt((search.get("compute") or {}).get("generated_tokens"), "d"), _fmt(h.get("cumulative_flops"), ".3g"),
        ])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def changes(history: list[dict]) -> str:
    """What changed between the first and the last evaluation, per task."""
    evals = [h for h in history if h.get("eval")]
    if len(evals) < 2:
        return ""
    first, last = evals[0], evals[-1]
    lines = []
    for name in sorted(set(first["eval"]) & set(last["eval"])):
        a, b = first["eval"][name], last["eval"][name]
        line = (f"{name}: {100 * a['accuracy']:.1f}% -> {100 * b['accuracy']:.1f}% "
                f"({100 * (b['accuracy'] - a['accuracy']):+.1f} points; {b['n']} problems")
        diff = paired_difference([(_outcomes(a), _outcomes(b))])
        if diff is not None:
            line += (f"; paired on the same {diff['problems']}: {100 * diff['diff']:+.1f} "
                     f"[{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}], {significance(diff)}")
        lines.append(line + ")")
    return "\n".join(lines)


def _outcomes(result: dict) -> dict[str, bool]:
    """problem id -> correct, from an evaluation's records."""
    return {str(r["id"]): bool(r["correct"]) for r in result.get("records") or [] if "id" in r}


def flipped_examples(history: list[dict], limit: int = 2) -> str:
    """A few problems the first evaluation got wrong and the last got right (greedy outputs shown),
    and how many flipped each way, per task."""
    evals = [h for h in history if h.get("eval")]
    if len(evals) < 2:
        return ""
    first, last = evals[0]["eval"], evals[-1]["eval"]
    out = []
    for name in sorted(set(first) & set(last)):
        before = {r["id"]: r for r in first[name].get("records", [])}
        after = {r["id"]: r for r in last[name].get("records", [])}
        common = [i for i in after if i in before]
        fixed = [i for i in common if after[i]["correct"] and not before[i]["correct"]]
        broken = [i for i in common if before[i]["correct"] and not after[i]["correct"]]
        if not common:
            continue
        out.append(f"{name}: {len(fixed)} problems newly solved, {len(broken)} newly failed")
        for i in fixed[:limit]:
            b, a = before[i], after[i]
            out.append(f"  [{i}] {a['question']}  (gold {a['gold']})")
            if "output" in b and "output" in a:
                out.append("    before: " + " / ".join(b["output"].strip().splitlines()))
                out.append("    after:  " + " / ".join(a["output"].strip().splitlines()))
    return "\n".join(out)


def plot_accuracy(history: list[dict], path: Path) -> bool:
    evals = [h for h in history if h.get("eval")]
    if not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tasks = sorted({name for h in evals for name in h["eval"]})
    labels = ["initial" if h["round"] == "initial" else f"after {h['round']}" for h in evals]
    for name in tasks:
        xs, ys, lo, hi = [], [], [], []
        for i, h in enumerate(evals):
            if name in h["eval"]:
                r = h["eval"][name]
                xs.append(i)
                ys.append(100 * r["accuracy"])
                lo.append(100 * (r["accuracy"] - r["ci95"][0]))
                hi.append(100 * (r["ci95"][1] - r["accuracy"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(evals)), labels)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%), 95% Wilson CI")
    ax.set_title("Evaluation accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(run_dir: Path, history: list[dict]) -> str:
    table = summary_table(history)
    delta = changes(history)
    text = f"# Run {Path(run_dir).name}\n\n{table}\n"
    if delta:
        text += f"\nWhat changed (first -> last evaluation):\n{delta}\n"
    flips = flipped_examples(history)
    if flips:
        text += f"\nPer problem (first -> last evaluation):\n{flips}\n"
    plotted = plot_accuracy(history, Path(run_dir) / "accuracy.png")
    if plotted:
        text += f"\nPlot: {Path(run_dir) / 'accuracy.png'}\n"
    (Path(run_dir) / "summary.md").write_text(text)
    return text
