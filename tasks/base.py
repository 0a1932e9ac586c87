"""The task protocol: problems, how a question is put to the model, answer extraction and checking.

A Task is also the search's `mcts.types.Verifier` (extract + is_correct).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from mcts.types import Problem


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """A few-shot example: a question and its step-by-step solution (one step per line, the last
    line stating the answer in the task's answer format)."""

    question: str
    solution: str


class Task(Protocol):
    name: str
    instruction: str  # put before the question: how to solve and how to state the answer
    few_shot: Sequence[Example]

    def problems(self) -> list[Problem]:
        """All problems of this task's split, in a fixed order."""
        ...

    def user_message(self, problem: Problem) -> str:
        """The user turn for `problem` (instruction + question)."""
        ...

    def extract(self, text: str) -> str | None:
        """The final answer stated in `text`, or None."""
        ...

    def is_correct(self, predicted: str | None, problem: Problem) -> bool:
        ...
