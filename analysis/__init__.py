"""Analysis of finished runs (iterate.py run directories, evaluate.py outputs): tables, a JSON file and
plots. Reads run directories only, never a model; `experiments/analyze.py` is its command line and
documents its inputs and outputs.

    from analysis import analyze
    summary = analyze(["runs/source_compare"], Path("experiments/results/source_compare"))

Modules: load (discovering and reading run directories), groups (grouping runs by config, labels),
answers (answer lines of evaluation records, graded with the run's task), pairs (pair quality,
Q-ranked pairs, pair shapes), stats (means over seeds with 95% bands), summary (the JSON numbers),
tables (the markdown), plots (matplotlib).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from analysis.groups import LABELS, group_runs, name_labels
from analysis.load import AnalysisError, load_runs
from analysis.plots import KINDS, draw, wanted
from analysis.summary import summarize
from analysis.tables import markdown
from harness.rundir import write_json_atomic, write_text_atomic

__all__ = ["analyze", "AnalysisError", "KINDS", "LABELS"]


def analyze(args: Sequence[str], out: Path, kind: str = "auto", labels: str = "config") -> dict[str, Any]:
    """Load, group, summarize, plot and write PREFIX.md / PREFIX.json; returns the summary. labels:
    "config" (the config keys that differ between groups) or "names" (the runs' names, `name_labels`)."""
    if kind not in KINDS:
        raise AnalysisError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if labels not in LABELS:
        raise AnalysisError(f"--labels {labels}: expected one of {', '.join(LABELS)}")
    groups = group_runs(load_runs(args))
    if labels == "names":
        groups = name_labels(groups)
    summary = summarize(groups)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = draw(wanted(kind, groups), groups, summary, out)
    summary["plots"] = [str(p) for p in plots]
    write_json_atomic(Path(f"{out}.json"), summary)
    write_text_atomic(Path(f"{out}.md"), markdown(summary, plots))
    return summary
