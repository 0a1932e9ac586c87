"""The project's one JSON-lines reader: trees, pairs, problem files and metrics all go through it.

In `mcts/` (which imports nothing of the other packages) so that every package can use it. The
formats themselves are in docs/formats.md; the atomic writers are in harness/rundir.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


def iter_jsonl(path: str | Path, *, error: type[Exception] = ValueError,
               partial_last: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of `path`.

    A line that is not JSON, or not a JSON object, raises `error` naming the file and the line. With
    `partial_last`, a last line that lacks its newline and does not parse (half-written by a crash)
    is dropped with a warning instead."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if partial_last and not line.endswith("\n"):  # only the last line can lack its newline
                    log.warning("%s:%d: dropping a half-written last line (%s)", path, number, exc.msg)
                    return
                raise error(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_jsonl(path: str | Path, *, error: type[Exception] = ValueError,
               partial_last: bool = False) -> list[dict[str, Any]]:
    """Every object of `path` (see `iter_jsonl`)."""
    return [row for _, row in iter_jsonl(path, error=error, partial_last=partial_last)]
