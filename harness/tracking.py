"""Metrics: one function, namespaced keys (`search/...`, `pairs/...`, `train/...`, `eval/...`,
`compute/...`), written to `metrics.jsonl` in the run directory and to wandb (offline by default).
With tracking off, only the JSON lines are written."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class Tracker:
    """Holds the metrics file and the wandb run (resources), so it is a class."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig, *, run_name: str, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        record = {k: _jsonable(v) for k, v in metrics.items()}
        line = {"time": round(time.time(), 3), **({"round": step} if step is not None else {}), **record}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _stable_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
