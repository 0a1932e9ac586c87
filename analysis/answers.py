"""Answer lines of evaluation records: whether an answer runs on past the line that first states it,
and how it grades at that line, with the evaluation's own grader (the run's task: tasks.make_task).

The search's terminal step ends on the line that first states an answer, while the evaluation grades
the last answer stated; these say how often the two differ (`runs_on`) and what it cost or gained
(`count_first_correct`). The cut is at the first line holding the answer prefix (`first_answer`),
matched as the extractor matches it (tasks.extract.prefix_pattern), whatever follows the prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from harness.config import build
from tasks import TaskConfig, make_task
from tasks.extract import extract_answer, prefix_pattern
from tasks.task import AnswerTask, answer_matches
from tools.config import ToolConfig
from tools.format import prose


def _group(config: Mapping[str, Any], key: str, cls: type) -> dict[str, Any]:
    """The keys directly under `key` of a flat config that `cls` has (a key of another version of
    the code, or a nested group such as tool.sandbox, is left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in config.items():
        name = k[len(key) + 1:]
        if k.startswith(key + ".") and "." not in name and name in names:
            out[name] = v
    return out


def eval_task(config: Mapping[str, Any], key: str) -> AnswerTask:
    """The task the evaluation graded with, as it built it (tasks.make_task with the run's tool): the
    one configured under `key` (`eval_tasks.<name>` of an iterate.py config, `task` of an evaluate.py
    one). Its answer_prefix, answer_format and style decide how an answer is read. Raises
    harness.config.ConfigError (or tasks.DataError) on a bad value."""
    task = build(TaskConfig, _group(config, key, TaskConfig), key)
    tool = build(ToolConfig, _group(config, "tool", ToolConfig), "tool")
    return make_task(task, tool)


def first_answer(output: str, prefix: str = "The answer is") -> str:
    """`output` cut after the line that first states its answer (unchanged without one): the answer the
    search would have taken, since its terminal step ends on that line."""
    m = prefix_pattern(prefix).search(output)
    end = output.find("\n", m.end()) if m else -1
    return output if end < 0 else output[:end]


def runs_on(output: str, prefix: str = "The answer is") -> bool:
    """Whether an answer goes on after the line that first states its answer (`prefix`, matched as
    the answer extractor matches it): the policy did not stop where the search's terminal step ends."""
    return bool(output[len(first_answer(output, prefix)):].strip())


def stated(output: str, tool: bool) -> str:
    """The words an answer is read from: with tools, the output without its programs and their output
    blocks (tools.format.prose, as AnswerTask.extract reads them), else the output."""
    return prose(output) if tool else output


def count_first_correct(records: Any, prefix: str, answer_format: str, tool: bool = False) -> int | None:
    """Records answered right when graded at their first answer line, with the evaluation's own
    extractor and checker (tasks.extract.extract_answer, tasks.task.answer_matches); None unless every
    record has an output and a gold answer. prefix, answer_format, tool: the task's (`eval_task`)."""
    if not isinstance(records, list) or not records:
        return None
    if not all(isinstance(r, Mapping) and isinstance(r.get("output"), str) and isinstance(r.get("gold"), str)
               for r in records):
        return None
    return sum(answer_matches(r["gold"], extract_answer(first_answer(stated(r["output"], tool), prefix), prefix=prefix,
                                                        answer_format=answer_format), answer_format)
               for r in records)


def count_run_on(records: Any, prefix: str, tool: bool = False) -> int | None:
    """Records whose output `runs_on`; None when no record holds an output."""
    outputs = [r.get("output") for r in records if isinstance(r, Mapping)] if isinstance(records, list) else []
    outputs = [stated(o, tool) for o in outputs if isinstance(o, str)]
    return sum(runs_on(o, prefix) for o in outputs) if outputs else None
