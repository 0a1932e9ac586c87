"""Shared fixtures: the embedded default model (prepared once, cached) and a tiny random Llama
built from a config with the default model's tokenizer (never a download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def job_settings(config_name: str, overrides: list[str]):
    """The settings one job of `python iterate.py [-m] ...` sees: composed with Hydra's runtime config
    set, so that `${hydra:runtime.choices.<group>}` resolves as in a real run. Hydra keeps that config
    in a process-wide singleton; it is restored afterwards so that no test sees another's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from harness.settings import load_settings

    holder = HydraConfig.instance()
    before = holder.cfg
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
            holder.set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            return load_settings(cfg)
    finally:
        holder.cfg = before
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


@pytest.fixture(scope="session")
def tiny_value_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A value model on the tiny model, one step on two texts: enough to serve scores, not to rank well."""
    from policy.value_model import ValueTrainConfig, train_value

    out = tmp_path_factory.mktemp("value") / "value"
    train_value([("Sam has 2 pens. The answer is 4.", 1.0), ("Sam has 2 pens. The answer is 5.", 0.0)], [],
                base_path=str(tiny_model_dir), out_dir=str(out),
                cfg=ValueTrainConfig(loss=("bce",), epochs=1, batch_size=2, max_length=32, device="cpu"))
    return out


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and os.environ.get("MCTSLOOP_NO_VLLM") != "1"
