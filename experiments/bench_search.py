"""Search-engine benchmark: our lockstep batched search against the same search driven one request at a
time (the MCTS-DPO reference implementation's pattern) and against raw batched generation of the same
number of tokens (the engine's own ceiling on this machine).

    python experiments/bench_search.py                  # vLLM, default model: the committed run (~25 min, 2 cores)
    python experiments/bench_search.py --quick          # small sizes (a few minutes)
    python experiments/bench_search.py --backend hf --model /path/to/hf-folder --trees 8 --simulations 4
    python experiments/bench_search.py --set gpu_memory_utilization=0.8 --set block_size=null  # on a GPU
    python experiments/bench_search.py --plot           # also writes <out>.png
    python experiments/bench_search.py --modes batched,value_model,no_value --value-model runs/<name>/round_0/value

Modes, on the same problems, model, engine settings and tree budget (SearchConfig: simulations, breadths,
depth; GenerationConfig: step length):

- batched: `run_search` with batch_trees = trees: one expand and one evaluate call per wave for every tree;
  prefix cache on.
- sequential: the same `run_search` one tree at a time (batch_trees=1), through adapters that split every
  call into single requests: breadth b -> b calls of one ExpandRequest with n=1, one EvalRequest per call;
  on an engine with the prefix cache off (the reference implementation has none). One tree at a time,
  its cost per tree does not depend on how many trees there are, so it is measured on the first
  `--sequential-trees` problems and scaled to each tree count (the table says so).
- raw: one `backend.sample` call, no search and no stop string: each problem's question prompt, n samples
  each, so that there are about as many sequences as the batched search sampled, max_tokens = their mean
  length. Its tokens/s gives the time the engine needs for the batched run's generated tokens.
- value_model, no_value (not run by default): the batched search with `search.value=model` (new children
  valued by the trained value model `--value-model`, on `--value-set` settings: transformers in this
  process unless value.engine says vllm) and with `search.value=none` (no value calls), on the batched
  engine, at the same points. Against the batched run (`search.value=self_eval`) the report's `value`
  section gives each one's search time, engine and value calls, tokens, the time spent in value calls and
  its share, and the value-model search's time over the self-evaluating one's (issue 18: at most 1).

For each: wall time, generated tokens/s, expansions/s, self-evaluations/s, prompt tokens and the share
served from the prefix cache, and peak resident memory of this process plus the engine's processes
(sampled in a thread). Ratios per point: speedup = sequential time / batched time (same trees, same
budget), speedup_per_token (the same in generated tokens/s, which does not depend on how many tokens
each mode's trees happened to generate), overhead = batched time / raw time for the same tokens.
Engine start and warm-up are outside every timed region; the prefix cache is reset before each run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import math
import os
import platform
import pstats
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator, Sequence

ROOT_DIR = Path(__file__).resolve().parent.parent
if str(ROOT_DIR) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT_DIR))

import yaml  # noqa: E402

from harness.machine import machine_info  # noqa: E402
from policy.value_model import ValueConfig  # noqa: E402
from mcts.search import SearchConfig, SearchStats, run_search  # noqa: E402
from mcts.types import EvalRequest, Evaluation, Expansion, ExpandRequest, Problem  # noqa: E402
from policy.backends import Backend, BackendConfig, SamplingSettings, make_backend  # noqa: E402
from policy.prompts import PromptConfig, PromptFormatter  # noqa: E402
from policy.step_policy import GenerationConfig, StepPolicy  # noqa: E402

log = logging.getLogger("bench_search")

BATCHED, SEQUENTIAL, RAW = "batched", "sequential", "raw"
VALUE_MODEL, NO_VALUE = "value_model", "no_value"
MODES = (BATCHED, SEQUENTIAL, RAW)  # the default
ALL_MODES = (*MODES, VALUE_MODEL, NO_VALUE)
SEARCH_VALUE = {BATCHED: "self_eval", VALUE_MODEL: "model", NO_VALUE: "none"}
"""search.value of the lockstep modes the value comparison puts side by side."""
DEFAULT_TREES = (8, 32, 128)
DEFAULT_SIMULATIONS = (4, 8, 16)
QUICK_TREES = (4, 8)
QUICK_SIMULATIONS = (2, 4)
SEQUENTIAL_TREES = 4  # sequential is measured on this many trees and scaled (about 40 s per tree at 16 simulations)
QUICK_SEQUENTIAL_TREES = 2
WARMUP_TREES = 2  # the warm-up search (outside every timed region) on problems no measured run uses
WARMUP_SIMULATIONS = 2
MEMORY_POLL_S = 0.05  # resident-set sampling period
MIB = 2**20
TASK = dict(name="arith_test", kind="arith", split="test", difficulties=(1, 2))  # the issue's problems
CONF_DIR = ROOT_DIR / "conf"
DEFAULT_OUT = ROOT_DIR / "experiments" / "results" / "bench_search.json"
TARGETS = dict(speedup_min=10.0, overhead_max=1.3, cached_share_min=0.7, at_trees=32)  # from the issue
PROFILE_TOP = 25  # functions listed by --profile


# ---- adapters ------------------------------------------------------------------------------------


class OneAtATime:
    """Expander + Evaluator that splits every batched call into single-request, single-sample calls (the
    reference implementation's pattern): a request for n candidates becomes n calls with n=1, and every
    self-evaluation is its own call."""

    def __init__(self, policy):
        self.policy = policy

    def expand(self, requests: Sequence[ExpandRequest]) -> list[Expansion]:
        return [merge_expansions([self.policy.expand([replace(r, n=1)])[0] for _ in range(r.n)])
                for r in requests]

    def evaluate(self, requests: Sequence[EvalRequest]) -> list[Evaluation]:
        return [self.policy.evaluate([r])[0] for r in requests]


def merge_expansions(parts: Sequence[Expansion]) -> Expansion:
    """One Expansion from single-sample ones: samples in order, costs summed."""
    return Expansion(samples=tuple(s for p in parts for s in p.samples),
                     prompt_tokens=sum(p.prompt_tokens for p in parts),
                     cached_tokens=sum(p.cached_tokens for p in parts))


class Timed:
    """Expander + Evaluator that accumulates the wall time spent inside expand and evaluate, and counts
    the samples generated and the prompt and cached tokens of each kind of call. Evaluate calls go to
    `evaluator` when given (a value model), else to the policy (self-evaluation)."""

    def __init__(self, policy, evaluator=None):
        self.policy = policy
        self.evaluator = evaluator or policy
        self.expand_s = 0.0
        self.evaluate_s = 0.0
        self.samples = 0
        self.expand_prompt_tokens = self.expand_cached_tokens = 0
        self.eval_prompt_tokens = self.eval_cached_tokens = 0
        self.calls: list[CallRecord] = []

    def expand(self, requests: Sequence[ExpandRequest]) -> list[Expansion]:
        start = time.perf_counter()
        expansions = self.policy.expand(requests)
        seconds = time.perf_counter() - start
        self.expand_s += seconds
        lengths = [s.num_tokens for e in expansions for s in e.samples]
        self.samples += len(lengths)
        prompt, cached = sum(e.prompt_tokens for e in expansions), sum(e.cached_tokens for e in expansions)
        self.expand_prompt_tokens += prompt
        self.expand_cached_tokens += cached
        self.calls.append(CallRecord("expand", len(requests), len(lengths), sum(lengths), max(lengths, default=0),
                                     prompt, cached, seconds))
        return expansions

    def evaluate(self, requests: Sequence[EvalRequest]) -> list[Evaluation]:
        start = time.perf_counter()
        evaluations = self.evaluator.evaluate(requests)
        seconds = time.perf_counter() - start
        self.evaluate_s += seconds
        prompt, cached = sum(e.prompt_tokens for e in evaluations), sum(e.cached_tokens for e in evaluations)
        self.eval_prompt_tokens += prompt
        self.eval_cached_tokens += cached
        self.calls.append(CallRecord("evaluate", len(requests), 0, 0, 0, prompt, cached, seconds))
        return evaluations


@dataclass(frozen=True)
class CallRecord:
    """One expand or evaluate call of the search (batched mode: one of each per wave)."""

    kind: str
    requests: int
    samples: int
    generated_tokens: int
    longest_sample: int  # the wave's decode lasts as long as its longest sample
    prompt_tokens: int
    cached_tokens: int
    seconds: float


# ---- memory --------------------------------------------------------------------------------------


def resident_bytes() -> tuple[int, int]:
    """Resident set of (this process, this process plus all its descendants: the engine's processes)."""
    try:
        import psutil
    except ImportError:  # this process only, from /proc
        with open("/proc/self/statm") as f:
            own = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return own, own
    me = psutil.Process()
    own = total = me.memory_info().rss
    for p in me.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a process that just exited
            pass
    return own, total


class PeakMemory:
    """Context manager: samples `resident_bytes()` every `interval` s in a thread. Bytes: `.before` and
    `.peak` (process + engine), `.own_peak` (this process alone: the search's trees and Python state)."""

    def __init__(self, interval: float = MEMORY_POLL_S):
        self.interval = interval
        self.before = self.peak = self.own_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        own, total = resident_bytes()
        self.own_peak, self.peak = max(self.own_peak, own), max(self.peak, total)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self.own_peak, self.before = resident_bytes()
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ---- measurements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One measured run. Counts and `seconds` are totals for `trees` trees: when the run was measured on
    fewer (`measured_trees`), they are the measured ones times `scale` = trees / measured_trees.

    generated_tokens: sampled tokens (search: summed from the trees' compute records; raw: the engine's).
    engine_generated_tokens: the engine's own count (vLLM also counts the one token each self-evaluation
        generates); samples: sequences generated; expansions, evaluations: expand / self-evaluation
        requests (nodes); engine_calls: backend calls.
    prompt_tokens, cached_tokens: the engine's accounting, and per kind of call (expand_*, eval_*);
        tree_prompt_tokens: the trees' records (a consistency check).
    simulations_run: simulations summed over trees (budget: trees x simulations; a tree whose root is
        resolved stops earlier). expand/evaluate_seconds: wall time inside those calls.
    value_calls: the search's evaluate calls (self-evaluation through the engine, or the value model's; the
        eval_* tokens are theirs); engine_calls counts only the former.
    peak_rss_mb, rss_before_mb: resident memory (process + engine) peak during and just before the run;
        peak_own_rss_mb: this process alone (the search, its trees), peak during the run.
    load_before/after: os.getloadavg() (other jobs on the machine)."""

    mode: str
    trees: int
    simulations: int
    measured_trees: int
    seconds: float
    measured_seconds: float
    peak_rss_mb: float
    rss_before_mb: float
    peak_own_rss_mb: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    engine_calls: float
    engine_generated_tokens: float
    prompt_tokens: float
    cached_tokens: float
    generated_tokens: float
    samples: float
    expansions: float = 0
    evaluations: float = 0
    tree_prompt_tokens: float = 0
    expand_prompt_tokens: float = 0
    expand_cached_tokens: float = 0
    eval_prompt_tokens: float = 0
    eval_cached_tokens: float = 0
    simulations_run: float = 0
    expand_seconds: float = 0.0
    evaluate_seconds: float = 0.0
    value_calls: float = 0
    scale: float = 1.0
    calls: tuple[CallRecord, ...] = ()  # batched search only: its engine calls, one line each


EXTENSIVE = ("seconds", "engine_calls", "engine_generated_tokens", "prompt_tokens", "cached_tokens",
             "generated_tokens", "samples", "expansions", "evaluations", "tree_prompt_tokens",
             "expand_prompt_tokens", "expand_cached_tokens", "eval_prompt_tokens", "eval_cached_tokens",
             "simulations_run", "expand_seconds", "evaluate_seconds", "value_calls")


def scaled(run: Run, trees: int) -> Run:
    """`run` extrapolated to `trees` trees (per-tree cost unchanged: valid for one-tree-at-a-time runs)."""
    factor = trees / run.measured_trees
    return replace(run, trees=trees, scale=factor,
                   **{k: getattr(run, k) / run.scale * factor for k in EXTENSIVE})


def share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def rates(run: Run) -> dict[str, float]:
    """Derived figures: per-second rates, cached share, per-tree time."""
    s = run.seconds or math.nan
    return dict(
        tokens_per_s=run.generated_tokens / s,
        expansions_per_s=run.expansions / s,
        evaluations_per_s=run.evaluations / s,
        cached_share=share(run.cached_tokens, run.prompt_tokens),
        expand_cached_share=share(run.expand_cached_tokens, run.expand_prompt_tokens),
        eval_cached_share=share(run.eval_cached_tokens, run.eval_prompt_tokens),
        seconds_per_tree=run.seconds / run.trees,
        mean_sample_tokens=run.generated_tokens / run.samples if run.samples else 0.0,
    )


@dataclass(frozen=True)
class Ratios:
    """The comparison at one point (trees, simulations).

    speedup: sequential seconds / batched seconds (same trees and budget; sequential scaled).
    speedup_per_token: batched generated tokens/s / sequential generated tokens/s.
    overhead: batched seconds / the seconds raw generation needs for the batched run's generated tokens.
    None where the mode was not run.
    """

    trees: int
    simulations: int
    speedup: float | None
    speedup_per_token: float | None
    overhead: float | None
    sequential_measured_trees: int


def compare(batched: Run, sequential: Run | None, raw: Run | None) -> Ratios:
    b = rates(batched)
    speedup = sequential.seconds / batched.seconds if sequential else None
    per_token = b["tokens_per_s"] / rates(sequential)["tokens_per_s"] if sequential else None
    overhead = batched.seconds / (batched.generated_tokens / rates(raw)["tokens_per_s"]) if raw else None
    return Ratios(batched.trees, batched.simulations, speedup, per_token, overhead,
                  sequential.measured_trees if sequential else 0)


@dataclass(frozen=True)
class ValueCost:
    """What valuing new children costs the batched search at one point (trees, simulations; one budget).

    value: search.value (self_eval: the batched run; model; none). seconds: the search's time;
    engine_calls: generation-engine calls (self-evaluations included); value_calls: the search's evaluate
    calls; generated_tokens; engine_prompt_tokens: prompt tokens the engine processed; value_prompt_tokens:
    those of the value calls (the engine's for self_eval, the value model's for model); value_seconds: time
    inside the value calls; value_share: value_seconds / seconds; vs_self_eval: seconds over the self_eval
    run's (None without it)."""

    trees: int
    simulations: int
    value: str
    seconds: float
    engine_calls: float
    value_calls: float
    generated_tokens: float
    engine_prompt_tokens: float
    value_prompt_tokens: float
    value_seconds: float
    value_share: float
    vs_self_eval: float | None


