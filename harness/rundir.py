"""The run directory (see the README): paths, atomic writes, and which phases are complete.

runs/<name>/
  config.yaml            resolved config of the latest invocation
  metrics.jsonl          one line per logged event
  summary.md, accuracy.png
  round_<k>/
    trees.jsonl          one tree per line, appended as trees finish
    search.json          written when the round's search is complete (counts, compute)
    pairs.jsonl          written atomically once all pairs are extracted
    policy/              the trained Hugging Face checkpoint (renamed into place when complete)
    train.json           training result (loss, margins, tokens)
    eval.json            evaluation results per task
    compute.json         tokens and FLOPs per phase

A phase whose output is complete is never redone on resume.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def truncate_partial_line(path: Path) -> bool:
    """Drop a half-written last line (no trailing newline, left by a crash) so appends stay valid.
    Returns whether the file exists."""
    path = Path(path)
    if not path.is_file():
        return False
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a half-written last line (%d bytes) left by an interrupted run",
                    path, len(data) - keep)
        with path.open("r+b") as f:
            f.truncate(keep)
    return True


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class RoundDir:
    path: Path

    @property
    def trees(self) -> Path:
        return self.path / "trees.jsonl"

    @property
    def search_done(self) -> Path:
        return self.path / "search.json"

    @property
    def pairs(self) -> Path:
        return self.path / "pairs.jsonl"

    @property
    def policy(self) -> Path:
        return self.path / "policy"

    @property
    def train(self) -> Path:
        return self.path / "train.json"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def compute(self) -> Path:
        return self.path / "compute.json"

    def policy_complete(self) -> bool:
        return (self.policy / "config.json").is_file() and self.train.is_file()


def round_dir(run_dir: Path, k: int) -> RoundDir:
    return RoundDir(Path(run_dir) / f"round_{k}")
