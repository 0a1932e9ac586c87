"""Protocols through which the search reaches a model, and the small frozen types they exchange.

`mcts` imports nothing from `policy`, `tasks` or any ML library: the search sees a model only through
`Expander` (sample next steps), `Evaluator` (step-level self-evaluation) and `Verifier` (answer
extraction and outcome validation). A fake policy in a test implements these in a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Problem:
    """One problem to solve.

    id: stable identifier (unique within a task split); seeds and file lines refer to it.
    question: the problem text as given to the model (no formatting, no instructions).
    answer: the gold final answer as a string ("72", "\\frac{1}{2}", "B").
    solution: an optional reference solution (step by step), used only where config allows.
    """

    id: str
    question: str
    answer: str
    solution: str | None = None


NO_PROGRAM_ERROR = "no_program"
"""ToolCall.error of the environment's answer to an output fence with no program before it: nothing ran."""


@dataclass(frozen=True)
class ToolCall:
    """One program that a step ran (tool-integrated reasoning, ToRA).

    code: the program as the policy wrote it.
    output: what the environment showed the policy: stdout (truncated), or the last line of the error.
    ok: the program exited normally within its limits.
    seconds: its wall time in the sandbox.
    error: None when ok, else the class of failure (exception, timeout, memory, ...; tools/sandbox.py).
    """

    code: str
    output: str
    ok: bool
    seconds: float
    error: str | None = None


def programs_run(calls) -> int:
    """Programs actually run among `calls` (ToolCalls or their dicts): a no-program answer is not one."""
    return sum((c.get("error") if isinstance(c, dict) else c.error) != NO_PROGRAM_ERROR for c in calls)


@dataclass(frozen=True)
class StepSample:
    """One sampled continuation of a partial solution.

    text: the step text without the trailing stop string (e.g. without the newline). A step that ran
        programs holds them with their output blocks (tools/format.py); the output is the environment's.
    num_tokens: generated tokens for this sample (including a matched stop string's tokens); the
        environment's output tokens are not generated and not counted.
    logprob: summed log-probability of the generated tokens (the policy's only, never an output's).
    finished: True when generation ended by end-of-sequence or the length limit rather than at a
        step boundary (a stop string); such a step ends the solution.
    tool_calls: the programs this step ran, in order (empty without tools).
    """

    text: str
    num_tokens: int
    logprob: float
    finished: bool
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ExpandRequest:
    """Ask for `n` next steps after `steps` for `problem`.

    to_end: generate the rest of the solution in one go instead of one step (used at the depth limit).
    seed: a per-request seed derived from (seed, round, problem id, node id); engines that cannot
        seed per request may ignore it.
    """

    problem: Problem
    steps: tuple[str, ...]
    n: int
    to_end: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Expansion:
    """The samples for one ExpandRequest and what the request cost."""

    samples: tuple[StepSample, ...]
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class EvalRequest:
    """Ask the policy to judge the partial solution `steps` of `problem` (self-evaluation)."""

    problem: Problem
    steps: tuple[str, ...]


@dataclass(frozen=True)
class Evaluation:
    """A self-evaluation score in [0, 1] (probability of the 'correct' choice) and its cost."""

    score: float
    prompt_tokens: int = 0
    cached_tokens: int = 0


class Expander(Protocol):
    def expand(self, requests: Sequence[ExpandRequest]) -> list[Expansion]:
        """One batched call: one Expansion per request, in order."""
        ...


class Evaluator(Protocol):
    def evaluate(self, requests: Sequence[EvalRequest]) -> list[Evaluation]:
        """One batched call: one Evaluation per request, in order."""
        ...


class Verifier(Protocol):
    def extract(self, text: str) -> str | None:
        """The final answer stated in `text` (a step or a whole solution), or None if there is none."""
        ...

    def is_correct(self, predicted: str | None, problem: Problem) -> bool:
        """Outcome validation: does `predicted` match the problem's gold answer?"""
        ...