def value_costs(runs: Sequence[Run], points: Sequence[Point]) -> list[ValueCost]:
    """The value comparison, per point where a value mode ran: self_eval, model, none (those that ran)."""
    out = []
    for p in points:
        if find(runs, VALUE_MODEL, p) is None and find(runs, NO_VALUE, p) is None:
            continue
        base = find(runs, BATCHED, p)
        for mode in (BATCHED, VALUE_MODEL, NO_VALUE):
            r = find(runs, mode, p)
            if r is not None:
                out.append(ValueCost(
                    r.trees, r.simulations, SEARCH_VALUE[mode], r.seconds, r.engine_calls, r.value_calls,
                    r.generated_tokens, r.prompt_tokens, r.eval_prompt_tokens, r.evaluate_seconds,
                    share(r.evaluate_seconds, r.seconds), r.seconds / base.seconds if base else None))
    return out


VALUE_HEADER = (f"{'trees':>5s} {'sims':>4s} {'value':9s} {'time s':>9s} {'engine calls':>12s} {'value calls':>11s} "
                f"{'gen tok':>9s} {'engine prompt tok':>17s} {'value tok':>10s} {'value s':>8s} {'value %':>7s} "
                f"{'vs self_eval':>12s}")


def value_table(costs: Sequence[ValueCost]) -> str:
    lines = [VALUE_HEADER]
    lines += [f"{c.trees:5d} {c.simulations:4d} {c.value:9s} {c.seconds:9.1f} {c.engine_calls:12.0f} "
              f"{c.value_calls:11.0f} {c.generated_tokens:9.0f} {c.engine_prompt_tokens:17.0f} "
              f"{c.value_prompt_tokens:10.0f} {c.value_seconds:8.1f} {100 * c.value_share:7.1f} "
              f"{fmt(c.vs_self_eval, '12.2f')}" for c in costs]
    return "\n".join(lines)


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`; "-" (as wide as the spec says) when there is no value."""
    if value is None:
        width = spec.split(".")[0]
        return format("-", f">{width}") if width else "-"
    return format(value, spec)


@contextmanager
def measured(backend: Backend) -> Iterator[dict]:
    """Times the block, watches memory and load, and reports the backend usage it caused, in `info`."""
    info: dict = {}
    reset_prefix_cache(backend)
    before = replace(backend.usage)
    load_before = os.getloadavg()
    with PeakMemory() as mem:
        start = time.perf_counter()
        yield info
        info["seconds"] = time.perf_counter() - start
    u = backend.usage
    info.update(
        measured_seconds=info["seconds"], engine_generated_tokens=u.generated_tokens - before.generated_tokens,
        engine_calls=u.calls - before.calls,
        prompt_tokens=u.prompt_tokens - before.prompt_tokens, cached_tokens=u.cached_tokens - before.cached_tokens,
        peak_rss_mb=mem.peak / MIB, rss_before_mb=mem.before / MIB, peak_own_rss_mb=mem.own_peak / MIB,
        load_before=load_before, load_after=os.getloadavg(),
    )


def reset_prefix_cache(backend: Backend) -> None:
    """Empty vLLM's prefix cache so a run gets no hits from the previous one (no-op for other engines)."""
    llm = getattr(backend, "llm", None)
    if llm is not None and hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()


def search_run(mode: str, policy: StepPolicy, problems: Sequence[Problem], verifier, *, config: SearchConfig,
               seed: int, profile: cProfile.Profile | None = None, evaluator=None) -> Run:
    """Grow one tree per problem in `mode` (sequential: one tree and one request at a time; the others: all
    in lockstep) and measure it. New children are valued as `config.value` says, by `evaluator` when given
    (a value model), else by the policy's self-evaluation."""
    one_at_a_time = mode == SEQUENTIAL
    config = replace(config, batch_trees=1 if one_at_a_time else len(problems))
    timed = Timed(OneAtATime(policy) if one_at_a_time else policy, evaluator)
    stats = SearchStats()
    totals = dict(generated_tokens=0, prompt_tokens=0, simulations=0)  # from the trees' records
    with measured(policy.backend) as info:
        if profile:
            profile.enable()
        for tree in run_search(problems, expander=timed, evaluator=timed, verifier=verifier, config=config,
                               seed=seed, stats=stats):
            totals["generated_tokens"] += tree.compute["generated_tokens"]
            totals["prompt_tokens"] += tree.compute["prompt_tokens"]
            totals["simulations"] += tree.meta["simulations"]
        if profile:
            profile.disable()
    return Run(
        mode=mode, trees=len(problems), simulations=config.simulations, measured_trees=len(problems), **info,
        generated_tokens=totals["generated_tokens"], samples=timed.samples, expansions=stats.expand_requests,
        evaluations=stats.eval_requests, tree_prompt_tokens=totals["prompt_tokens"],
        expand_prompt_tokens=timed.expand_prompt_tokens, expand_cached_tokens=timed.expand_cached_tokens,
        eval_prompt_tokens=timed.eval_prompt_tokens, eval_cached_tokens=timed.eval_cached_tokens,
        simulations_run=totals["simulations"], expand_seconds=timed.expand_s, evaluate_seconds=timed.evaluate_s,
        value_calls=sum(c.kind == "evaluate" for c in timed.calls), calls=() if one_at_a_time else tuple(timed.calls),
    )


def raw_run(backend: Backend, prompts: Sequence[str], *, sequences: float, tokens: float, simulations: int,
            gen: GenerationConfig) -> Run:
    """Plain batched generation, no search, no stop string: about `sequences` sequences (n per prompt)
    of about `tokens` generated tokens in all, in one `sample` call."""
    n = max(1, round(sequences / len(prompts)))
    max_tokens = max(1, round(tokens / (n * len(prompts))))
    settings = SamplingSettings(n=n, max_tokens=max_tokens, temperature=gen.temperature, top_p=gen.top_p)
    with measured(backend) as info:
        backend.sample(prompts, settings)
    return Run(mode=RAW, trees=len(prompts), simulations=simulations, measured_trees=len(prompts), **info,
               generated_tokens=info["engine_generated_tokens"], samples=n * len(prompts),
               expand_prompt_tokens=info["prompt_tokens"], expand_cached_tokens=info["cached_tokens"],
               expand_seconds=info["seconds"])


# ---- the plan and the driver ---------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    trees: int
    simulations: int


def make_plan(trees: Sequence[int], simulations: Sequence[int], *, base_trees: int, base_simulations: int,
              full_grid: bool) -> list[Point]:
    """full grid: every (trees, simulations); star (default): every tree count at `base_simulations`
    and every simulation count at `base_trees` (cost against each kind of work, fewer runs)."""
    if full_grid:
        points = [Point(t, s) for t in trees for s in simulations]
    else:
        points = [Point(t, base_simulations) for t in trees] + [Point(base_trees, s) for s in simulations]
    return sorted(set(points), key=lambda p: (p.simulations, p.trees))


@contextmanager
def engine(cfg: BackendConfig, model_path: str) -> Iterator[Backend]:
    backend = make_backend(cfg, model_path)
    try:
        yield backend
    finally:
        backend.close()


def warm_up(policy: StepPolicy, problems: Sequence[Problem], verifier, *, config: SearchConfig, seed: int) -> None:
    """A small search and a sample call, outside every timed region (engine caches, lazy imports)."""
    config = replace(config, simulations=WARMUP_SIMULATIONS, batch_trees=len(problems))
    for _ in run_search(problems, expander=policy, evaluator=policy, verifier=verifier, config=config, seed=seed):
        pass
    policy.backend.sample([policy.formatter.solution_prompt(problems[0], ())], SamplingSettings(n=2, max_tokens=4))


@dataclass(frozen=True)
class Setup:
    """What every mode shares: model, engine settings, problems, search budget, sampling, prompts."""

    model_path: str
    backend: BackendConfig
    task: object
    problems: tuple[Problem, ...]
    search: SearchConfig
    generation: GenerationConfig
    prompt: PromptConfig
    seed: int = 0
    value_model: str | None = None  # a trained value model folder: the value_model mode's
    value: ValueConfig = field(default_factory=ValueConfig)  # how it is served (engine, device, search_batch)


def run_benchmark(setup: Setup, points: Sequence[Point], *, modes: Sequence[str] = MODES,
                  sequential_trees: int = SEQUENTIAL_TREES, profile: cProfile.Profile | None = None,
                  profile_point: Point | None = None) -> tuple[list[Run], dict]:
    """Every mode at every point. Batched and raw share one engine (prefix cache on); sequential runs on
    its own engine with the prefix cache off, measured once per simulation count on the first
    `sequential_trees` problems and scaled to each point's tree count. The value modes run on the batched
    engine after the batched runs (`value_runs`). Returns the runs and, per engine, its start seconds and
    preallocated KV-cache size (`engine_facts`; for the value model, `value_evaluator`'s facts)."""
    from policy.models import load_tokenizer

    check_value_model(setup, modes)
    most = max(p.trees for p in points)
    if len(setup.problems) < most + WARMUP_TREES:
        raise ValueError(f"{len(setup.problems)} problems: need {most} + {WARMUP_TREES} for warm-up")
    measured_problems, warm = setup.problems[:most], setup.problems[most:most + WARMUP_TREES]
    formatter = PromptFormatter(load_tokenizer(setup.model_path), setup.task, setup.prompt)
    kw = dict(config=setup.search, seed=setup.seed)
    runs: list[Run] = []
    engines: dict[str, dict] = {}
    valued = [m for m in (VALUE_MODEL, NO_VALUE) if m in modes]
    if BATCHED in modes or valued:
        with engine(setup.backend, setup.model_path) as backend:
            engines[BATCHED] = engine_facts(backend)
            policy = StepPolicy(backend, formatter, setup.generation, eval_with_reference=False)
            warm_up(policy, warm, setup.task, **kw)
            for p in points if BATCHED in modes else ():
                probs = measured_problems[:p.trees]
                cfg = replace(setup.search, simulations=p.simulations)
                b = search_run(BATCHED, policy, probs, setup.task, config=cfg, seed=setup.seed,
                               profile=profile if p == profile_point else None)
                runs.append(b)
                log.info("%s", row_text(b))
                if RAW in modes:
                    r = raw_run(backend, [formatter.solution_prompt(q, ()) for q in probs], sequences=b.samples,
                                tokens=b.generated_tokens, simulations=p.simulations, gen=setup.generation)
                    runs.append(r)
                    log.info("%s", row_text(r))
            if valued:
                runs.extend(value_runs(setup, policy, measured_problems, warm, points, valued, engines))
    if SEQUENTIAL in modes:
        with engine(replace(setup.backend, enable_prefix_caching=False), setup.model_path) as backend:
            engines[SEQUENTIAL] = engine_facts(backend)
            policy = StepPolicy(backend, formatter, setup.generation, eval_with_reference=False)
            warm_up(policy, warm, setup.task, **kw)
            for sims in sorted({p.simulations for p in points}):
                at = [p for p in points if p.simulations == sims]
                k = min(sequential_trees, max(p.trees for p in at))
                m = search_run(SEQUENTIAL, policy, measured_problems[:k], setup.task,
                               config=replace(setup.search, simulations=sims), seed=setup.seed)
                log.info("%s", row_text(m))
                runs.extend(scaled(m, p.trees) for p in at)
    return runs, engines


def check_value_model(setup: Setup, modes: Sequence[str]) -> None:
    """The value_model mode needs a finished value model folder; fail before any engine starts."""
    from policy.value_model import value_complete

    if VALUE_MODEL in modes and not (setup.value_model and value_complete(setup.value_model)):
        raise ValueError(f"mode {VALUE_MODEL} needs --value-model <a trained value model folder, e.g. "
                         f"runs/<name>/round_0/value>; got {setup.value_model!r}")


def value_evaluator(setup: Setup, formatter: PromptFormatter) -> tuple[object, dict]:
    """The search's value Evaluator for `setup.value_model`, as the loop builds it (policy/value_model.py),
    and its facts: load seconds, resident memory after, what serves it and its batch size."""
    from policy.value_model import make_value_evaluator

    v = setup.value
    start = time.perf_counter()
    evaluator = make_value_evaluator(setup.value_model, formatter.value_prompt, engine=v.engine, device=v.device,
                                     max_length=v.train.max_length, batch_size=v.search_batch,
                                     backend_cfg=setup.backend)
    facts = dict(start_seconds=time.perf_counter() - start, rss_after_start_mb=resident_bytes()[1] / MIB,
                 path=setup.value_model, served_by=type(evaluator).__name__, batch_size=v.search_batch)
    return evaluator, facts


def value_runs(setup: Setup, policy: StepPolicy, problems: Sequence[Problem], warm: Sequence[Problem],
               points: Sequence[Point], modes: Sequence[str], engines: dict) -> list[Run]:
    """The lockstep search at every point with `search.value` = model (the value model, loaded and warmed
    up outside every timed region, after the batched runs so that their memory figures do not hold it)
    and = none, on the batched mode's engine and budget."""
    evaluator = None
    if VALUE_MODEL in modes:
        evaluator, engines[VALUE_MODEL] = value_evaluator(setup, policy.formatter)
    runs = []
    try:
        if evaluator is not None:
            config = replace(setup.search, value="model", simulations=WARMUP_SIMULATIONS, batch_trees=len(warm))
            for _ in run_search(warm, expander=policy, evaluator=evaluator, verifier=setup.task, config=config,
                                seed=setup.seed):
                pass
        for p in points:
            for mode in modes:
                reset_prefix_cache(getattr(evaluator, "backend", None))  # a vLLM pooling engine's
                run = search_run(mode, policy, problems[:p.trees], setup.task, seed=setup.seed,
                                 config=replace(setup.search, simulations=p.simulations, value=SEARCH_VALUE[mode]),
                                 evaluator=evaluator if mode == VALUE_MODEL else None)
                runs.append(run)
                log.info("%s", row_text(run))
    finally:
        if evaluator is not None:
            evaluator.close()
    return runs


# ---- reporting -----------------------------------------------------------------------------------


def find(runs: Sequence[Run], mode: str, point: Point) -> Run | None:
    return next((r for r in runs if r.mode == mode and (r.trees, r.simulations) == (point.trees, point.simulations)),
                None)


def comparisons(runs: Sequence[Run], points: Sequence[Point]) -> list[Ratios]:
    return [compare(b, find(runs, SEQUENTIAL, p), find(runs, RAW, p))
            for p in points if (b := find(runs, BATCHED, p)) is not None]


def row_text(r: Run) -> str:
    d = rates(r)
    note = f"measured on {r.measured_trees} trees, scaled" if r.measured_trees != r.trees else ""
    return (f"{r.trees:5d} {r.simulations:4d} {r.mode:11s} {r.seconds:9.1f} {r.evaluate_seconds:7.1f} "
            f"{d['seconds_per_tree']:7.2f} "
            f"{r.generated_tokens:9.0f} {d['tokens_per_s']:7.1f} {d['expansions_per_s']:7.2f} "
            f"{d['evaluations_per_s']:7.2f} {r.prompt_tokens:10.0f} {100 * d['cached_share']:6.1f} "
            f"{r.peak_rss_mb:8.0f}  {note}")


HEADER = (f"{'trees':>5s} {'sims':>4s} {'mode':11s} {'time s':>9s} {'eval s':>7s} {'s/tree':>7s} {'gen tok':>9s} "
          f"{'tok/s':>7s} {'exp/s':>7s} {'eval/s':>7s} {'prompt tok':>10s} {'cache%':>6s} {'peak MB':>8s}")


def table(runs: Sequence[Run], ratios: Sequence[Ratios]) -> str:
    order = {m: i for i, m in enumerate(ALL_MODES)}
    lines = [HEADER, *(row_text(r) for r in sorted(runs, key=lambda r: (r.simulations, r.trees, order[r.mode])))]
    lines += ["", f"{'trees':>5s} {'sims':>4s} {'speedup':>8s} {'speedup/tok':>11s} {'overhead':>8s}"]
    lines += [f"{q.trees:5d} {q.simulations:4d} {fmt(q.speedup, '8.1f')} {fmt(q.speedup_per_token, '11.1f')} "
              f"{fmt(q.overhead, '8.2f')}"
              + (f"  (sequential measured on {q.sequential_measured_trees} trees, scaled)"
                 if q.sequential_measured_trees and q.sequential_measured_trees != q.trees else "")
              for q in ratios]
    costs = value_costs(runs, sorted({Point(r.trees, r.simulations) for r in runs},
                                     key=lambda p: (p.simulations, p.trees)))
    if costs:
        lines += ["", "what values new children (search.value), at the same budget:", value_table(costs)]
    return "\n".join(lines)


def markdown_table(runs: Sequence[Run], ratios: Sequence[Ratios]) -> str:
    """The same figures as `table`, as markdown (for docs/results/bench_search.md)."""
    order = {m: i for i, m in enumerate(ALL_MODES)}
    ratio = {(q.trees, q.simulations): q for q in ratios}
    lines = ["| trees | sims | mode | time s | in self-eval s | s/tree | gen tokens | tok/s | expansions/s | "
             "self-evals/s | prompt tokens | cached | peak RSS MB | speedup (time / per token) | overhead |",
             "|---:|---:|:---|" + "---:|" * 12]
    for r in sorted(runs, key=lambda r: (r.simulations, r.trees, order[r.mode])):
        d, q = rates(r), ratio.get((r.trees, r.simulations))
        mode = r.mode + (f" (measured on {r.measured_trees}, scaled)" if r.measured_trees != r.trees else "")
        speed = (f"{fmt(q.speedup, '.1f')}x / {fmt(q.speedup_per_token, '.1f')}x"
                 if q and r.mode == BATCHED and q.speedup is not None else "")
        over = fmt(q.overhead, ".2f") if q and r.mode == BATCHED and q.overhead is not None else ""
        lines.append(f"| {r.trees} | {r.simulations} | {mode} | {r.seconds:.1f} | {r.evaluate_seconds:.1f} | "
                     f"{d['seconds_per_tree']:.2f} | "
                     f"{r.generated_tokens:.0f} | {d['tokens_per_s']:.1f} | {d['expansions_per_s']:.2f} | "
                     f"{d['evaluations_per_s']:.2f} | {r.prompt_tokens:.0f} | {100 * d['cached_share']:.0f}% | "
                     f"{r.peak_rss_mb:.0f} | {speed} | {over} |")
    return "\n".join(lines)


def growth(runs: Sequence[Run], simulations: int) -> dict:
    """How batched time and memory grow with the number of trees at `simulations`: seconds, seconds per
    tree, peak RSS and its rise over the pre-run level, per tree count; `exponent` = slope of log time
    against log trees between the two largest counts (1 = linear)."""
    bs = sorted((r for r in runs if r.mode == BATCHED and r.simulations == simulations), key=lambda r: r.trees)
    out = {str(r.trees): dict(seconds=r.seconds, seconds_per_tree=r.seconds / r.trees, peak_rss_mb=r.peak_rss_mb,
                              rss_rise_mb=r.peak_rss_mb - r.rss_before_mb, peak_own_rss_mb=r.peak_own_rss_mb)
           for r in bs}
    exponent = (math.log(bs[-1].seconds / bs[-2].seconds) / math.log(bs[-1].trees / bs[-2].trees)
                if len(bs) >= 2 else None)
    return dict(by_trees=out, exponent=exponent)


def targets(runs: Sequence[Run], ratios: Sequence[Ratios], base_simulations: int) -> dict:
    """The issue's targets, checked on the measured figures (None where the point or mode was not run).
    Memory: how much the peak resident set grows from the fewest to the most trees, for this process
    alone (the search) and with the engine (whose KV cache fills up with more sequences)."""
    at = TARGETS["at_trees"]
    q = next((q for q in ratios if q.trees == at and q.simulations == base_simulations), None)
    speedups = [v for v in (q.speedup, q.speedup_per_token) if v is not None] if q else []
    overhead = q.overhead if q else None
    shares = [rates(r)["cached_share"] for r in runs if r.mode == BATCHED]
    g = growth(runs, base_simulations)
    by_trees = list(g["by_trees"].values())
    return dict(
        speedup_at_32_trees=q.speedup if q else None,
        speedup_per_token_at_32_trees=q.speedup_per_token if q else None,
        speedup_met=min(speedups) >= TARGETS["speedup_min"] if speedups else None,
        overhead_at_32_trees=overhead,
        overhead_met=overhead <= TARGETS["overhead_max"] if overhead is not None else None,
        min_batched_cached_share=min(shares) if shares else None,
        cached_share_met=min(shares) >= TARGETS["cached_share_min"] if shares else None,
        time_growth_exponent=g["exponent"],
        own_rss_growth_mb=by_trees[-1]["peak_own_rss_mb"] - by_trees[0]["peak_own_rss_mb"] if by_trees else None,
        total_rss_growth_mb=by_trees[-1]["peak_rss_mb"] - by_trees[0]["peak_rss_mb"] if by_trees else None,
        **{f"target_{k}": v for k, v in TARGETS.items()},
    )


def engine_facts(backend: Backend) -> dict:
    """Engine start seconds, resident memory after start, and vLLM's preallocated KV cache (tokens, MB;
    None when the engine does not say)."""
    facts = dict(start_seconds=getattr(backend, "start_seconds", None), rss_after_start_mb=resident_bytes()[1] / MIB,
                 kv_cache_tokens=None, kv_cache_mb=None)
    try:
        vc = backend.llm.llm_engine.vllm_config
        mc, pc = vc.model_config, vc.parallel_config
        tokens = vc.cache_config.num_gpu_blocks * vc.cache_config.block_size
        per_token = 2 * mc.get_num_layers(pc) * mc.get_num_kv_heads(pc) * mc.get_head_size() * mc.dtype.itemsize
        facts.update(kv_cache_tokens=tokens, kv_cache_mb=tokens * per_token / MIB)
    except (AttributeError, TypeError):
        pass
    return facts


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT_DIR), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def setup_meta(setup: Setup, points: Sequence[Point]) -> dict:
    """What was measured, where and when (the JSON's `meta`)."""
    return dict(model=setup.model_path, backend=asdict(setup.backend), search=asdict(setup.search),
                prompt=asdict(setup.prompt), generation=asdict(setup.generation), seed=setup.seed,
                value_model=setup.value_model, value=asdict(setup.value),
                points=[asdict(p) for p in points], commit=git_commit(), python=platform.python_version(),
                machine=platform.machine(), cpus=os.cpu_count(), load_end=os.getloadavg(), host=machine_info(),
                env={k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_"))},
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def report(runs: Sequence[Run], *, meta: dict, engines: dict | None = None) -> dict:
    """The JSON written: meta (with `points` and `base_simulations`), engines, targets, ratios, growth,
    value (`value_costs`: empty without the value modes), runs (with their derived rates), and the table
    as text and as markdown."""
    points = [Point(**p) for p in meta["points"]]
    base_simulations = meta["base_simulations"]
    ratios = comparisons(runs, points)
    return dict(
        meta=meta,
        engines=engines or {},
        targets=targets(runs, ratios, base_simulations),
        ratios=[asdict(q) for q in ratios],
        growth=growth(runs, base_simulations),
        value=[asdict(c) for c in value_costs(runs, points)],
        runs=[dict(asdict(r), **rates(r)) for r in runs],
        table=table(runs, ratios),
        markdown=markdown_table(runs, ratios),
    )


def runs_from_json(result: dict) -> list[Run]:
    """The runs of a written JSON (to report or plot it again with `--report-only`)."""
    names = {f.name for f in fields(Run)}
    runs = []
    for d in result["runs"]:
        d = {k: v for k, v in d.items() if k in names}
        d.update(load_before=tuple(d["load_before"]), load_after=tuple(d["load_after"]),
                 calls=tuple(CallRecord(**c) for c in d.get("calls", ())))
        runs.append(Run(**d))
    return runs


def plot(result: dict, path: Path, *, base_trees: int, base_simulations: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in ALL_MODES:
        for ax, key, fixed, fixed_value in ((axes[0], "trees", "simulations", base_simulations),
                                            (axes[1], "simulations", "trees", base_trees)):
            rs = sorted((r for r in runs if r["mode"] == mode and r[fixed] == fixed_value), key=lambda r: r[key])
            if rs:
                ax.plot([r[key] for r in rs], [r["seconds"] for r in rs], "o-", label=mode)
    mem = sorted((r for r in runs if r["mode"] == BATCHED and r["simulations"] == base_simulations),
                 key=lambda r: r["trees"])
    if mem:
        xs = [r["trees"] for r in mem]
        axes[2].plot(xs, [r["peak_rss_mb"] for r in mem], "o-", label="batched: process + engine")
        axes[2].plot(xs, [r["peak_own_rss_mb"] for r in mem], "o--", label="batched: this process alone")
    facts = result.get("engines", {}).get(BATCHED, {})
    if facts.get("rss_after_start_mb"):
        kv = f" (KV cache {facts['kv_cache_mb']:.0f} MB)" if facts.get("kv_cache_mb") else ""
        axes[2].axhline(facts["rss_after_start_mb"], color="grey", ls=":", label=f"just after engine start{kv}")
    axes[0].set(xscale="log", yscale="log", xlabel="trees", ylabel="wall time (s)",
                title=f"{base_simulations} simulations per tree")
    axes[1].set(xscale="log", yscale="log", xlabel="simulations per tree", ylabel="wall time (s)",
                title=f"{base_trees} trees")
    axes[2].set(xscale="log", yscale="log", xlabel="trees", ylabel="peak resident MB", title="memory")
    for ax, key in ((axes[0], "trees"), (axes[1], "simulations"), (axes[2], "trees")):
        ticks = sorted({r[key] for r in runs})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("raw = engine time for raw generation of as many tokens; sequential scaled from a subset",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_profile(profile: cProfile.Profile) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(PROFILE_TOP)
    stats.sort_stats("tottime").print_stats(PROFILE_TOP)
    return out.getvalue()


# ---- entry point ---------------------------------------------------------------------------------


def backend_config(name: str, overrides: Sequence[str]) -> BackendConfig:
    """conf/backend/<name>.yaml with `key=value` overrides (values parsed as YAML)."""
    d = yaml.safe_load((CONF_DIR / "backend" / f"{name}.yaml").read_text())
    d.update(parse_override(item) for item in overrides)
    return BackendConfig.from_dict(d)


def overridden(config, overrides: Sequence[str]):
    """A config dataclass (defaults = its conf/*/default.yaml) with `key=value` overrides (values as YAML)."""
    return replace(config, **dict(parse_override(item) for item in overrides))


def parse_override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"{item!r}: expected key=value")
    return key, yaml.safe_load(value)


def model_path(model: str) -> str:
    from policy.models import EMBEDDED_MODELS, ModelConfig, resolve_model_path

    return resolve_model_path(ModelConfig(name=model) if model in EMBEDDED_MODELS else ModelConfig(path=model))


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", choices=("vllm", "hf"), default="vllm", help="engine (conf/backend/<name>.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="backend config override")
    ap.add_argument("--prompt-set", action="append", default=[], metavar="KEY=VALUE",
                    help="prompt config override (policy.prompts.PromptConfig), e.g. eval_template=...")
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model name or a Hugging Face folder")
    ap.add_argument("--trees", type=ints, help=f"tree counts (default {DEFAULT_TREES})")
    ap.add_argument("--simulations", type=ints, help=f"simulations per tree (default {DEFAULT_SIMULATIONS})")
    ap.add_argument("--base-trees", type=int, help="trees of the simulations sweep (default: 32 if swept, else middle)")
    ap.add_argument("--base-simulations", type=int, help="simulations of the trees sweep (default: the middle one)")
    ap.add_argument("--full-grid", action="store_true", help="every (trees, simulations) pair, not the star")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated subset of {','.join(ALL_MODES)} (default {','.join(MODES)})")
    ap.add_argument("--value-model", help="a trained value model folder (round_<k>/value): the value_model mode's")
    ap.add_argument("--value-set", action="append", default=[], metavar="KEY=VALUE",
                    help="value config override (policy.value_model.ValueConfig: engine, device, search_batch)")
    ap.add_argument("--sequential-trees", type=int,
                    help=f"trees sequential is measured on (default {SEQUENTIAL_TREES})")
    ap.add_argument("--search-set", action="append", default=[], metavar="KEY=VALUE",
                    help="search config override (mcts.search.SearchConfig) for every mode, e.g. leaves_per_tree=2")
    ap.add_argument("--generation-set", action="append", default=[], metavar="KEY=VALUE",
                    help="generation config override (policy.step_policy.GenerationConfig), e.g. step_max_tokens=32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output")
    ap.add_argument("--plot", action="store_true", help="also write <out>.png")
    ap.add_argument("--profile", action="store_true", help="cProfile this process during the base batched run")
    ap.add_argument("--report-only", type=Path, metavar="JSON",
                    help="no measurement: recompute the report (and --plot) from the runs of a written JSON")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def middle(values: Sequence[int]) -> int:
    return sorted(values)[len(values) // 2]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = cProfile.Profile() if args.profile else None
    if args.report_only:
        stored = json.loads(args.report_only.read_text())
        result = report(runs_from_json(stored), meta=stored["meta"], engines=stored.get("engines"))
    else:
        result = measure(args, profile)
    print(result["table"])
    print(json.dumps(result["targets"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    if args.plot:
        path = plot(result, args.out.with_suffix(".png"), base_trees=result["meta"]["base_trees"],
                    base_simulations=result["meta"]["base_simulations"])
        print(f"-> {path}")
    if profile:
        print(print_profile(profile))
    return result


def measure(args: argparse.Namespace, profile: cProfile.Profile | None) -> dict:
    trees = args.trees or (QUICK_TREES if args.quick else DEFAULT_TREES)
    sims = args.simulations or (QUICK_SIMULATIONS if args.quick else DEFAULT_SIMULATIONS)
    base_trees = args.base_trees or (TARGETS["at_trees"] if TARGETS["at_trees"] in trees else middle(trees))
    base_sims = args.base_simulations or middle(sims)
    points = make_plan(trees, sims, base_trees=base_trees, base_simulations=base_sims, full_grid=args.full_grid)
    modes = tuple(m for m in args.modes.split(",") if m)
    if unknown := set(modes) - set(ALL_MODES):
        raise SystemExit(f"--modes: unknown {sorted(unknown)}")
    if VALUE_MODEL in modes and not args.value_model:
        raise SystemExit(f"--modes {VALUE_MODEL} needs --value-model <a trained value model folder>")

    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(**TASK, n=max(trees) + WARMUP_TREES))
    setup = Setup(model_path=model_path(args.model), backend=backend_config(args.backend, args.set), task=task,
                  problems=tuple(task.problems()), search=overridden(SearchConfig(), args.search_set),
                  generation=overridden(GenerationConfig(), args.generation_set),
                  prompt=overridden(PromptConfig(), args.prompt_set), seed=args.seed,
                  value_model=args.value_model, value=overridden(ValueConfig(), args.value_set))
    load_start = os.getloadavg()
    runs, engines = run_benchmark(
        setup, points, modes=modes, profile=profile, profile_point=Point(base_trees, base_sims),
        sequential_trees=args.sequential_trees or (QUICK_SEQUENTIAL_TREES if args.quick else SEQUENTIAL_TREES))
    meta = dict(setup_meta(setup, points), load_start=load_start, argv=list(args.argv),
                task=dict(TASK, n=len(setup.problems)), base_trees=base_trees, base_simulations=base_sims)
    return report(runs, meta=meta, engines=engines)


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
