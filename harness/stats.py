"""Statistics shared by the run summary (harness/report.py) and the analysis package (experiments/):
paired accuracy differences on the same problems with a 95% interval."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard tables); the normal's beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
Z975 = 1.96


def t_quantile(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else Z975


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean of `values` and the half-width of its 95% Student t-interval (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n - 1) * sd / math.sqrt(n)


def paired_difference(seeds: Sequence[tuple[Mapping[str, bool], Mapping[str, bool]]]) -> dict[str, Any] | None:
    """Accuracy difference other - base from per-seed (base outcomes, other outcomes) on the problems
    both answered: each problem's difference is averaged over the seeds that have it, then the mean
    over problems gets a 95% interval over problems (t, or normal from 30 problems on). Comparing the
    same problems cancels their difficulty, so the interval is far narrower than two accuracies'
    own; it covers the draw of problems, and the seeds' spread only through their average (see
    `per_seed`). None when no problem is shared."""
    by_problem: dict[str, list[int]] = {}
    per_seed, other_only, base_only = [], 0, 0
    for base, other in seeds:
        shared = sorted(set(base) & set(other))
        if not shared:
            continue
        diffs = [int(other[p]) - int(base[p]) for p in shared]
        per_seed.append(sum(diffs) / len(diffs))
        other_only += diffs.count(1)
        base_only += diffs.count(-1)
        for p, d in zip(shared, diffs):
            by_problem.setdefault(p, []).append(d)
    if not by_problem:
        return None
    values = [sum(ds) / len(ds) for ds in by_problem.values()]
    n = len(values)
    mean, half = t_interval(values)
    return {"problems": n, "diff": mean, "low": mean - half, "high": mean + half, "per_seed": tuple(per_seed),
            "other_only": other_only, "base_only": base_only}


def significance(diff: Mapping[str, Any]) -> str:
    """One word for a paired difference: whether its 95% interval excludes zero, and on which side."""
    if diff["low"] > 0:
        return "significant gain"
    if diff["high"] < 0:
        return "significant loss"
    return "within the noise"


def outcomes(result: Mapping[str, Any]) -> dict[str, bool]:
    """problem id -> answered correctly, from one task's evaluation result (eval.json's records)."""
    return {str(r["id"]): bool(r["correct"]) for r in result.get("records") or [] if "id" in r}


def format_difference(diff: Mapping[str, Any]) -> str:
    """A paired difference in points with its 95% interval and its `significance`:
    "+8.7 [+3.6, +13.7], significant gain"."""
    return (f"{100 * diff['diff']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}], "
            f"{significance(diff)}")
