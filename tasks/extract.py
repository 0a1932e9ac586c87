"""Reading the final answer out of a model's text (a step or a whole solution).

Three answer formats:
- "number": the last "<prefix> X" where X is a number ("17", "-3", "1,234.50", "$18", "3/4", "50%")
  or a \\boxed{...}/\\frac{..}{..}/$...$ right after the prefix. Returned without currency signs
  and thousands commas ("the answer is $1,234.50" -> "1234.50").
- "latex" (MATH): whichever comes last of "<prefix> X" (X: a \\boxed{...}, a $...$, or the rest of
  the line without its final period) and a bare \\boxed{...}/\\fbox{...} anywhere.
- "letter" (multiple choice): the last "<prefix> (B)" / "<prefix> B", returned in upper case; a
  bare lower-case letter only before punctuation or the end of the line ("the answer is a guess"
  has an article, not a choice).
The prefix ("The answer is" by default) matches case-insensitively with any whitespace and an
optional colon after it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from tasks.checker import MATH_DELIMITERS, braced_end

FORMATS = ("number", "latex", "letter")
MAX_ANSWER_CHARS = 500  # a longer "answer" is not an answer


def braced_after(text: str, command_end: int) -> tuple[str, int] | None:
    """For a command ending at `command_end` (e.g. after "\\boxed"), the content of the balanced
    {...} that follows (whitespace allowed before it) and the index after its closing brace."""
    i = command_end
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    end = braced_end(text, i)
    return None if end is None else (text[i + 1:end], end + 1)


_BOXED = re.compile(r"\\(?:boxed|fbox)")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} with balanced braces, or None."""
    for m in reversed(list(_BOXED.finditer(text))):
        found = braced_after(text, m.end())
        if found is not None:
            return found[0]
    return None


@lru_cache(maxsize=64)
def prefix_pattern(prefix: str) -> re.Pattern[str]:
    """The answer prefix as the extractor matches it: any whitespace between its words, any case,
    an optional colon and bold marker after it."""
    words = [re.escape(w) for w in prefix.split()]
    return re.compile(r"\s+".join(words) + r"\s*:?\s*(?:\*\*\s*)?", re.IGNORECASE)


_NUMBER = re.compile(
    r"[-\u2212+]?\s?(?:\\\$|\$)?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?(?:\\?%)?"
)
_FRAC = re.compile(r"-?\\[dt]?frac")
_LETTER = re.compile(r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![A-Za-z0-9'])|([a-z])(?=[.,;:!)]|[ \t]*(?:\n|$)))")


def _number_at(text: str, i: int) -> str | None:
    m = _NUMBER.match(text, i)
    if not m or not any(c.isdigit() for c in m.group()):
        return None
    return re.sub(r"\s|,|\\?\$", "", m.group()).replace("\u2212", "-")


def _latex_at(text: str, i: int, *, whole_line: bool) -> str | None:
    """A \\boxed{}, a \\frac{}{}, a $...$ at `i`, or (whole_line) the rest of the line."""
    m = _BOXED.match(text, i)
    if m:
        found = braced_after(text, m.end())
        return found[0].strip() if found else None
    m = _FRAC.match(text, i)
    if m:
        first = braced_after(text, m.end())
        second = braced_after(text, first[1]) if first else None
        if second:
            return text[i:second[1]]
    for left, right in MATH_DELIMITERS:
        if text.startswith(left, i):
            end = text.find(right, i + len(left))
            return text[i + len(left):end].strip() if end > i else None
    if whole_line:
        line = text[i:].split("\n", 1)[0].strip()
        return line[:-1].rstrip() if line.endswith(".") else line
    return None


def _answer_at(text: str, i: int, answer_format: str) -> str | None:
    if answer_format == "letter":
        m = _LETTER.match(text, i)
        return next(g for g in m.groups() if g).upper() if m else None
    if answer_format == "number":
        return _number_at(text, i) or _latex_at(text, i, whole_line=False)
    return _latex_at(text, i, whole_line=True)


def extract_answer(text: str, *, prefix: str = "The answer is", answer_format: str = "number") -> str | None:
    """The final answer stated in `text` in the given format (see the module docstring), or None."""
    if answer_format not in FORMATS:
        raise ValueError(f"answer_format={answer_format!r}: expected one of {', '.join(FORMATS)}")
    if not isinstance(text, str) or not text:
        return None
    answer, where = None, -1
    matches = list(prefix_pattern(prefix).finditer(text))
    for m in reversed(matches):
        found = _answer_at(text, m.end(), answer_format)
        if found:
            answer, where = found, m.start()
            break
    if answer_format == "latex":
        for box in reversed(list(_BOXED.finditer(text))):
            found = braced_after(text, box.end()) if box.start() > where else None
            if found is not None:
                answer = found[0]
                break
    if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer.strip()
