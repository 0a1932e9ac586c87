"""Problems and answer checking: generated arithmetic, data-file loaders, answer extraction and grading.

    from tasks import TaskConfig, make_task
    task = make_task(TaskConfig(kind="gsm8k", name="gsm8k_test", path="../shared/data/gsm8k_test.jsonl"))
    task.problems(); task.user_message(p); task.extract(text); task.is_correct(answer, p)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mcts.types import Problem
from tasks import arith, loaders
from tasks.base import DataError, Example, Task
from tasks.extract import FORMATS
from tasks.task import AnswerTask

__all__ = ["TaskConfig", "make_task", "DataError", "Example", "Task", "AnswerTask", "KINDS", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # relative task paths start here, not at the cwd

# kind -> its answer format (the default for TaskConfig.answer_format)
KINDS = {
    "arith": "number", "gsm8k": "number", "math": "latex", "svamp": "number", "mawps": "number",
    "jsonl": "number", "multiple_choice": "letter",
}


@dataclass(frozen=True)
class TaskConfig:
    """The `task` config group (also each `eval_tasks.<name>`).

    name: the task's name in logs, eval.json and problem ids ("<name>-<line>").
    kind: arith (generated word problems), gsm8k, math, svamp, mawps (ToRA's jsonl files),
        jsonl (any file, with the *_field settings) or multiple_choice.
    path: the data file (all kinds but arith); a relative path is taken from the project root (the
        folder holding tasks/), not from the working directory.
    split: arith only: train, dev or test (disjoint question sets; dev is for choosing defaults).
    n: arith only: how many problems to generate.
    difficulties: arith only: numbers of operations (1-4); problem i has difficulties[i % len].
    seed: arith only: which problems to generate.
    question_field, answer_field: jsonl and multiple_choice: the fields holding the question and
        the gold answer (multiple_choice: the letter).
    solution_field: jsonl only: a field with a reference solution (null = none).
    id_field: jsonl only: a field with unique ids (null = ids from line numbers).
    choices_field: multiple_choice only: a list of choices or a dict letter -> text.
    answer_format: number, latex or letter; null = the kind's (math: latex, multiple_choice:
        letter, the others: number). Decides how answers are extracted and compared.
    few_shot: how many built-in worked examples (hand-written per answer format in tasks/task.py,
        never from evaluation data) precede the question as earlier chat turns.
    instruction: text put before each question; null = the answer format's default, which asks for
        one step per line and a last line "<answer_prefix> N.".
    answer_prefix: the phrase before the final answer (matched case-insensitively).
    """

    name: str = "arith"
    kind: str = "arith"
    path: str | None = None
    split: str = "train"
    n: int = 1000
    difficulties: tuple[int, ...] = (1, 2)
    seed: int = 0
    question_field: str = "question"
    answer_field: str = "answer"
    solution_field: str | None = None
    id_field: str | None = None
    choices_field: str = "choices"
    answer_format: str | None = None
    few_shot: int = 1
    instruction: str | None = None
    answer_prefix: str = "The answer is"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.answer_format is not None and self.answer_format not in FORMATS:
            raise ValueError(f"task.answer_format={self.answer_format!r}: expected one of {', '.join(FORMATS)} or null")
        if self.kind == "arith":
            if self.split not in arith.SPLITS:
                raise ValueError(f"task.split={self.split!r}: expected one of {', '.join(arith.SPLITS)} for kind arith")
            if self.n < 0:
                raise ValueError(f"task.n={self.n}: must be >= 0")
            if not self.difficulties or any(not 1 <= d <= arith.MAX_DIFFICULTY for d in self.difficulties):
                raise ValueError(f"task.difficulties={list(self.difficulties)}: expected values from 1 to "
                                 f"{arith.MAX_DIFFICULTY}")
        if self.few_shot < 0:
            raise ValueError(f"task.few_shot={self.few_shot}: must be >= 0")
        if not self.answer_prefix.strip():
            raise ValueError("task.answer_prefix must not be empty")


def resolve_path(path: str) -> Path:
    """`path` with ~ expanded; a relative path is taken from the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def _loader(cfg: TaskConfig, answer_format: str) -> Callable[[], list[Problem]]:
    if cfg.kind == "arith":
        return lambda: arith.generate(cfg.n, split=cfg.split, difficulties=cfg.difficulties, seed=cfg.seed,
                                      answer_prefix=cfg.answer_prefix)
    if cfg.path is None:
        raise DataError(f"task.path is required for kind {cfg.kind} (task {cfg.name!r}): set task.path=<file.jsonl>")
    path = resolve_path(cfg.path)
    prefix = {"answer_prefix": cfg.answer_prefix}
    by_kind: dict[str, Callable[[], list[Problem]]] = {
        "gsm8k": lambda: loaders.load_gsm8k(path, name=cfg.name, **prefix),
        "math": lambda: loaders.load_math(path, name=cfg.name, **prefix),
        "svamp": lambda: loaders.load_svamp(path, name=cfg.name, **prefix),
        "mawps": lambda: loaders.load_mawps(path, name=cfg.name),
        "jsonl": lambda: loaders.load_jsonl(
            path, name=cfg.name, question_field=cfg.question_field, answer_field=cfg.answer_field,
            solution_field=cfg.solution_field, id_field=cfg.id_field, numeric=answer_format == "number"),
        "multiple_choice": lambda: loaders.load_multiple_choice(
            path, name=cfg.name, question_field=cfg.question_field, choices_field=cfg.choices_field,
            answer_field=cfg.answer_field),
    }
    return by_kind[cfg.kind]


def make_task(cfg: TaskConfig, tool=None) -> AnswerTask:
    """The task described by `cfg`. Problems are generated or loaded on the first `problems()` call;
    a missing data file raises DataError then (a missing `path` raises DataError here).

    tool: a `tools.config.ToolConfig`; when it enables a tool, the task is written in the tool format
    (its instruction and `tool.few_shot` built-in tool-format examples, unless `task.instruction` is set)."""
    if cfg.kind not in KINDS:  # TaskConfig checks this too; kept for configs built around it
        raise ValueError(f"unknown task kind {cfg.kind!r}: expected one of {', '.join(KINDS)}")
    answer_format = cfg.answer_format or KINDS[cfg.kind]
    style = "python" if tool is not None and tool.enabled else "cot"
    few_shot = tool.few_shot if style == "python" else cfg.few_shot
    return AnswerTask(name=cfg.name, load=_loader(cfg, answer_format), answer_format=answer_format,
                      answer_prefix=cfg.answer_prefix, instruction=cfg.instruction, few_shot=few_shot, style=style,
                      rationale=tool.rationale if style == "python" else "generic")
