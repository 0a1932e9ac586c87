"""The end-of-run report: a summary table per round (summary.md, printed) and a plot of evaluation
accuracy per round with 95% intervals (accuracy.png). summary.md says which command wrote it, when and
at which commit (`provenance`): it is generated, never edited by hand."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from harness.machine import describe, machine_info
from harness.stats import format_difference, outcomes, paired_difference

REPO = Path(__file__).resolve().parent.parent

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
        diff = paired_difference([(outcomes(a), outcomes(b))])
        if diff is not None:
            line += f"; paired on the same {diff['problems']}: {format_difference(diff)}"
        lines.append(line + ")")
    return "\n".join(lines)


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


def command_line() -> str:
    """The command that reproduces this process: inside a Hydra job, the script with the job's own
    overrides (one job of a sweep included); otherwise the process's arguments."""
    script = Path(sys.argv[0])
    if script.is_absolute() and script.is_relative_to(Path.cwd()):
        script = script.relative_to(Path.cwd())
    args = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else sys.argv[1:]
    return shlex.join(["python", str(script), *args])


def git_commit(repo: Path = REPO) -> str | None:
    """The checked-out commit (short), with "+uncommitted" when tracked files differ from it; None
    outside a git checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+uncommitted" if dirty else "")


def provenance(command: str | None = None, *, now: datetime | None = None, commit: str | None = None) -> str:
    """The line under a summary's title: the command that wrote it, the date (UTC) and the commit."""
    now = now or datetime.now(timezone.utc)
    commit = commit or git_commit()
    return (f"Written by `{command or command_line()}` on {now:%Y-%m-%d %H:%M} UTC at "
            f"{f'commit {commit}' if commit else 'an unknown commit (no git checkout)'} "
            f"(harness/report.py; regenerate it, do not edit it).")


def write_report(run_dir: Path, history: list[dict], *, command: str | None = None) -> str:
    """Write summary.md and accuracy.png into `run_dir` from the per-round `history`; returns the text.
    `command`: the command that produced the run (default: this process's, `command_line`)."""
    table = summary_table(history)
    delta = changes(history)
    text = (f"# Run {Path(run_dir).name}\n\n{provenance(command)}\n\nMachine: {describe(machine_info())} "
            f"(greedy bf16 results are comparable only on the same kind: docs/resume.md)\n\n{table}\n")
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
