"""The `tool` config group: whether solutions may run python (ToRA-style steps) and with what limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from tools.sandbox import SandboxConfig

TOOL_NAMES = ("none", "python")


@dataclass(frozen=True)
class ToolConfig:
    """The `tool` group (conf/tool/*.yaml says where each value comes from).

    name: "none" (chain of thought, one line per step) or "python" (ToRA's format: rationale lines and
        programs whose output the environment appends; tools/format.py).
    max_calls: programs per solution; a program past it is not run and ends the solution (ToRA: 4).
    code_max_tokens: the longest program (the tokens generated after the opening fence, up to the
        output fence).
    few_shot: built-in tool-format worked examples before the question (tasks/task.py).
    rationale: how the number examples open: "generic" (one line, "Let's write a program.") or
        "none" (the program opens the solution); tasks/task.py RATIONALES.
    sandbox: the limits each program runs under (tools/sandbox.py).
    """

    name: str = "none"
    max_calls: int = 4
    code_max_tokens: int = 256
    few_shot: int = 2
    rationale: str = "generic"
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self) -> None:
        if self.name not in TOOL_NAMES:
            raise ValueError(f"tool.name={self.name!r}: expected one of {', '.join(TOOL_NAMES)}")
        if self.max_calls < 1 or self.code_max_tokens < 1 or self.few_shot < 0:
            raise ValueError("tool.max_calls and tool.code_max_tokens must be >= 1, tool.few_shot >= 0")

    @property
    def enabled(self) -> bool:
        return self.name != "none"
