"""The numbers of an analysis (JSON-able, PREFIX.json): per group, each point (initial, after each
round) summarized over its seeds with 95% bands, evaluate.py groups, the paired differences between
iterate groups on the same problems (harness.stats.paired_difference) and the checks the experiments
rely on."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from analysis.groups import Group, canonical
from analysis.load import Point, point_flops
from analysis.stats import Band, accuracy_band, mean_band
from harness.stats import paired_difference


@dataclass(frozen=True)
class PairedDiff:
    """Accuracy of `other` minus `base` on the same evaluation problems, for the seeds both have.

    diff, low, high: the mean over problems of each problem's difference (1 right, 0 wrong; averaged
    over the seeds) with a 95% interval over problems; per_seed: the plain difference of each seed;
    other_only / base_only: (seed, problem) cases right only in `other` / only in `base`."""

    base: str
    other: str
    point: str
    task: str
    seeds: tuple
    problems: int
    diff: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    other_only: int
    base_only: int


def band_dict(b: Band | None) -> dict[str, Any] | None:
    return None if b is None else asdict(b)


def eval_tasks(groups: Sequence[Group]) -> list[str]:
    names = {t for g in groups for r in g.runs for p in r.points for t in p.evals}
    names |= {e.task for g in groups for r in g.runs for e in r.evals}
    return sorted(names)


def _share_band(points: Sequence[Point], attr: str, which: str = "quality") -> Band | None:
    found = [getattr(p, which) for p in points]
    return mean_band([getattr(q, attr) for q in found if q is not None and getattr(q, attr) is not None])


def _shape_band(points: Sequence[Point], attr: str) -> Band | None:
    return mean_band([getattr(p.shape, attr) for p in points if p.shape is not None])


def _train_band(points: Sequence[Point], attr: str) -> Band | None:
    return mean_band([getattr(p.train, attr) for p in points if p.train is not None and not p.train.skipped
                      and getattr(p.train, attr) is not None])


def summarize_position(group: Group, position: int, tasks: Sequence[str]) -> dict[str, Any]:
    """One point (initial or after a round) of an iterate group, over its seeds."""
    members = [(r, i) for r in group.runs for i, p in enumerate(r.points) if p.position == position]
    points = [r.points[i] for r, i in members]
    cum = [point_flops(r)[i] for r, i in members]
    rounds = [p for p in points if p.position > 0]
    per_tree = [p.pairs / p.trees for p in rounds if p.pairs is not None and p.trees]
    tokens = [p.search_generated_tokens / p.trees for p in rounds if p.trees]
    return {
        "position": position, "label": points[0].label, "runs": len(points),
        "accuracy": {t: band_dict(accuracy_band([p.evals[t] for p in points if t in p.evals])) for t in tasks},
        "cumulative_flops": band_dict(mean_band(cum)),
        "round_flops": band_dict(mean_band([p.total_flops for p in rounds])),
        "pairs": band_dict(mean_band([p.pairs for p in rounds if p.pairs is not None])),
        "pairs_per_tree": band_dict(mean_band(per_tree)),
        "search_tokens_per_problem": band_dict(mean_band(tokens)),
        "chosen_on_correct_path": band_dict(_share_band(rounds, "chosen_share")),
        "rejected_off_correct_path": band_dict(_share_band(rounds, "rejected_share")),
        "both_good": band_dict(_share_band(rounds, "both_share")),
        "q_ranked_pairs_per_tree": band_dict(mean_band([p.q_ranked.pairs / p.trees for p in rounds
                                                         if p.q_ranked is not None and p.trees])),
        "q_ranked_chosen_good": band_dict(_share_band(rounds, "chosen_share", "q_ranked")),
        "q_ranked_rejected_good": band_dict(_share_band(rounds, "rejected_share", "q_ranked")),
        "q_ranked_informed": band_dict(_share_band(rounds, "informed_share", "q_ranking")),
        "q_ranked_informed_chosen_good": band_dict(_share_band(rounds, "informed_chosen_share", "q_ranking")),
        "q_ranked_informed_random": band_dict(_share_band(rounds, "informed_random_share", "q_ranking")),
        "unmatched_pairs": sum(p.quality.unmatched for p in rounds if p.quality is not None),
        "pair_depth": band_dict(_shape_band(rounds, "mean_depth")),
        "pairs_at_root": band_dict(_shape_band(rounds, "root_share")),
        "chosen_steps": band_dict(_shape_band(rounds, "chosen_steps")),
        "rejected_steps": band_dict(_shape_band(rounds, "rejected_steps")),
        "answer_tokens": {t: band_dict(mean_band([p.evals[t].tokens_per_problem for p in points if t in p.evals
                                                  and p.evals[t].tokens_per_problem is not None])) for t in tasks},
        "run_on": {t: band_dict(mean_band([p.evals[t].run_on_share for p in points if t in p.evals
                                           and p.evals[t].run_on_share is not None])) for t in tasks},
        "first_answer_accuracy": {t: band_dict(mean_band([p.evals[t].first_accuracy for p in points if t in p.evals
                                                          and p.evals[t].first_accuracy is not None])) for t in tasks},
        "train_final_loss": band_dict(_train_band(rounds, "final_loss")),
        "train_reward_margin": band_dict(_train_band(rounds, "reward_margin")),
        "train_reward_accuracy": band_dict(_train_band(rounds, "reward_accuracy")),
        "pairs_digests": sorted({p.pairs_digest for p in rounds if p.pairs_digest}),
    }


def summarize_evaluate(group: Group) -> dict[str, Any]:
    evals = [e for r in group.runs for e in r.evals]
    train = [r.train_flops for r in group.runs]
    known = [t for t in train if t is not None]
    first = evals[0]
    return {
        "task": first.task, "mode": first.mode, "k": first.k,
        "simulations": group.config.get("search.simulations") if first.mode == "mcts" else None,
        "model": group.config.get("model.path") or group.config.get("model.name"),
        "accuracy": band_dict(accuracy_band(evals)),
        "inference_flops": band_dict(mean_band([e.flops for e in evals])),
        "train_flops": band_dict(mean_band(known)) if len(known) == len(train) else None,
    }


def summarize(groups: Sequence[Group]) -> dict[str, Any]:
    tasks = eval_tasks(groups)
    out = []
    for g in groups:
        entry = {
            "label": g.label,
            "config_label": g.config_label,
            "kind": g.kind,
            "diff": dict(g.diff),
            "seeds": g.seeds,
            "runs": [str(r.path) for r in g.runs],
        }
        if g.kind == "iterate":
            positions = sorted({p.position for r in g.runs for p in r.points})
            entry["points"] = [summarize_position(g, pos, tasks) for pos in positions]
        else:
            entry["evaluation"] = summarize_evaluate(g)
        out.append(entry)
    return {
        "tasks": tasks,
        "groups": out,
        "checks": checks(groups),
        "paired": [asdict(d) for d in paired_diffs(groups, tasks)],
    }


def paired_diffs(groups: Sequence[Group], tasks: Sequence[str]) -> list[PairedDiff]:
    """Every two iterate groups (the earlier one as base) after each round, per task: the paired
    accuracy difference over the seeds both groups ran (`paired_difference`). Groups without shared
    seeds or without per-problem records are not compared."""
    iterate = [g for g in groups if g.kind == "iterate"]
    out = []
    for i, base in enumerate(iterate):
        for other in iterate[i + 1:]:
            runs_b = {canonical(r.seed): r for r in base.runs}
            shared = [(runs_b[canonical(r.seed)], r) for r in other.runs if canonical(r.seed) in runs_b]
            positions = sorted({p.position for _, r in shared for p in r.points if p.position > 0})
            for pos in positions:
                for task in tasks:
                    per_seed, seeds = [], []
                    for rb, ro in shared:
                        pb = next((p for p in rb.points if p.position == pos), None)
                        po = next((p for p in ro.points if p.position == pos), None)
                        if pb and po and task in pb.evals and task in po.evals:
                            per_seed.append((pb.evals[task].outcomes, po.evals[task].outcomes))
                            seeds.append(ro.config.get("run.seed"))
                    d = paired_difference(per_seed)
                    if d is not None:
                        out.append(PairedDiff(base=base.label, other=other.label, point=f"round {pos - 1}", task=task,
                                              seeds=tuple(seeds), **d))
    return out


def checks(groups: Sequence[Group]) -> dict[str, Any]:
    """Facts the experiments rely on: search tokens per problem per group (budget matching of pair
    sources) and, per round, whether all iterate runs trained on the same pairs."""
    iterate = [g for g in groups if g.kind == "iterate"]
    tokens = {}
    for g in iterate:
        rounds = [p for r in g.runs for p in r.points if p.position > 0 and p.trees]
        b = mean_band([p.search_generated_tokens / p.trees for p in rounds])
        if b is not None:
            tokens[g.label] = b.mean
    same = {}
    positions = sorted({p.position for g in iterate for r in g.runs for p in r.points if p.position > 0})
    for pos in positions:
        digests = [p.pairs_digest for g in iterate for r in g.runs for p in r.points
                   if p.position == pos and p.pairs_digest]
        if digests:
            same[f"round {pos - 1}"] = {"runs": len(digests), "distinct_pair_sets": len(set(digests))}
    ratio = max(tokens.values()) / min(tokens.values()) if tokens and min(tokens.values()) > 0 else None
    return {"search_tokens_per_problem": tokens, "token_ratio_max_min": ratio, "pairs_per_round": same}
