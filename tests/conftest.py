"""Shared fixtures: the embedded default model (prepared once, cached) and a tiny random Llama
built from a config with the default model's tokenizer (never a download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from policy.models import prepare_embedded

    return prepare_embedded("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir, tmp_path_factory) -> Path:
    from policy.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", default_model_dir)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and os.environ.get("MCTSLOOP_NO_VLLM") != "1"
