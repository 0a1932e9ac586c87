"""Means over repeats (seeds) with a 95% band. The t-interval and the paired differences on the same
problems are the project's own (harness/stats.py, shared with the run summary)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from harness.stats import t_interval


@dataclass(frozen=True)
class Band:
    """A mean over repeats with a 95% band; method "t" (over seeds), "wilson" (one run), "none"."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    def fmt(self, scale: float = 1.0, spec: str = ".1f") -> str:
        if self.method == "none":
            return format(self.mean * scale, spec)
        return (
            f"{format(self.mean * scale, spec)} [{format(self.low * scale, spec)}, {format(self.high * scale, spec)}]"
        )


def mean_band(values: Sequence[float]) -> Band | None:
    """Mean with a 95% t-interval (Student) over `values`; a single value gets a zero-width band."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    mean, half = t_interval(vals)
    if len(vals) < 2:
        return Band(mean, mean, mean, 1, "none")
    return Band(mean, mean - half, mean + half, len(vals), "t")


def accuracy_band(points: Sequence) -> Band | None:
    """Accuracy over seeds (analysis.load.EvalPoint: accuracy, ci95): t-interval (clipped to [0, 1])
    from two seeds on, else the run's Wilson interval."""
    if not points:
        return None
    if len(points) == 1:
        p = points[0]
        return Band(p.accuracy, p.ci95[0], p.ci95[1], 1, "wilson")
    b = mean_band([p.accuracy for p in points])
    return Band(b.mean, max(0.0, b.low), min(1.0, b.high), b.n, b.method)


def cumulative(values: Iterable[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out
