"""experiments/gpu_check.sh on a machine without a GPU (here, CI): one line saying it skipped, exit 0,
nothing installed; and the `gpu` tests it runs are all skipped here, none failing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpu_check.sh runs the tests instead")
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh"), str(tmp_path / "no-wheels")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"gpu_check: no GPU: skipped (torch.cuda.is_available() is false for "
                                        f"{sys.executable})"]
    assert not list(tmp_path.iterdir())


def test_the_wheel_folder_is_ignored_by_git():
    proc = subprocess.run(["git", "check-ignore", "-q", "gpu_wheels/trl-1.16.0-py3-none-any.whl"], cwd=ROOT)
    assert proc.returncode == 0, "gpu_wheels/ (experiments/gpu_wheels.sh's default folder) must be git-ignored"
