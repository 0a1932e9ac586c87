"""A quiet terminal and a complete log file: the first call of every entry point.

`quiet_console()` runs at the start of iterate.py, evaluate.py and search.py (after Hydra has set up
logging: a console handler and the run's log file, e.g. runs/<name>/iterate.log) and of the training
process (policy/train_main.py, which appends to the same log file, named in LOG_FILE_ENV). Then:

- the terminal shows the project's own log lines and warnings, libraries' errors, and progress bars
  (ours: one per phase); library warnings (Python warnings raised in transformers, TRL, torch, ...,
  deprecation notes wherever raised, library loggers below ERROR) and records logged with
  `extra=FILE_ONLY` go to the log file only;
- library progress bars that are not a phase of ours (transformers' "Loading weights" and "Writing
  model shards", GGUF conversion, datasets' map) are off, in this process and its children;
- torch's C++ warnings (vLLM's NUMA binding line) are off in child processes (TORCH_CPP_LOG_LEVEL).

An environment variable the user set wins over every default here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

LOG_FILE_ENV = "MCTSLOOP_LOG_FILE"
"""The log file a child process appends to (set by the parent's quiet_console)."""

FILE_ONLY = {"console": False}
"""`log.info(..., extra=FILE_ONLY)`: the record goes to the log file, not the terminal."""

OWN_PACKAGES = frozenset({"iterate", "evaluate", "search", "harness", "mcts", "policy", "tasks", "tools",
                          "analysis", "experiments", "__main__"})
"""Logger roots whose INFO lines the terminal shows; any other logger is a library's."""

CHILD_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and huggingface_hub's bars (loading, saving, GGUF)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map bars (TRL's reference log-prob cache)
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ warnings, e.g. vLLM's NUMA binding line at engine start
}
"""Environment defaults read by libraries at import: they act in the child processes (training,
vLLM's engine) and in this process for what it has not imported yet."""

CHILD_WARNINGS = "ignore::UserWarning:multiprocessing.resource_tracker"
"""Appended to PYTHONWARNINGS: the resource tracker's note at exit about a shared-memory segment that vLLM's
engine left (the tracker removes it; nothing for the user to do)."""

CONSOLE_FORMAT = "[%(asctime)s] %(message)s"
CONSOLE_DATE = "%H:%M:%S"
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default, as in its log file
WARNINGS_LOGGER = "py.warnings"  # the logger Python warnings go to (as logging.captureWarnings)

_PROJECT = Path(__file__).resolve().parent.parent

LIBRARY_LOGGERS = {"vllm": ("VLLM_LOGGING_LEVEL", "ERROR")}
"""Library loggers set to the level the named variable gives (the default here when it is unset) when
this module is imported: vLLM's engine processes start by re-importing the entry point
(multiprocessing's spawn) and log warnings at import (e.g. "Triton is installed, but doesn't include
CPU backend") before vLLM sets up its own logging, through Python's last-resort handler, which the
console filter cannot reach."""
for _name, (_variable, _level) in LIBRARY_LOGGERS.items():
    logging.getLogger(_name).setLevel(os.environ.get(_variable, _level).upper())


def is_library_file(filename: str) -> bool:
    """Whether code at `filename` is a library's (installed packages, the standard library), not ours."""
    path = Path(filename).resolve()
    return "site-packages" in path.parts or "dist-packages" in path.parts or _PROJECT not in path.parents


DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
"""Notes about an API changing (a library's, often attributed to our call by its stacklevel): log file only."""


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning: a warning becomes a WARNING record of WARNINGS_LOGGER; the terminal shows
    it only when our code raised it and it is not a deprecation note."""
    text = f"{filename}:{lineno}: {category.__name__}: {message}"
    ours = not is_library_file(filename) and not issubclass(category, DEVELOPER_WARNINGS)
    logging.getLogger(WARNINGS_LOGGER).warning(text, extra={"console": ours})


def console_filter(record: logging.LogRecord) -> bool:
    """Whether the terminal shows `record` (the log file shows every record)."""
    if not getattr(record, "console", True):
        return False
    if record.name == WARNINGS_LOGGER or record.levelno >= logging.ERROR:
        return True
    return record.name.split(".")[0] in OWN_PACKAGES


class ConsoleFormatter(logging.Formatter):
    """`[12:03:44] message` for INFO; the level and logger name before warnings and errors."""

    def __init__(self):
        super().__init__(CONSOLE_FORMAT, datefmt=CONSOLE_DATE)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            stamp = self.formatTime(record, CONSOLE_DATE)
            text = text.replace(f"[{stamp}] ", f"[{stamp}] {record.levelname} {record.name}: ", 1)
        return text


def _quiet_libraries() -> None:
    """Send transformers' log records through the root logger (so the log file has them) instead of
    its own stderr handler, and turn its progress bars off."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        hf_logging.disable_progress_bar()


def quiet_console() -> Path | None:
    """Set up the terminal and the log file as the module docstring says; returns the log file (None
    when there is none: no Hydra file handler and no LOG_FILE_ENV). Idempotent."""
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    current = os.environ.get("PYTHONWARNINGS", "")
    if CHILD_WARNINGS not in current.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [current, CHILD_WARNINGS]))
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    if not files and os.environ.get(LOG_FILE_ENV):
        handler = logging.FileHandler(os.environ[LOG_FILE_ENV], mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        root.addHandler(handler)
        files = [handler]
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if not consoles:
        consoles = [logging.StreamHandler(sys.stderr)]
        root.addHandler(consoles[0])
    for handler in consoles:
        if console_filter not in handler.filters:
            handler.addFilter(console_filter)
        handler.setFormatter(ConsoleFormatter())
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    warnings.showwarning = _log_warning
    _quiet_libraries()
    log_file = Path(files[0].baseFilename) if files else None
    if log_file is not None:
        os.environ[LOG_FILE_ENV] = str(log_file)
    return log_file
