"""Generation with a python tool (ToRA): the model writes a program, stops at the output fence, the
sandbox runs it, its output block is appended, and the model continues. Batched: every round of
programs in a call is generated in one backend call and run in one sandbox batch.

Two shapes, both used by the search (policy/step_policy.py) and the evaluation:

- `sample_solutions`: whole solutions (greedy and sampled evaluation, to-the-end expansions, the
  sampling pair source): sample with the output fence as the stop string; samples that stopped there
  have their last program run and continue (n=1 each), up to `tool.max_calls` programs and the
  solution's token budget.
- `complete_programs`: one search step that opens a program (a line starting with the python fence) is
  continued up to the output fence, run, and closed with its output block, so that the step holds the
  whole program and its output.

Seeds: with per-prompt seeds (`SamplingSettings.seeds`), sample j of prompt i is seeded from
derive_seed(seed_i, j) and each of its continuations from derive_seed(that, programs run so far);
`complete_programs`' continuations are seeded by the engine (backend.seed and the call's index).

A sample's `logprob` and `num_tokens` are the policy's own tokens only; the output blocks' tokens are
the environment's (never generated, never counted). `prompt_tokens` and `cached_tokens` add up every
call made for the prompt (continuations re-send the growing prompt; the prefix cache serves it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from mcts.seeds import derive_seed  # the project's one seed derivation
from mcts.types import NO_PROGRAM_ERROR, ToolCall
from policy.backends.base import FINISH_LENGTH, FINISH_STOP, Backend, Completion, SamplingSettings
from tools.config import ToolConfig
from tools.format import OUTPUT_OPEN, extract_code, output_block, sanitize_output
from tools.sandbox import run_programs

log = logging.getLogger(__name__)

NO_PROGRAM = "no program before the output fence"  # shown when the model opens an output block with no code


@dataclass(frozen=True)
class ToolSample:
    """A generated text that may hold programs and their outputs (see the module docstring)."""

    text: str
    num_tokens: int
    logprob: float
    finish_reason: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ToolCompletion:
    samples: tuple[ToolSample, ...]
    prompt_tokens: int
    cached_tokens: int = 0


@dataclass
class ToolStats:
    """What the tool cost (mutable counters a policy owns): programs run, failed, sandbox wall time."""

    calls: int = 0
    failed: int = 0
    batches: int = 0
    seconds: float = 0.0
    programs_seconds: float = 0.0  # sum of the programs' own times (more than `seconds` when run in parallel)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Draft:
    """A sample being continued."""

    prompt: int
    text: str
    num_tokens: int
    logprob: float
    finish_reason: str
    calls: list[ToolCall] = field(default_factory=list)
    prior_calls: int = 0
    seed: int | None = None  # the sample's seed; its continuations derive theirs from it


def no_program() -> ToolCall:
    """The environment's answer to an output fence with no program before it (nothing was run)."""
    return ToolCall(code="", output=NO_PROGRAM, ok=False, seconds=0.0, error=NO_PROGRAM_ERROR)


def ran_share(stats: dict) -> float | None:
    """The share of run programs that exited normally (ToolStats.as_dict()); None when none ran."""
    return 1 - stats["failed"] / stats["calls"] if stats.get("calls") else None


class ToolExecutor:
    """Runs the programs of one wave in one sandbox batch and counts what that cost."""

    def __init__(self, cfg: ToolConfig):
        self.cfg = cfg
        self.stats = ToolStats()

    def run(self, codes: Sequence[str | None]) -> list[ToolCall]:
        """One ToolCall per code (None: the model opened an output block without a program)."""
        real = [i for i, c in enumerate(codes) if c is not None]
        start = time.perf_counter()
        results = run_programs([codes[i] for i in real], self.cfg.sandbox) if real else []
        if real:
            self.stats.batches += 1
            self.stats.seconds += time.perf_counter() - start
        out: list[ToolCall] = [no_program() for _ in codes]
        for i, r in zip(real, results):
            out[i] = ToolCall(code=codes[i], output=sanitize_output(r.output), ok=r.ok, seconds=r.seconds,
                              error=r.error)
            self.stats.calls += 1
            self.stats.failed += not r.ok
            self.stats.programs_seconds += r.seconds
        return out


def _stopped_at_fence(reason: str) -> bool:
    return reason == FINISH_STOP


