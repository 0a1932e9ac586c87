"""Loaders for JSON-lines data files (formats in ../shared/data/README.md) -> list[Problem].

Every loader reads one JSON object per line (blank lines are skipped) and raises DataError naming
"<file>:<line>" for unparsable JSON, a missing field or a gold answer that cannot be parsed, and
"<file>: ..." for a missing or empty file. Problem ids are "<name>-<line number>" (or
"<name>-<id field>" for the generic loader with id_field set). Reference solutions, where the data
has one, are one step per line and end with "<answer_prefix> <answer>." like the model's output.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mcts.jsonl import iter_jsonl
from mcts.types import Problem
from tasks.base import DataError
from tasks.checker import choice_letter, normalize_number
from tasks.extract import last_boxed

DEFAULT_PREFIX = "The answer is"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

Row = Mapping[str, Any]


def _rows(path: str | Path) -> Iterator[tuple[int, Row]]:
    """(line number, object) for every non-blank line; DataError for a missing, empty or bad file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    count = 0
    for lineno, row in iter_jsonl(path, error=DataError):
        count += 1
        yield lineno, row
    if count == 0:
        raise DataError(f"{path}: no problems (empty file)")


def _field(row: Row, key: str, where: str) -> Any:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r} (fields: {', '.join(map(str, row)) or 'none'})")
    return row[key]


def _text(row: Row, key: str, where: str) -> str:
    value = _field(row, key, where)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.80}")
    return value.strip()


