"""The text format of tool-integrated steps (ToRA's, microsoft/ToRA): pure functions on strings.

A solution interleaves rationale lines with programs; the model writes

    Tom has 12 apples and buys 5 more, so we add.
    ```python
    print(12 + 5)
    ```
    ```output

and generation stops at the output fence (`OUTPUT_OPEN`, the stop string). The environment runs the
program and appends its block, `output_block(result)` = "\\n17\\n```", and the model continues
("\\nThe answer is 17."). Everything the policy wrote is the policy's; the text of an output block
after `OUTPUT_OPEN`, up to and including its closing fence, is the environment's (`output_spans`):
it counts in neither a step's log-probability nor the DPO loss.
"""

from __future__ import annotations

import re

CODE_OPEN = "```python"  # opens a program (ToRA)
FENCE = "```"  # closes a program and an output block
OUTPUT_OPEN = "```output"  # the policy's last words before the environment speaks: the stop string (ToRA)
FENCE_STAND_IN = "'''"  # a fence inside program output would end the block early; it is written as this

_OUTPUT = re.compile(re.escape(OUTPUT_OPEN) + r"(\n.*?\n" + re.escape(FENCE) + ")", re.DOTALL)
_CODE = re.compile(re.escape(CODE_OPEN) + r"[ \t]*\n(.*?)(?:^[ \t]*" + re.escape(FENCE) + r"|\Z)",
                   re.DOTALL | re.MULTILINE)


def opens_code(step: str) -> bool:
    """Whether a step (one line) opens a program: it starts with the python fence."""
    return step.lstrip().startswith(CODE_OPEN)


def extract_code(text: str) -> str | None:
    """The source of the last program in `text` after its last output block (between the python fence
    and its closing fence, or the end of the text when the closing fence is missing); None when there is
    no new program (an output fence written after an output block without a program in between)."""
    spans = output_spans(text)
    matches = list(_CODE.finditer(text, spans[-1][1] if spans else 0))
    if not matches:
        return None
    code = matches[-1].group(1).rstrip("\n")
    return code if code.strip() else None


def sanitize_output(output: str) -> str:
    """Program output as it may appear in an output block: no fences inside, no trailing newlines."""
    return output.replace(FENCE, FENCE_STAND_IN).rstrip("\n")


def output_block(output: str) -> str:
    """What the environment appends right after the policy's `OUTPUT_OPEN`: the output and the fence."""
    return "\n" + sanitize_output(output) + "\n" + FENCE


def program_step(code: str, output: str) -> str:
    """A program and the output block the environment wrote for it, as one step's text."""
    return f"{CODE_OPEN}\n{code}\n{FENCE}\n{OUTPUT_OPEN}{output_block(output)}"


def output_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the environment's text in `text`: every output block after its
    `OUTPUT_OPEN`, up to and including the closing fence."""
    return [m.span(1) for m in _OUTPUT.finditer(text)]


def policy_text(text: str) -> str:
    """`text` without the environment's output blocks (what the policy itself wrote)."""
    out, last = [], 0
    for start, end in output_spans(text):
        out.append(text[last:start])
        last = end
    out.append(text[last:])
    return "".join(out)


def prose(text: str) -> str:
    """`text` without its programs and output blocks: the words in which the policy states an answer."""
    text = policy_text(text).replace(OUTPUT_OPEN, "")
    return _CODE.sub("", text)


def count_programs(steps) -> int:
    """Programs already written in a partial solution (steps or texts that hold output blocks)."""
    return sum(len(output_spans(step)) for step in steps)


def split_program_step(step: str) -> tuple[str, str, str | None] | None:
    """A step that holds one program, as (text before the program, code, output or None when the program
    was not run); None when the step holds no program."""
    match = _CODE.search(step)
    if match is None:
        return None
    before = step[:match.start()].rstrip("\n")
    spans = output_spans(step)
    code = match.group(1).rstrip("\n")
    output = None
    if spans:
        start, end = spans[0]
        output = step[start + 1:end - len(FENCE) - 1]
    return before, code, output