def _continue(drafts: list[_Draft], prompts: Sequence[str], backend: Backend, executor: ToolExecutor,
              settings: SamplingSettings, budget: int, cost: list[list[int]]) -> None:
    """Run the last program of every draft that stopped at the output fence, append its output block,
    and continue it (n=1), round after round, until none stops at the fence or runs out of calls/tokens."""
    max_calls = executor.cfg.max_calls
    while True:
        pending = [d for d in drafts if _stopped_at_fence(d.finish_reason)]
        if not pending:
            return
        live = []
        for d in pending:
            if d.prior_calls + len(d.calls) >= max_calls or d.num_tokens >= budget:
                d.finish_reason = FINISH_LENGTH  # ToRA: past the last allowed call the solution ends, the program unrun
            else:
                live.append(d)
        pending = live
        if not pending:
            return
        calls = executor.run([extract_code(d.text) for d in pending])
        for d, call in zip(pending, calls):
            d.text += OUTPUT_OPEN + output_block(call.output)
            d.calls.append(call)
        # One call for every continuation of this round (lockstep batching); its length limit is the
        # largest budget left, so a draft may end up to (that - its own) tokens past the budget.
        max_tokens = max(1, max(budget - d.num_tokens for d in pending))
        seeds = (None if any(d.seed is None for d in pending)
                 else tuple(derive_seed(d.seed, len(d.calls)) for d in pending))
        outs = backend.sample([prompts[d.prompt] + d.text for d in pending],
                              replace(settings, n=1, max_tokens=max_tokens, seeds=seeds))
        for d, completion in zip(pending, outs):
            s = completion.samples[0]
            d.text += s.text
            d.num_tokens += s.num_tokens
            d.logprob += s.logprob
            d.finish_reason = s.finish_reason
            cost[d.prompt][0] += completion.prompt_tokens
            cost[d.prompt][1] += completion.cached_tokens


def sample_solutions(backend: Backend, prompts: Sequence[str], settings: SamplingSettings,
                     executor: ToolExecutor | None, *,
                     prior_calls: Sequence[int] | None = None) -> list[ToolCompletion]:
    """`settings.n` whole continuations per prompt; with an executor, programs run as they are written
    (see the module docstring). `prior_calls[i]`: programs already in prompt i's partial solution."""
    if executor is None:
        return [_plain(c) for c in backend.sample(prompts, settings)]
    settings = replace(settings, stop=tuple(dict.fromkeys((*settings.stop, OUTPUT_OPEN))))
    completions = backend.sample(prompts, settings)
    cost = [[c.prompt_tokens, c.cached_tokens] for c in completions]
    drafts = [[_Draft(prompt=i, text=s.text, num_tokens=s.num_tokens, logprob=s.logprob, finish_reason=s.finish_reason,
                      prior_calls=prior_calls[i] if prior_calls else 0,
                      seed=None if settings.seeds is None else derive_seed(settings.seeds[i], j))
               for j, s in enumerate(c.samples)]
              for i, c in enumerate(completions)]
    _continue([d for ds in drafts for d in ds], prompts, backend, executor, settings, settings.max_tokens, cost)
    return [ToolCompletion(samples=tuple(_sample(d) for d in ds), prompt_tokens=cost[i][0], cached_tokens=cost[i][1])
            for i, ds in enumerate(drafts)]


def complete_programs(backend: Backend, prompts: Sequence[str], openings: Sequence[tuple[int, str]],
                      settings: SamplingSettings, executor: ToolExecutor, *, separator: str,
                      prior_calls: Sequence[int]) -> list[tuple[ToolSample, int, int]]:
    """Continue each opening step (prompt index, the step's text, which opens a program) to the output
    fence, run the program and close the step with its output block. Returns per opening the
    continuation alone (text after opening + separator, its tokens, log-prob, calls) and the prompt
    and cached tokens of its calls. An opening past `max_calls` is not continued (finish: length)."""
    out: list[tuple[ToolSample, int, int] | None] = [None] * len(openings)
    live = []
    for k, (i, _) in enumerate(openings):
        if prior_calls[i] >= executor.cfg.max_calls:
            out[k] = (ToolSample("", 0, 0.0, FINISH_LENGTH), 0, 0)
        else:
            live.append(k)
    if not live:
        return out  # type: ignore[return-value]
    code_settings = replace(settings, n=1, max_tokens=executor.cfg.code_max_tokens, stop=(OUTPUT_OPEN,), seeds=None)
    heads = [prompts[openings[k][0]] + openings[k][1] + separator for k in live]
    completions = backend.sample(heads, code_settings)
    cost = [[c.prompt_tokens, c.cached_tokens] for c in completions]
    drafts = [_Draft(prompt=j, text=c.samples[0].text, num_tokens=c.samples[0].num_tokens, logprob=c.samples[0].logprob,
                     finish_reason=c.samples[0].finish_reason, prior_calls=prior_calls[openings[k][0]])
              for j, (k, c) in enumerate(zip(live, completions))]
    pending = [d for d in drafts if _stopped_at_fence(d.finish_reason)]
    calls = executor.run([extract_code(openings[live[d.prompt]][1] + separator + d.text) for d in pending])
    for d, call in zip(pending, calls):
        d.text += OUTPUT_OPEN + output_block(call.output)
        d.calls.append(call)
        d.finish_reason = FINISH_STOP  # the step ends with its output block; the solution goes on
    for d in drafts:
        out[live[d.prompt]] = (_sample(d), cost[d.prompt][0], cost[d.prompt][1])
    return out  # type: ignore[return-value]


def _sample(d: _Draft) -> ToolSample:
    return ToolSample(text=d.text, num_tokens=d.num_tokens, logprob=d.logprob, finish_reason=d.finish_reason,
                      tool_calls=tuple(d.calls))


def _plain(c: Completion) -> ToolCompletion:
    return ToolCompletion(samples=tuple(ToolSample(s.text, s.num_tokens, s.logprob, s.finish_reason)
                                        for s in c.samples),
                          prompt_tokens=c.prompt_tokens, cached_tokens=c.cached_tokens)
