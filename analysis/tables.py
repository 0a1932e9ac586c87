"""PREFIX.md: the tables of an analysis' summary (analysis.summary), one section per kind of result."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from analysis.stats import Band


def _cell(b: Mapping[str, Any] | None, scale: float = 1.0, spec: str = ".1f") -> str:
    if not b:
        return "-"
    return Band(**b).fmt(scale, spec)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(summary: Mapping[str, Any], plots: Sequence[Path]) -> str:
    tasks = summary["tasks"]
    parts = ["# Analysis", "",
             "Mean over seeds with a 95% band in brackets: a t-interval over seeds when a group has two or "
             "more, else the run's 95% Wilson interval (accuracy) or none. Accuracies in %; pair quality = "
             "share of chosen steps on a path to a correct answer / of rejected steps on none.", ""]
    named = [g for g in summary["groups"] if g["label"] != g.get("config_label", g["label"])]
    if named:
        parts += ["## Groups", "", _table(["group", "differs in", "runs"],
                                          [[g["label"], g["config_label"], str(len(g["runs"]))] for g in named]), ""]
    iterate = [g for g in summary["groups"] if g["kind"] == "iterate"]
    if iterate:
        head = ["group", "seeds", "point", "cum. FLOPs", *[f"{t} acc" for t in tasks], "pairs", "pairs/tree",
                "chosen good", "rejected good", "search tok/problem", "train loss", "reward margin"]
        rows = []
        for g in iterate:
            for p in g["points"]:
                rows.append(
                    [
                        g["label"],
                        ",".join(map(str, g["seeds"])),
                        p["label"],
                        _cell(p["cumulative_flops"], 1.0, ".3g"),
                        *[_cell(p["accuracy"].get(t), 100.0) for t in tasks],
                        _cell(p["pairs"], 1.0, ".1f"),
                        _cell(p["pairs_per_tree"], 1.0, ".2f"),
                        _cell(p["chosen_on_correct_path"], 100.0),
                        _cell(p["rejected_off_correct_path"], 100.0),
                        _cell(p["search_tokens_per_problem"], 1.0, ".0f"),
                        _cell(p["train_final_loss"], 1.0, ".3f"),
                        _cell(p["train_reward_margin"], 1.0, ".3f"),
                    ]
                )
        parts += ["## Rounds", "", _table(head, rows), ""]
        q_rows = [
            [
                g["label"],
                ",".join(map(str, g["seeds"])),
                p["label"],
                _cell(p["q_ranked_pairs_per_tree"], 1.0, ".2f"),
                _cell(p["q_ranked_chosen_good"], 100.0),
                _cell(p["q_ranked_rejected_good"], 100.0),
                _cell(p["q_ranked_informed"], 100.0),
                _cell(p["q_ranked_informed_chosen_good"], 100.0),
                _cell(p["q_ranked_informed_random"], 100.0),
            ]
            for g in iterate
            for p in g["points"]
            if p.get("q_ranked_pairs_per_tree")
        ]
        if q_rows:
            parts += ["## Q-ranked pairs from the same trees", "",
                      "The pairs MCTS-DPO's extraction (highest- against lowest-Q child, one step, the run's margin) "
                      "would take from the same trees, and their quality: how far the search's values can be trusted. "
                      "'informed': share of those pairs at a node where some child lies on a path to a correct answer "
                      "(elsewhere every child is wrong); there, how often the chosen child is on such a path, against "
                      "a child picked at random.",
                      "", _table(["group", "seeds", "point", "pairs/tree", "chosen good", "rejected good", "informed",
                                  "informed: chosen good", "informed: random"], q_rows), ""]
        s_rows = [[g["label"], ",".join(map(str, g["seeds"])), p["label"], _cell(p.get("pair_depth"), 1.0, ".2f"),
                   _cell(p.get("pairs_at_root"), 100.0, ".0f"), _cell(p.get("chosen_steps"), 1.0, ".2f"),
                   _cell(p.get("rejected_steps"), 1.0, ".2f"),
                   *[_cell((p.get("answer_tokens") or {}).get(t), 1.0, ".1f") for t in tasks],
                   *[_cell((p.get("run_on") or {}).get(t), 100.0, ".0f") for t in tasks],
                   *[_cell((p.get("first_answer_accuracy") or {}).get(t), 100.0) for t in tasks]]
                  for g in iterate for p in g["points"]]
        if any(c != "-" for r in s_rows for c in r[3:]):
            parts += ["## Pairs and answers", "",
                      "Where the pairs branch (pair depth: steps already in the prompt; at root: pairs whose prompt is "
                      "the question alone), how many steps their chosen and rejected sides have, and how long the "
                      "evaluated policy's answers are (generated tokens per evaluation problem) and how many of them "
                      "run on (%): go on after the line that first states their answer, where the search's terminal "
                      "step ends (the grader takes the last answer stated). At first answer: the accuracy had each "
                      "answer been graded at that line, what run-ons cost or gained. A source whose chosen sides are "
                      "longer than its rejected ones teaches longer answers.",
                      "", _table(["group", "seeds", "point", "pair depth", "at root (%)", "chosen steps",
                                  "rejected steps", *[f"{t} tok/answer" for t in tasks],
                                  *[f"{t} run-on (%)" for t in tasks],
                                  *[f"{t} at first answer" for t in tasks]], s_rows), ""]
    evaluate = [g for g in summary["groups"] if g["kind"] == "evaluate"]
    if evaluate:
        head = ["group", "seeds", "task", "mode", "k", "simulations", "accuracy", "train FLOPs", "inference FLOPs"]
        rows = [
            [
                g["label"],
                ",".join(map(str, g["seeds"])),
                e["task"],
                e["mode"],
                str(e["k"] or "-"),
                str(e["simulations"] or "-"),
                _cell(e["accuracy"], 100.0),
                _cell(e["train_flops"], 1.0, ".3g")
                if e["train_flops"]
                else ("0" if e["train_flops"] is not None else "unknown"),
                _cell(e["inference_flops"], 1.0, ".3g"),
            ]
            for g in evaluate
            for e in [g["evaluation"]]
        ]
        parts += ["## Inference-time runs (evaluate.py)", "", _table(head, rows), ""]
    if summary.get("paired"):
        rows = [
            [
                f"{d['other']} − {d['base']}",
                d["point"],
                d["task"],
                ",".join(map(str, d["seeds"])),
                str(d["problems"]),
                f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
                ", ".join(f"{100 * x:+.0f}" for x in d["per_seed"]),
                f"{d['other_only']} / {d['base_only']}",
            ]
            for d in summary["paired"]
        ]
        parts += ["## Paired differences", "",
                  "Accuracy of one group minus another's on the same evaluation problems, for the seeds both ran "
                  "(points; each problem's difference averaged over the seeds, 95% interval over problems). "
                  "Comparing the same problems cancels their difficulty, so these intervals are much narrower than "
                  "the per-group bands above; they do not cover training-seed spread beyond the seeds shown "
                  "('per seed'). 'right only in': (seed, problem) cases answered right by the first / by the second "
                  "group only.", "",
                  _table(["difference", "point", "task", "seeds", "problems", "difference (pts)", "per seed",
                          "right only in first / second"], rows), ""]
    c = summary["checks"]
    lines = []
    if c["search_tokens_per_problem"]:
        lines.append("Generated search tokens per problem: " + "; ".join(
            f"{k}: {v:.0f}" for k, v in c["search_tokens_per_problem"].items())
            + (f" (max/min {c['token_ratio_max_min']:.2f})" if c["token_ratio_max_min"] else ""))
    for rnd, s in c["pairs_per_round"].items():
        if s["runs"] < 2:
            continue
        verdict = "the same pairs" if s["distinct_pair_sets"] == 1 else f"{s['distinct_pair_sets']} different pair sets"
        lines.append(f"{rnd}: {s['runs']} runs trained on {verdict}")
    if lines:
        parts += ["## Checks", "", *[f"- {x}" for x in lines], ""]
    if plots:
        parts += ["## Plots", "", *[f"- {p.name}" for p in plots], ""]
    return "\n".join(parts)
