"""Where the search and evaluation run: one engine in this process (`launcher=local`), or one engine in
each of `launcher.workers` Ray actors (`launcher=ray`), each running the same job over its shard of the
problems (harness/jobs.py).

    engine = Engine(s)                      # local: started on first use, restarted on a new checkpoint
    for out in engine.run(job, problems, policy_path): ...

    with ray_engines(s) as engine:          # launcher=ray: the same interface
        for out in engine.run(job, problems, policy_path): ...   # outputs stream back as workers finish them

Ray (an optional dependency) is imported only with launcher=ray. Faults: a worker that dies loses only
the outputs it had not sent; its problems not yet done are run again, on the same actor once Ray has
restarted it (up to `launcher.max_restarts` times) and otherwise on a live worker; an output whose
problems are already done is dropped, so nothing is returned twice. Weights reach the workers through
the checkpoint folder: each worker loads the path it is given when it differs from the one it serves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from harness.config import ConfigError
from harness.seeds import engine_config
from policy.backends import make_backend

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "ray")
MISSING_RAY = ("launcher=ray needs the ray package: pip install -e '.[ray]' (or ray[default]>=2.40), "
               "or run with launcher=local")

RESTART_POLL_S = 0.5  # how often a restarting worker is asked whether it is back (a cheap call)
WORKER_ENV = {"TQDM_DISABLE": "1"}  # the driver's bars count the work; the workers' bars would interleave


@dataclass(frozen=True)
class LauncherConfig:
    """The `launcher` config group (conf/launcher/*.yaml says where each value comes from).

    name: "local" (one engine in this process) or "ray" (one engine per Ray actor).
    workers: Ray actors, each with its own engine and its shard of each phase's problems.
    gpus_per_worker: GPUs Ray gives each worker (0: a CPU worker); with backend.tensor_parallel_size=N
        the worker's one engine spans N GPUs, so give it at least N.
    cpus_per_worker: CPU cores Ray gives each worker; on a cluster this launcher starts, CPU workers are
        pinned to their own cores (vLLM's OpenMP threads through VLLM_CPU_OMP_THREADS_BIND).
    address: an existing Ray cluster to join ("auto": the one `ray start --head` started on this node, or
        host:port); empty: start a local one with workers x cpus_per_worker CPUs.
    max_restarts: times Ray restarts a worker that died; after that its problems go to live workers.
    restart_timeout_s: how long the driver waits for a restarted worker before it gives the worker's
        unfinished problems to a live one.
    """

    name: str = "local"
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1
    address: str = ""
    max_restarts: int = 1
    restart_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.name not in LAUNCHERS:
            raise ValueError(f"launcher.name={self.name!r}: expected one of {', '.join(LAUNCHERS)}")
        if self.workers < 1 or self.cpus_per_worker < 1:
            raise ValueError("launcher.workers and launcher.cpus_per_worker must be >= 1")
        if self.gpus_per_worker < 0 or self.max_restarts < 0 or self.restart_timeout_s < 0:
            raise ValueError("launcher.gpus_per_worker, max_restarts and restart_timeout_s must be >= 0")


# --- pure helpers -----------------------------------------------------------------------------------


def shard(items: Sequence, workers: int) -> list[list]:
    """Round-robin shards, one per worker (item i to worker i mod workers), each in the items' order;
    a worker with nothing to do gets an empty list."""
    return [list(items[w::workers]) for w in range(workers)]


def worker_cores(cores: Sequence[int], workers: int, per_worker: int) -> list[tuple[int, ...]]:
    """The cores each CPU worker is pinned to: consecutive slices of `per_worker` of `cores` (the cores
    this process may use). Too few cores for every worker is a ConfigError."""
    cores = sorted(cores)
    if workers * per_worker > len(cores):
        raise ConfigError(f"launcher.workers={workers} x launcher.cpus_per_worker={per_worker} needs "
                          f"{workers * per_worker} cores; this machine gives {len(cores)}")
    return [tuple(cores[w * per_worker:(w + 1) * per_worker]) for w in range(workers)]


def pick_worker(live: Sequence[int], in_flight: dict[int, int]) -> int:
    """The live worker with the fewest calls in flight (the lowest index on a tie)."""
    return min(live, key=lambda w: (in_flight.get(w, 0), w))


# --- the local engine -------------------------------------------------------------------------------


class Engine:
    """The generation backend, started lazily and restarted on a new checkpoint (holds the engine)."""

    def __init__(self, s: Any):
        self.s = s
        self.backend = None
        self.path: str | None = None

    def serve(self, path: str):
        if self.backend is None:
            self.backend = make_backend(engine_config(self.s), path)
        elif self.path != path:
            self.backend.load(path)
        self.path = path
        return self.backend

    def run(self, job: Callable, items: Sequence, path: str) -> Iterator:
        """`job(backend, items)` with the engine serving `path`."""
        yield from job(self.serve(path), list(items))

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = None
        self.path = None


# --- Ray --------------------------------------------------------------------------------------------


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(MISSING_RAY) from None
    return ray


class EngineWorker:
    """A Ray actor's body: one Engine, pinned to `cores` on the CPU (None: where Ray and the engine put
    it). Ray builds it again with the same arguments after a restart; the engine starts on first use."""

    def __init__(self, s: Any, cores: tuple[int, ...] | None):
        if cores:
            os.sched_setaffinity(0, cores)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))  # docs/notes.md: Ray + vLLM-CPU
            os.environ["OMP_NUM_THREADS"] = str(len(cores))
            import torch

            torch.set_num_threads(len(cores))
        self.engine = Engine(s)

    def run(self, job: Callable, items: Sequence, path: str) -> Iterator:
        yield from self.engine.run(job, items, path)

    def close(self) -> None:
        self.engine.close()

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Call:
    """A job call in flight on one worker: which worker, and the ids of the items it was given."""

    worker: int
    ids: tuple[str, ...]


class RayEngines:
    """`launcher.workers` Ray actors, each holding one engine (an EngineWorker); the same `run` and
    `close` as Engine. Ray and the actors start on the first `run`; `close` frees the engines (before
    training) and keeps the actors; `shutdown` ends them, and the local cluster if this started it."""

    def __init__(self, s: Any):
        self.s = s
        self.cfg: LauncherConfig = s.launcher
        self.ray = import_ray()
        self.workers: list[Any] = []
        self.failures: dict[int, int] = {}
        self.dead: set[int] = set()
        self.started_ray = False

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.workers:
            return
        ray, c = self.ray, self.cfg
        if not ray.is_initialized():
            if c.address:
                ray.init(address=c.address, include_dashboard=False)
            else:
                ray.init(num_cpus=c.workers * c.cpus_per_worker, include_dashboard=False)
                self.started_ray = True
        cores: list[tuple[int, ...] | None] = [None] * c.workers
        if c.gpus_per_worker == 0 and not c.address:  # CPU workers on this machine: each on its own cores
            cores = list(worker_cores(sorted(os.sched_getaffinity(0)), c.workers, c.cpus_per_worker))
        actor = ray.remote(EngineWorker).options(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
                                                 max_restarts=c.max_restarts, max_task_retries=0,
                                                 runtime_env={"env_vars": WORKER_ENV})
        self.workers = [actor.remote(self.s, cores[w]) for w in range(c.workers)]
        log.info("launcher=ray: %d workers (%s CPUs, %s GPUs each)%s", c.workers, c.cpus_per_worker,
                 c.gpus_per_worker, f" on cores {cores}" if cores[0] else "")

    def close(self) -> None:
        """Every live worker frees its engine (the actors stay, without the model's memory)."""
        for w, worker in enumerate(self.workers):
            if w in self.dead:
                continue
            try:
                self.ray.get(worker.close.remote())
            except self.ray.exceptions.RayActorError as err:
                log.warning("launcher=ray: worker %d could not close its engine: %s", w, type(err).__name__)

    def shutdown(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                self.ray.kill(worker)
        self.workers = []
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_ray = False

    # ---- running a job -----------------------------------------------------------------------------

    def run(self, job: Callable, items: Sequence, path: str) -> Iterator:
        """`job(backend, shard)` on every worker over its shard of `items` (each item has an `id`; each
        output an `ids`, the items it completes); outputs are yielded as they arrive, each item's once."""
        self.start()
        ray = self.ray
        job_ref = ray.put(job)  # serialized once, read by every call
        by_id = {item.id: item for item in items}
        done: set[str] = set()
        calls: dict[Any, _Call] = {}

        def submit(w: int, part: list) -> None:
            gen = self.workers[w].run.options(num_returns="streaming").remote(job_ref, part, path)
            calls[gen] = _Call(w, tuple(item.id for item in part))

        for w, part in enumerate(shard(list(items), len(self.workers))):
            if part:
                submit(self._live_target(w, calls), part)
        while calls:
            (gen,), _ = ray.wait(list(calls), num_returns=1)
            call = calls[gen]
            try:
                out = ray.get(next(gen))
            except StopIteration:
                del calls[gen]
                missing = [i for i in call.ids if i not in done]
                if missing:
                    raise RuntimeError(f"a worker's job ended without {len(missing)} of its items: {missing[:3]}")
                continue
            except ray.exceptions.RayActorError as err:
                del calls[gen]
                left = [by_id[i] for i in call.ids if i not in done]
                target = self._after_failure(call.worker, calls)
                log.warning("launcher=ray: worker %d died (%s); its %d unfinished items go to worker %d", call.worker,
                            type(err).__name__, len(left), target)
                if left:
                    submit(target, left)
                continue
            if all(i in done for i in out.ids):
                continue  # already received from an earlier call: never returned twice
            done.update(out.ids)
            yield out

    def _live_target(self, w: int, calls: dict[Any, _Call]) -> int:
        if w not in self.dead:
            return w
        live = [i for i in range(len(self.workers)) if i not in self.dead]
        if not live:
            raise RuntimeError(f"launcher=ray: all {len(self.workers)} workers died")
        in_flight: dict[int, int] = {}
        for call in calls.values():
            in_flight[call.worker] = in_flight.get(call.worker, 0) + 1
        return pick_worker(live, in_flight)

    def _after_failure(self, w: int, calls: dict[Any, _Call]) -> int:
        """The worker that takes a failed call's unfinished items: the same one once Ray has restarted it,
        else (no restart left, or not back in time) the live worker with the fewest calls in flight."""
        self.failures[w] = self.failures.get(w, 0) + 1
        if self.failures[w] > self.cfg.max_restarts or not self._restarted(w):
            self.dead.add(w)
        return self._live_target(w, calls)

    def _restarted(self, w: int) -> bool:
        """Wait until Ray has restarted worker w (True), or it is dead for good or not back within
        launcher.restart_timeout_s (False). Calls to a restarting actor fail at once, so it is polled."""
        errors = self.ray.exceptions
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        while time.monotonic() < deadline:
            try:
                self.ray.get(self.workers[w].pid.remote(), timeout=max(0.0, deadline - time.monotonic()))
                return True
            except errors.ActorDiedError:
                return False
            except (errors.ActorUnavailableError, errors.GetTimeoutError):
                time.sleep(RESTART_POLL_S)
        return False


@contextlib.contextmanager
def ray_engines(s: Any) -> Iterator[RayEngines]:
    engines = RayEngines(s)
    try:
        yield engines
    finally:
        engines.shutdown()


def make_engines(s: Any, stack: contextlib.ExitStack):
    """The engine(s) `s.launcher` names, closed (and Ray's actors ended) when `stack` closes."""
    launcher = getattr(s, "launcher", None)
    if launcher is None or launcher.name == "local":
        return stack.enter_context(contextlib.closing(Engine(s)))
    return stack.enter_context(ray_engines(s))
