"""The one Task implementation: a problem source, an answer format, and the built-in few-shot examples.

Few-shot examples are hand-written here, per answer format, and never taken from evaluation data;
their last line is rendered with the task's answer prefix, so changing the prefix keeps the examples,
the instruction and the extraction consistent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from mcts.types import Problem
from tasks.base import Example
from tasks.checker import answers_equal, letters_equal
from tasks.extract import FORMATS, extract_answer
from tools.format import program_step, prose

STYLES = ("cot", "python")
"""How a solution is written: chain of thought (one step per line) or ToRA's tool-integrated format
(rationale lines and python programs whose output the environment appends; tools/format.py)."""

# A default instruction per answer format; {prefix} is the task's answer prefix.
INSTRUCTIONS = {
    "number": 'Solve the problem step by step, one step per line. End with a line "{prefix} N." where N is a number.',
    "latex": "Solve the problem step by step, one step per line. "
             'End with a line "{prefix} \\boxed{{ANSWER}}." with the final answer in LaTeX.',
    "letter": 'Think step by step, one step per line. End with a line "{prefix} (X)." where X is the letter '
              "of the correct choice.",
}

# The same in the tool-integrated format (style "python").
# The number examples carry the format alone (an instruction made no difference beyond the noise on arith_dev).
TOOL_INSTRUCTIONS = {
    "number": "",
    "latex": "Solve the problem with python. Write one line of reasoning, then a ```python block that prints "
             'the result; you will see its ```output. End with a line "{prefix} \\boxed{{ANSWER}}." with the '
             "final answer in LaTeX.",
}


@dataclass(frozen=True)
class _Shot:
    """A worked example: question, steps (one per line) and the answer as stated in the last line."""

    question: str
    steps: tuple[str, ...]
    answer: str


# Names and objects here are not in tasks/arith.py's word lists, so no generated problem equals them.
_SHOTS = {
    "number": (
        _Shot("Priya has 14 crayons. She buys 9 more crayons and then gives 5 crayons to her brother. "
              "How many crayons does Priya have now?",
              ("Priya starts with 14 crayons.", "She buys 9 more, so 14 + 9 = 23.",
               "She gives away 5, so 23 - 5 = 18."), "18"),
        _Shot("A farmer packs 6 crates with 8 melons in each crate. He sells the melons in bags of 4. "
              "How many bags does he fill?",
              ("The farmer has 6 crates of 8 melons, so 6 x 8 = 48.", "Each bag holds 4, so 48 / 4 = 12."), "12"),
        _Shot("Dmitri reads 25 pages on Monday and twice as many pages on Tuesday. How many pages does he "
              "read in the two days?",
              ("On Tuesday he reads twice as many, so 25 x 2 = 50.", "In the two days he reads 25 + 50 = 75."), "75"),
    ),
    "latex": (
        _Shot("What is the value of $\\frac{3}{4} + \\frac{1}{6}$?",
              ("The common denominator of 4 and 6 is 12.",
               "$\\frac{3}{4} = \\frac{9}{12}$ and $\\frac{1}{6} = \\frac{2}{12}$.",
               "So the sum is $\\frac{9}{12} + \\frac{2}{12} = \\frac{11}{12}$."), "\\boxed{\\frac{11}{12}}"),
        _Shot("Solve for $x$: $3x - 7 = 11$.",
              ("Adding 7 to both sides gives $3x = 18$.", "Dividing both sides by 3 gives $x = 6$."), "\\boxed{6}"),
    ),
    "letter": (
        _Shot("Which of these animals is a mammal?\n(A) shark\n(B) dolphin\n(C) trout\n(D) octopus",
              ("A shark and a trout are fish, and an octopus is a mollusc.",
               "A dolphin breathes air and feeds its young with milk, so it is a mammal."), "(B)"),
        _Shot("Which of these is a prime number?\n(A) 21\n(B) 27\n(C) 29\n(D) 33",
              ("21 = 3 x 7, 27 = 3 x 9 and 33 = 3 x 11 are not prime.", "29 has no divisor other than 1 and 29."),
              "(C)"),
    ),
}

# Tool-format examples (ToRA's shape: a rationale line, a program that prints the result, its output,
# the answer line), hand-written on the same questions as the chain-of-thought ones. The output blocks
# are what tools/format.py's executor writes for these programs. The number examples open with one
# generic rationale line, or (rationale "none") with the program itself: SmolLM2-135M copied
# problem-specific lines into other problems and then often wrote no program (docs/tools.md,
# "Choosing the prompt"; measured on arith_dev only).
TOOL_RATIONALE = "Let's write a program."
RATIONALES = ("generic", "none")
"""How the number examples open: the generic line above, or the program (tool.rationale)."""

_NUMBER_PROGRAMS = (
    ("crayons = 14 + 9 - 5\nprint(crayons)", "18"),
    ("melons = 6 * 8\nbags = melons // 4\nprint(bags)", "12"),
    ("monday = 25\ntuesday = 2 * monday\nprint(monday + tuesday)", "75"),
)


def _number_tool_shots(rationale: str) -> tuple[_Shot, ...]:
    opening = (TOOL_RATIONALE,) if rationale == "generic" else ()
    return tuple(_Shot(shot.question, (*opening, program_step(code, output)), shot.answer)
                 for shot, (code, output) in zip(_SHOTS["number"], _NUMBER_PROGRAMS))


_LATEX_TOOL_SHOTS = (
    _Shot(_SHOTS["latex"][0].question,
          ("We add the fractions exactly with sympy.",
           program_step("from sympy import Rational\nprint(Rational(3, 4) + Rational(1, 6))", "11/12")),
          "\\boxed{\\frac{11}{12}}"),
    _Shot(_SHOTS["latex"][1].question,
          ("We solve the linear equation with sympy.",
           program_step("from sympy import symbols, solve\nx = symbols('x')\nprint(solve(3*x - 7 - 11, x))", "[6]")),
          "\\boxed{6}"),
)


def _shot_table(style: str, rationale: str) -> dict[str, tuple[_Shot, ...]]:
    if style == "cot":
        return _SHOTS
    if rationale not in RATIONALES:
        raise ValueError(f"tool.rationale={rationale!r}: expected one of {', '.join(RATIONALES)}")
    return {"number": _number_tool_shots(rationale), "latex": _LATEX_TOOL_SHOTS}


def answer_matches(gold: str, predicted: str | None, answer_format: str) -> bool:
    """The grading rule of every task: letters compare as letters, numbers and LaTeX with the checker."""
    if predicted is None:
        return False
    if answer_format == "letter":
        return letters_equal(gold, predicted)
    return answers_equal(gold, predicted)


def few_shot_examples(answer_format: str, k: int, *, prefix: str, style: str = "cot",
                      rationale: str = "generic") -> tuple[Example, ...]:
    """The first `k` built-in examples for `answer_format` in `style`, their last line "<prefix> <answer>.";
    `rationale` chooses how the tool-format number examples open (RATIONALES)."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {', '.join(STYLES)}")
    table = _shot_table(style, rationale)
    if answer_format not in table:
        raise ValueError(f"there are no built-in {style} examples for {answer_format} answers: "
                         f"use tool=none for {answer_format} tasks")
    shots = table[answer_format]
    if not 0 <= k <= len(shots):
        raise ValueError(f"few_shot={k}: there are {len(shots)} built-in {style} examples for {answer_format} answers")
    return tuple(Example(s.question, "\n".join([*s.steps, f"{prefix} {s.answer}."])) for s in shots[:k])


