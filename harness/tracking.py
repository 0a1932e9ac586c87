"""Metrics: one function, namespaced keys (`search/...`, `pairs/...`, `train/...`, `eval/...`,
`compute/...`), written to `metrics.jsonl` in the run directory and to wandb (offline by default).
With tracking off, only the JSON lines are written.

Each event is logged once: a step (the `round` field: 0 the initial evaluation, k+1 round k) already
in metrics.jsonl is not logged again by a resumed run, only keys it lacks (a new evaluation task of
a finished round); wandb gets the same keys with `step=`."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.rundir import truncate_partial_line, write_jsonl_atomic
from mcts.jsonl import read_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingConfig:
    """The `tracking` config group.

    wandb: log to wandb as well as metrics.jsonl.
    mode: wandb mode: "offline" (default: nothing leaves the machine; `wandb sync` later),
        "online", or "disabled".
    project, entity, group, tags: wandb run fields.
    """

    wandb: bool = True
    mode: str = "offline"
    project: str = "mctsloop"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def logged_keys(path: Path) -> dict[int, set[str]]:
    """The keys metrics.jsonl holds per step ("round"), from the file as it is."""
    out: dict[int, set[str]] = {}
    if not Path(path).is_file():
        return out
    for row in read_jsonl(path, partial_last=True):
        if "round" in row:
            out.setdefault(row["round"], set()).update(k for k in row if k not in ("time", "round"))
    return out


def forget_steps(path: Path, forget: Callable[[int], bool]) -> int:
    """Rewrite metrics.jsonl (atomically) without the lines of the steps `forget` names, so that
    redone rounds are logged afresh (run.on_change=rerun). Returns the lines dropped."""
    path = Path(path)
    if not truncate_partial_line(path):
        return 0
    rows = read_jsonl(path)
    kept = [r for r in rows if "round" not in r or not forget(r["round"])]
    if len(kept) != len(rows):
        write_jsonl_atomic(path, kept)
    return len(rows) - len(kept)


class Tracker:
    """Holds the metrics file and the wandb run (resources), so it is a class."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig, *, run_name: str, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_partial_line(self.path)  # a line half-written by a killed run
        self._logged = logged_keys(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb = None
        if cfg.wandb and cfg.mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self._wandb = wandb.init(
                    project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                    name=run_name, id=_stable_id(run_dir), resume="allow", mode=cfg.mode,
                    dir=str(run_dir), config=config or {},
                )
            except Exception as exc:  # wandb problems must not lose a run
                log.warning("wandb disabled: %s", exc)

    def log(self, metrics: dict[str, Any], *, step: int | None = None) -> None:
        """Append one line (and log to wandb at `step`); at a step already logged, only the keys it
        lacks, and nothing if it lacks none."""
        record = {k: _jsonable(v) for k, v in metrics.items()}
        if step is not None:
            seen = self._logged.setdefault(step, set())
            record = {k: v for k, v in record.items() if k not in seen}
            if not record:
                log.debug("step %d is already in %s: not logged again", step, self.path)
                return
            seen.update(record)
        line = {"time": round(time.time(), 3), **({"round": step} if step is not None else {}), **record}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _stable_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
