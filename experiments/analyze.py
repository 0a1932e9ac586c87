"""Analysis of finished runs: plots (PNG), a markdown table and a JSON file. Reads run directories
only (never a model).

    python experiments/analyze.py runs/source_compare/* --out experiments/results/source_compare
    python experiments/analyze.py runs/search_compute --out experiments/results/search_compute --kind search
    python experiments/analyze.py runs/train_vs_infer runs/eval/train_vs_infer --out experiments/results/train_vs_infer

Inputs: run directories of `iterate.py` (config.yaml, metrics.jsonl, initial/eval.json,
round_<k>/{eval,compute,search,train}.json, pairs.jsonl, trees.jsonl) and output directories of
`evaluate.py` (eval.json + .hydra/config.yaml). An argument may be a run directory, a glob, or a folder
holding run directories at any depth.

Runs are grouped by their resolved config with the seeds (`run.seed`, `backend.seed`), names and
output paths removed: runs of one group differ only in their seeds and count as repeats. A value
is the mean over seeds with a 95% band: a t-interval over seeds when there are at least two, else
the 95% Wilson interval of the single run's evaluation (eval.json's ci95). Groups are labelled by the
config keys whose values differ between groups.

Outputs (`--out PREFIX`): PREFIX.md (tables), PREFIX.json (the same numbers), and the plots that
apply (`--kind auto`) or the one asked for:

- rounds:  PREFIX_rounds.png  held-out accuracy after each round against cumulative FLOPs
           (compute.json total_flops: search + train + eval of each round; the initial point at 0),
           one panel per evaluation task, one line per group.
- search:  PREFIX_search.png  pairs per tree, pair quality, search tokens per tree and the Q-ranked
           pairs' yield and quality (where a correct child exists: chosen right against chance)
           against search.simulations, one line per value of the other swept keys (e.g.
           search.breadth); panels whose values are all equal are left out.
- loss:    PREFIX_loss.png    the training loss at every logged step, one panel per group;
           PREFIX_rewards.png  reward curves (margin, accuracy, chosen, rejected) per step, one line
           per group;
           PREFIX_loss_summary.png  final reward margin, reward accuracy and held-out accuracy.
- compare: PREFIX_compare.png held-out accuracy against total FLOPs (log x): iterate runs after
           0..k rounds evaluated greedily (x = cumulative search + train FLOPs + the evaluation's own
           inference FLOPs) and evaluate.py runs (majority@k, MCTS at test time; x = the evaluated
           model's training FLOPs, when its run directory is known, + inference FLOPs).

Paired differences (`paired_diffs`): every two iterate groups after each round, per task, the
accuracy difference on the same evaluation problems (eval.json's per-problem records) for the seeds
both ran, with a 95% interval over problems; far narrower than the per-group bands, since both sides
answer the same problems.

Pair quality (`pair_quality`): a chosen step is good when it lies on a path to a correct answer (it
or a descendant is a terminal with outcome +1), a rejected step is good when it does not. With
verified pairs (the default) it is 100% by construction, so for MCTS runs the analysis also extracts
the pairs MCTS-DPO's Q-ranked rule would take from the same trees (`q_ranked_pairs`) and reports their
yield and quality: a measure of the search's values (self-evaluation + outcomes).

Malformed inputs raise AnalysisError naming the file; a run with missing rounds is skipped with a
warning.

This script is the command line; the `analysis` package (analysis/) does the work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from analysis import KINDS, LABELS, AnalysisError, analyze  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, globs, or folders holding runs")
    parser.add_argument(
        "--out", required=True, type=Path, help="output prefix: writes PREFIX.md, PREFIX.json, PREFIX_*.png"
    )
    parser.add_argument("--kind", default="auto", choices=KINDS, help="which plot (auto: every one that applies)")
    parser.add_argument(
        "--labels",
        default="config",
        choices=LABELS,
        help="group labels: the config keys that differ (config) or the runs' names without the seed (names)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = analyze(args.runs, args.out, args.kind, args.labels)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = sum(len(g["runs"]) for g in summary["groups"])
    print(f"{runs} runs in {len(summary['groups'])} groups -> {args.out}.md, {args.out}.json"
          + "".join(f", {Path(p).name}" for p in summary["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