class AnswerTask:
    """A task graded by its final answer (implements tasks.base.Task and mcts.types.Verifier).

    Holds its problems, loaded on first use by `load` and then kept."""

    def __init__(self, *, name: str, load: Callable[[], list[Problem]], answer_format: str = "number",
                 answer_prefix: str = "The answer is", instruction: str | None = None, few_shot: int = 1,
                 style: str = "cot", rationale: str = "generic"):
        if answer_format not in FORMATS:
            raise ValueError(f"answer_format={answer_format!r}: expected one of {', '.join(FORMATS)}")
        self.name = name
        self.answer_format = answer_format
        self.answer_prefix = answer_prefix
        self.style = style
        self.few_shot = few_shot_examples(answer_format, few_shot, prefix=answer_prefix, style=style,
                                          rationale=rationale)
        defaults = INSTRUCTIONS if style == "cot" else TOOL_INSTRUCTIONS
        self.instruction = defaults[answer_format].format(prefix=answer_prefix) if instruction is None else instruction
        self._load = load
        self._problems: list[Problem] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Picklable (a Ray worker gets the task, harness/launcher.py): the lock is not copied."""
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def problems(self) -> list[Problem]:
        with self._lock:
            if self._problems is None:
                self._problems = self._load()
            return list(self._problems)

    def user_message(self, problem: Problem) -> str:
        return f"{self.instruction}\n\n{problem.question}" if self.instruction else problem.question

    def extract(self, text: str) -> str | None:
        """The answer the policy stated; with tools, programs and their output are not read (a program
        that prints "The answer is 9" has not stated an answer)."""
        if self.style == "python":
            text = prose(text)
        return extract_answer(text, prefix=self.answer_prefix, answer_format=self.answer_format)

    def is_correct(self, predicted: str | None, problem: Problem) -> bool:
        return answer_matches(problem.answer, predicted, self.answer_format)

    def __repr__(self) -> str:
        return f"AnswerTask(name={self.name!r}, answer_format={self.answer_format!r}, style={self.style!r})"
