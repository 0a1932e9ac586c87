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


ROUND0_SEARCH_FILES = ("trees.jsonl", "search.json", "pairs.jsonl")
"""What `copy_round0_search` copies from round_0: the finished search and its pairs."""


def copy_round0_search(source: Path, run_dir: Path, *, must_match: dict[str, Any]) -> list[str]:
    """Copy a finished run's initial evaluation and round-0 search (trees, search.json, pairs) into
    `run_dir` where they are missing, so that this run resumes from them and only trains and
    evaluates: runs given the same source train on the same pairs by construction.

    `must_match`: resolved config values (dotted keys) the source's config.yaml must hold too (the
    task, the problems per round, the pair extraction); a difference, a missing source or an
    unfinished round-0 search raise ValueError naming it. Returns the paths copied (relative)."""
    import shutil

    from omegaconf import OmegaConf

    source = Path(source)
    if source.resolve() == Path(run_dir).resolve():
        return []  # the source run itself (the first job of a sweep whose other jobs copy from it)
    config_path = source / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"run.search_from={source}: no config.yaml there (not a run directory)")
    missing = [f"round_0/{n}" for n in ROUND0_SEARCH_FILES if not (source / "round_0" / n).is_file()]
    if missing:
        raise ValueError(f"run.search_from={source}: its round-0 search is not finished ({', '.join(missing)} missing)")
    config = OmegaConf.load(config_path)

    def lookup(key: str) -> Any:
        value = OmegaConf.select(config, key, default=None)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    differ = [f"{k}: {lookup(k)!r} there, {v!r} here" for k, v in must_match.items() if lookup(k) != v]
    if differ:
        raise ValueError(f"run.search_from={source}: its config differs: " + "; ".join(differ))
    copied = []
    for rel in ["initial/eval.json", *(f"round_0/{n}" for n in ROUND0_SEARCH_FILES)]:
        src, dst = source / rel, Path(run_dir) / rel
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.copy")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            copied.append(rel)
    return copied
