"""harness/console.py: a library's warning leaves the terminal but stays in the log file; ours stay."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT
from harness import console


@pytest.fixture
def entry_logging(tmp_path, monkeypatch):
    """Logging as Hydra sets it up for an entry point (a console handler, the run's log file); the root
    logger, warnings.showwarning and the environment are restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    terminal = io.StringIO()
    log_file = tmp_path / "iterate.log"
    console_handler = logging.StreamHandler(terminal)
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter(console.FILE_FORMAT))
    root.handlers = [console_handler, file_handler]
    for key in (*console.CHILD_ENV, "PYTHONWARNINGS", console.LOG_FILE_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(console, "_quiet_libraries", lambda: None)  # transformers' global state: not here
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield terminal, log_file
    file_handler.close()
    root.handlers, root.level = saved


def test_a_library_warning_goes_to_the_log_file_only(entry_logging):
    terminal, log_file = entry_logging
    assert console.quiet_console() == log_file
    import torch

    torch.cuda.amp.autocast(enabled=False)  # torch's FutureWarning: deprecated, use torch.amp.autocast
    logging.getLogger("transformers.generation.utils").warning("The attention mask is not set")
    logging.getLogger("iterate").info("round 0: 2 trees, 1 solved")
    warnings.warn_explicit("our own warning", UserWarning, str(ROOT / "iterate.py"), 1)
    logging.getLogger("policy.dpo").info("DPO: 2 pairs, 1045 tokens", extra=console.FILE_ONLY)
    for handler in logging.getLogger().handlers:
        handler.flush()

    shown, kept = terminal.getvalue(), log_file.read_text()
    assert "torch.cuda.amp.autocast" not in shown and "attention mask" not in shown
    assert "FutureWarning" in kept and "torch.cuda.amp.autocast" in kept and "attention mask" in kept
    assert "round 0: 2 trees, 1 solved" in shown and "round 0: 2 trees, 1 solved" in kept
    assert "UserWarning: our own warning" in shown
    assert "1045 tokens" in kept and "1045 tokens" not in shown
    assert os.environ[console.LOG_FILE_ENV] == str(log_file)
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert console.CHILD_WARNINGS in os.environ["PYTHONWARNINGS"]


def test_a_user_setting_wins(entry_logging, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    monkeypatch.setenv("PYTHONWARNINGS", "error")
    console.quiet_console()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ["PYTHONWARNINGS"].split(",")[0] == "error"


def test_a_child_process_appends_to_the_parents_log_file(tmp_path):
    """The training process (policy/train_main.py) has no Hydra: it adds the parent's log file."""
    log_file = tmp_path / "iterate.log"
    log_file.write_text("[parent] first line\n")
    code = ("import logging, warnings\n"
            "from harness.console import quiet_console, FILE_ONLY\n"
            "quiet_console()\n"
            "logging.getLogger('policy.dpo').info('DPO done')\n"
            "logging.getLogger('policy.dpo').info('step 1: %s', {'loss': 0.69}, extra=FILE_ONLY)\n"
            "logging.getLogger('trl.trainer').warning('a library note')\n")
    env = {**os.environ, console.LOG_FILE_ENV: str(log_file)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    kept = log_file.read_text()
    assert kept.startswith("[parent] first line\n")
    assert "DPO done" in kept and "{'loss': 0.69}" in kept and "a library note" in kept
    assert "DPO done" in out.stderr and "loss" not in out.stderr and "library note" not in out.stderr
