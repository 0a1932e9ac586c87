"""The plots of an analysis (matplotlib, PNG): accuracy per round against cumulative FLOPs (rounds),
pair yield and quality against the search budget (search), training loss and reward curves (loss),
and accuracy against training + inference FLOPs (compare); `wanted` says which the runs support."""

from __future__ import annotations

import logging
import math
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from analysis.groups import Group, short_value
from analysis.load import REWARD_CURVES, training_flops_at
from analysis.stats import Band, accuracy_band, mean_band

log = logging.getLogger("analyze")

KINDS = ("auto", "rounds", "search", "loss", "compare")
SEARCH_KEYS = ("search.simulations", "search.breadth", "search.breadth_root")
LOSS_KEYS = ("train.loss_type", "train.loss_weights", "train.conservative")
"""A difference in these keys between groups makes `wanted` draw the search / loss plots."""
LOSS_PANEL_COLUMNS = 4


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, count: int, width: float = 5.0, height: float = 3.8, columns: int = 4):
    """`count` panels in rows of at most `columns`; unused cells hidden."""
    cols = min(count, columns)
    rows = math.ceil(count / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    axes = [ax for row in grid for ax in row]
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _save(fig, plt, path: Path, *, legend: bool = False) -> Path:
    """Save (one legend for the figure below the panels when `legend`) and close."""
    if legend:
        handles, labels = {}, []
        for ax in fig.axes:
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in handles:
                    handles[label] = h
                    labels.append(label)
        if labels:
            ncol = 1 if max(map(len, labels)) > 60 else 2
            width, height = fig.get_size_inches()  # room for the legend rows below the panels
            fig.set_size_inches(
                width, height + 0.16 * math.ceil(len(labels) / ncol) * (1 + max(map(len, labels)) // 150)
            )
            fig.legend([handles[x] for x in labels], [textwrap.fill(x, 150) for x in labels],
                       loc="outside lower center", fontsize=7, ncol=ncol)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _line(ax, xs, bands: Sequence[Mapping[str, Any]], label: str, scale: float = 100.0) -> None:
    ys = [b["mean"] * scale for b in bands]
    line, = ax.plot(xs, ys, marker="o", label=label)
    ax.fill_between(xs, [b["low"] * scale for b in bands], [b["high"] * scale for b in bands],
                    color=line.get_color(), alpha=0.2, linewidth=0)


def plot_rounds(summary: Mapping[str, Any], path: Path) -> Path | None:
    """(a) Held-out accuracy per round against cumulative FLOPs, one panel per task."""
    groups = [g for g in summary["groups"] if g["kind"] == "iterate"]
    if not groups or not summary["tasks"]:
        return None
    plt = _pyplot()
    fig, axes = _panels(plt, len(summary["tasks"]))
    for ax, task in zip(axes, summary["tasks"]):
        for g in groups:
            pts = [p for p in g["points"] if p["accuracy"].get(task)]
            _line(ax, [p["cumulative_flops"]["mean"] for p in pts], [p["accuracy"][task] for p in pts],
                  f"{g['label']} (n={len(g['seeds'])})")
        ax.set_title(task)
        ax.set_xlabel("cumulative FLOPs (search + train + eval)", fontsize=8)
        ax.set_ylabel("accuracy (%), 95% band")
        ax.grid(alpha=0.3)
    fig.suptitle("Held-out accuracy after each round (first point: initial policy)")
    return _save(fig, plt, path, legend=True)


SEARCH_METRICS = (("pairs_per_tree", "pairs per tree (the run's)", 1.0, None),
                  ("chosen_on_correct_path", "chosen on a correct path (%)", 100.0, None),
                  ("rejected_off_correct_path", "rejected on none (%)", 100.0, None),
                  ("search_tokens_per_problem", "search tokens per problem", 1.0, None),
                  ("q_ranked_pairs_per_tree", "Q-ranked pairs per tree", 1.0, None),
                  ("q_ranked_chosen_good", "Q-ranked: chosen on a correct path (%)", 100.0, None),
                  ("q_ranked_informed", "Q-ranked: at a node with a correct child (%)", 100.0, None),
                  ("q_ranked_informed_chosen_good", "there: chosen on a correct path (%),\ndashed: a random child",
                   100.0, "q_ranked_informed_random"))
"""Panels of PREFIX_search.png: summary key, title, scale, and a key drawn dashed in the same panel
(a baseline). A panel whose values are all equal (e.g. 100% by construction) is left out."""


def search_series(
    groups: Sequence[Group], summary: Mapping[str, Any]
) -> dict[str, list[tuple[float, Mapping[str, Any]]]]:
    """Round 0 of each iterate group that searches, keyed by the values of its other differing keys:
    [(search.simulations, summarized point)]. Groups that do not search (the sampling pair source)
    are left out."""
    series: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for g, s in zip(groups, summary["groups"]):
        if g.kind != "iterate" or "search.simulations" not in g.config:
            continue
        first = next((p for p in s["points"] if p["position"] == 1), None)
        if first is None:
            continue
        rest = ", ".join(f"{k}={short_value(k, v)}" for k, v in g.diff.items() if k != "search.simulations") or "all"
        series.setdefault(rest, []).append((g.config["search.simulations"], first))
    return series


def plot_search(groups: Sequence[Group], summary: Mapping[str, Any], path: Path) -> Path | None:
    """(b) Pair yield and quality of the first round against search.simulations, one line per value of
    the other swept keys (`search_series`)."""
    series = search_series(groups, summary)
    if not series:
        return None

    def values(key: str) -> set[float]:
        return {round(p[key]["mean"], 9) for pts in series.values() for _, p in pts if p.get(key)}

    metrics = [m for m in SEARCH_METRICS if len(values(m[0])) > 1 or (m[3] and len(values(m[3])) > 1)]
    if not metrics:
        return None
    plt = _pyplot()
    fig, axes = _panels(plt, len(metrics), width=4.2)
    for ax, (key, title, scale, baseline) in zip(axes, metrics):
        for label, pts in series.items():
            pts = sorted(((x, p) for x, p in pts if p.get(key)), key=lambda xp: xp[0])
            if pts:
                _line(ax, [x for x, _ in pts], [p[key] for _, p in pts], label, scale)
                if baseline:
                    ax.plot([x for x, _ in pts], [p[baseline]["mean"] * scale if p.get(baseline) else float("nan")
                                                  for _, p in pts], linestyle="--", color=ax.lines[-1].get_color())
        if all(x > 0 for pts in series.values() for x, _ in pts):
            ax.set_xscale("log", base=2)
        ax.set_xlabel("search.simulations")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Round 0: pairs and pair quality against search budget (constant panels left out)")
    return _save(fig, plt, path, legend=True)


def plot_loss(groups: Sequence[Group], path: Path) -> Path | None:
    """(c) Training loss at each logged step, one panel per group, one line per seed and round."""
    entries = [g for g in groups if g.kind == "iterate"
               and any(p.train and p.train.loss_history for r in g.runs for p in r.points)]
    if not entries:
        return None
    plt = _pyplot()
    fig, axes = _panels(plt, len(entries), width=3.8, height=3.4, columns=LOSS_PANEL_COLUMNS)
    for ax, g in zip(axes, entries):
        for r in g.runs:
            for p in r.points:
                if p.train and p.train.loss_history:
                    ax.plot(range(1, len(p.train.loss_history) + 1), p.train.loss_history, marker=".",
                            label=f"seed {r.config.get('run.seed')}, {p.label}")
        ax.set_title(textwrap.fill(g.label, 45), fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, plt, path)


def plot_rewards(groups: Sequence[Group], path: Path) -> Path | None:
    """(c) Reward curves: TRL's reward margin, reward accuracy and chosen/rejected rewards (beta x
    log-ratio to the reference) at every logged step of round 0's training, one panel per curve, one
    line per group (mean over seeds of equal length). Unlike the loss, these mean the same for every
    loss type, so the loss variants share the axes."""
    def series(g: Group, name: str) -> list[float]:
        runs = [getattr(p.train, name) for r in g.runs for p in r.points
                if p.position == 1 and p.train and getattr(p.train, name)]
        if not runs:
            return []
        n = min(len(h) for h in runs)
        return [sum(h[i] for h in runs) / len(runs) for i in range(n)]

    entries = [g for g in groups if g.kind == "iterate" and series(g, "margin_history")]
    if not entries:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(REWARD_CURVES), figsize=(3.6 * len(REWARD_CURVES), 3.4), squeeze=False,
                             layout="constrained")
    for ax, (name, title) in zip(axes[0], REWARD_CURVES):
        for g in entries:
            ys = series(g, name)
            ax.plot(range(1, len(ys) + 1), ys, marker=".", label=g.label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("logged step (round 0)")
        ax.grid(alpha=0.3)
    fig.suptitle("Reward curves per group (beta x log-ratio to the reference; mean over seeds)")
    return _save(fig, plt, path, legend=True)


def plot_loss_summary(summary: Mapping[str, Any], path: Path) -> Path | None:
    """(c) Per group (horizontal bars, 95% bands): the last round's final reward margin and reward
    accuracy, and held-out accuracy after the last round."""
    groups = [g for g in summary["groups"] if g["kind"] == "iterate" and len(g["points"]) > 1]
    if not groups:
        return None
    metrics = [
        ("train_reward_margin", "reward margin (final)", 1.0),
        ("train_reward_accuracy", "reward accuracy (final)", 1.0),
    ]
    metrics += [(f"accuracy:{t}", f"{t} accuracy (%)", 100.0) for t in summary["tasks"]]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 3, 0.45 * len(groups) + 1.5),
                             sharey=True, squeeze=False, layout="constrained")
    ys = list(range(len(groups)))
    for ax, (key, title, scale) in zip(axes[0], metrics):
        last = [g["points"][-1] for g in groups]
        bands = [p["accuracy"].get(key.split(":", 1)[1]) if key.startswith("accuracy:") else p.get(key) for p in last]
        means = [b["mean"] * scale if b else float("nan") for b in bands]
        err = [[(b["mean"] - b["low"]) * scale if b else 0.0 for b in bands],
               [(b["high"] - b["mean"]) * scale if b else 0.0 for b in bands]]
        ax.barh(ys, means, xerr=err, capsize=3, color="tab:blue", alpha=0.7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(ys, [g["label"] for g in groups], fontsize=7)
    axes[0][0].invert_yaxis()
    return _save(fig, plt, path)


def compare_series(groups: Sequence[Group], task: str) -> list[tuple[str, list[tuple[float, Band, int | None]]]]:
    """(d)'s lines for one task, as (label, [(x, accuracy band, k)]): each iterate group's points (initial,
    after each round) at x = training FLOPs of the policy + its evaluation's inference FLOPs, means over
    seeds; evaluate.py groups joined into one line per (model, mode), ordered by x."""
    lines: list[tuple[str, list[tuple[float, Band, int | None]]]] = []
    for g in groups:
        if g.kind != "iterate":
            continue
        pts = []
        for pos in sorted({p.position for r in g.runs for p in r.points}):
            found = [(training_flops_at(r)[p.position] + p.evals[task].flops, p.evals[task])
                     for r in g.runs for p in r.points if p.position == pos and task in p.evals]
            if found:
                pts.append((mean_band([x for x, _ in found]).mean, accuracy_band([e for _, e in found]), None))
        lines.append((f"{g.label}: rounds ({g.config.get('eval.mode', 'greedy')})", pts))
    merged: dict[str, list[tuple[float, Band, int | None]]] = {}
    for g in groups:
        evals = [(r.train_flops + e.flops, e) for r in g.runs if r.train_flops is not None
                 for e in r.evals if e.task == task] if g.kind == "evaluate" else []
        if not evals:
            continue
        path = g.config.get("model.path")
        model = short_value("model.path", path) if path else f"base {g.config.get('model.name', '')}".strip()
        mode = evals[0][1].mode
        k = evals[0][1].k if mode == "sampling" else g.config.get("search.simulations") if mode == "mcts" else None
        merged.setdefault(f"{model}: {mode}", []).append(
            (mean_band([x for x, _ in evals]).mean, accuracy_band([e for _, e in evals]), k))
    lines += [(name, sorted(pts, key=lambda p: p[0])) for name, pts in merged.items()]
    return lines


def plot_compare(groups: Sequence[Group], tasks: Sequence[str], path: Path) -> Path | None:
    """(d) Accuracy against total FLOPs (training + inference), log x, one panel per task; sampling
    points are marked with k, MCTS points with the simulations."""
    if not any(g.kind == "evaluate" for g in groups):
        return None
    tasks = [t for t in tasks if any(pts for _, pts in compare_series(groups, t))]
    plt = _pyplot()
    fig, axes = _panels(plt, max(1, len(tasks)))
    for ax, task in zip(axes, tasks):
        for label, pts in compare_series(groups, task):
            if not pts:
                continue
            _line(ax, [x for x, _, _ in pts], [asdict(b) for _, b, _ in pts], label)
            for x, b, k in pts:
                if k:
                    ax.annotate(str(k), (x, 100 * b.mean), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("training + inference FLOPs")
        ax.set_ylabel("accuracy (%), 95% band")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Accuracy against training + inference compute (numbers: k or simulations)")
    return _save(fig, plt, path, legend=True)


def wanted(kind: str, groups: Sequence[Group]) -> list[str]:
    """Which plots to draw: the one asked for, or (auto) every one the runs support."""
    if kind != "auto":
        return [kind]
    keys = {k for g in groups if g.kind == "iterate" for k in g.diff}
    out = ["rounds"] if any(g.kind == "iterate" for g in groups) else []
    if keys & set(SEARCH_KEYS):
        out.append("search")
    if keys & set(LOSS_KEYS):
        out.append("loss")
    if any(g.kind == "evaluate" for g in groups):
        out.append("compare")
    return out


def draw(kinds: Sequence[str], groups: Sequence[Group], summary: Mapping[str, Any], prefix: Path) -> list[Path]:
    makers: dict[str, list[Callable[[], Path | None]]] = {
        "rounds": [lambda: plot_rounds(summary, Path(f"{prefix}_rounds.png"))],
        "search": [lambda: plot_search(groups, summary, Path(f"{prefix}_search.png"))],
        "loss": [lambda: plot_loss(groups, Path(f"{prefix}_loss.png")),
                 lambda: plot_rewards(groups, Path(f"{prefix}_rewards.png")),
                 lambda: plot_loss_summary(summary, Path(f"{prefix}_loss_summary.png"))],
        "compare": [lambda: plot_compare(groups, summary["tasks"], Path(f"{prefix}_compare.png"))],
    }
    plots = []
    for kind in kinds:
        made = [p for p in (make() for make in makers[kind]) if p is not None]
        if not made:
            log.warning("--kind %s: the runs hold nothing to plot for it", kind)
        plots += made
    return plots