def number_answer(value: Any, where: str) -> str:
    """A numeric gold answer as a canonical string (145.0 -> "145", "1,234" -> "1234")."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: cannot parse the gold answer {value!r:.80} (expected a number)")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where}: cannot parse the gold answer {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if normalize_number(value) is None:
        raise DataError(f"{where}: cannot parse the gold answer {value!r:.80} (expected a number)")
    return value.strip().replace(",", "")


def _solution(steps: list[str], answer: str, answer_prefix: str) -> str:
    return "\n".join([*steps, f"{answer_prefix} {answer}."])


def _load(path: str | Path, name: str, convert: Callable[[Row, str], tuple[str, str, str | None]]) -> list[Problem]:
    """Problems from `path`; `convert(row, where)` gives (question, answer, solution)."""
    problems = []
    for lineno, row in _rows(path):
        question, answer, solution = convert(row, f"{path}:{lineno}")
        problems.append(Problem(id=f"{name}-{lineno}", question=question, answer=answer, solution=solution))
    return problems


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def load_gsm8k(path: str | Path, *, name: str = "gsm8k", answer_prefix: str = DEFAULT_PREFIX) -> list[Problem]:
    """GSM8K: question, answer ("...steps...\\n#### N"); gold = N without commas; the solution is the
    steps without the <<calculator notes>>."""

    def convert(row: Row, where: str):
        text = _text(row, "answer", where)
        if "####" not in text:
            raise DataError(f"{where}: cannot parse the gold answer: no '####' in field 'answer'")
        body, _, gold = text.rpartition("####")
        answer = number_answer(gold.strip(), where)
        steps = [s.strip() for s in _CALCULATOR.sub("", body).splitlines() if s.strip()]
        return _text(row, "question", where), answer, _solution(steps, answer, answer_prefix)

    return _load(path, name, convert)


def load_math(path: str | Path, *, name: str = "math", answer_prefix: str = DEFAULT_PREFIX) -> list[Problem]:
    """MATH: problem, solution; gold = the content of the last \\boxed{...} (or \\fbox{...})."""

    def convert(row: Row, where: str):
        text = _text(row, "solution", where)
        answer = last_boxed(text)
        if answer is None or not answer.strip():
            raise DataError(f"{where}: cannot parse the gold answer: no \\boxed{{...}} in field 'solution'")
        answer = answer.strip()
        steps = [s.strip() for s in text.splitlines() if s.strip()]
        return _text(row, "problem", where), answer, _solution(steps, f"\\boxed{{{answer}}}", answer_prefix)

    return _load(path, name, convert)


_FLOAT = re.compile(r"(\d+)\.0\b")


def _strip_parens(expr: str) -> str:
    """`expr` without parentheses around all of it: "( 2 + 3 )" -> "2 + 3"; "(1) + (2)" stays."""
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, c in enumerate(expr):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                break
        if i != len(expr) - 1:
            break
        expr = expr[1:-1].strip()
    return expr


def load_svamp(path: str | Path, *, name: str = "svamp", answer_prefix: str = DEFAULT_PREFIX) -> list[Problem]:
    """SVAMP: question = Body + " " + Question; gold = Answer (145.0 -> "145"); the solution is the
    Equation with its value."""

    def convert(row: Row, where: str):
        question = _text(row, "Body", where) + " " + _text(row, "Question", where)
        answer = number_answer(_field(row, "Answer", where), where)
        equation = row.get("Equation")
        steps = []
        if isinstance(equation, str) and equation.strip():
            expr = _strip_parens(_FLOAT.sub(r"\1", equation.strip()))
            steps.append(f"{expr} = {answer}.")
        return question, answer, _solution(steps, answer, answer_prefix)

    return _load(path, name, convert)


def load_mawps(path: str | Path, *, name: str = "mawps") -> list[Problem]:
    """MAWPS (ToRA's files): input, target (a number); no reference solution."""

    def convert(row: Row, where: str):
        return _text(row, "input", where), number_answer(_field(row, "target", where), where), None

    return _load(path, name, convert)


def load_jsonl(path: str | Path, *, name: str = "jsonl", question_field: str = "question",
               answer_field: str = "answer", solution_field: str | None = None, id_field: str | None = None,
               numeric: bool = False) -> list[Problem]:
    """Any JSON lines file: the question, the gold answer (a string or number; `numeric` requires a
    number) and optionally a solution and an id (ids must be unique)."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for lineno, row in _rows(path):
        where = f"{path}:{lineno}"
        value = _field(row, answer_field, where)
        if numeric or isinstance(value, (int, float)):
            answer = number_answer(value, where)
        elif isinstance(value, str) and value.strip():
            answer = value.strip()
        else:
            raise DataError(f"{where}: cannot parse the gold answer {value!r:.80}")
        solution = _text(row, solution_field, where) if solution_field else None
        key = str(_field(row, id_field, where)) if id_field else str(lineno)
        if key in seen:
            raise DataError(f"{where}: duplicate id {key!r} (also on line {seen[key]})")
        seen[key] = lineno
        problems.append(Problem(id=f"{name}-{key}", question=_text(row, question_field, where), answer=answer,
                                solution=solution))
    return problems


def render_choices(question: str, choices: Mapping[str, str]) -> str:
    """The question followed by one "(A) text" line per choice."""
    return "\n".join([question, *(f"({letter}) {text}" for letter, text in choices.items())])


def _choices(value: Any, where: str, key: str) -> dict[str, str]:
    if isinstance(value, list) and 2 <= len(value) <= len(LETTERS):
        items = list(zip(LETTERS, value))
    elif isinstance(value, dict) and len(value) >= 2:
        items = [(choice_letter(str(k)), v) for k, v in value.items()]
    else:
        raise DataError(f"{where}: field {key!r} must be a list of at least 2 choices or a dict letter -> text")
    if any(letter is None or not isinstance(text, (str, int, float)) for letter, text in items):
        raise DataError(f"{where}: field {key!r} needs single-letter keys and text values")
    letters = [letter for letter, _ in items]
    if len(set(letters)) != len(letters):
        raise DataError(f"{where}: field {key!r} has a repeated letter")
    return {letter: str(text).strip() for letter, text in items}


def load_multiple_choice(path: str | Path, *, name: str = "multiple_choice", question_field: str = "question",
                         choices_field: str = "choices", answer_field: str = "answer") -> list[Problem]:
    """Multiple choice: question, choices (a list, lettered A, B, ..., or a dict letter -> text) and
    the answer letter ("B" or "(B)"). The question is rendered with its lettered choices."""

    def convert(row: Row, where: str):
        choices = _choices(_field(row, choices_field, where), where, choices_field)
        raw = _field(row, answer_field, where)
        letter = choice_letter(str(raw))
        if letter is None or letter not in choices:
            raise DataError(f"{where}: cannot parse the gold answer {raw!r:.40}: expected one of "
                            f"{', '.join(choices)}")
        return render_choices(_text(row, question_field, where), choices), letter, None

    return _load(path, name, convert)
