"""Tool-integrated generation (policy/tool_use.py, policy/step_policy.py with tool=python) on a scripted
backend and the real sandbox: programs run, outputs are appended as the environment's text, tokens and
log-probabilities are the policy's only, and the search, pairs and evaluation carry them through."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mcts.search import SearchConfig, run_search
from mcts.tree import Tree
from mcts.types import ExpandRequest, Problem
from policy.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Completion, Sample, Usage
from policy.step_policy import GenerationConfig, StepPolicy
from policy.tool_use import ToolExecutor, sample_solutions
from tools.config import ToolConfig
from tools.format import OUTPUT_OPEN, output_spans, policy_text
from tools.sandbox import SandboxConfig

TOOL = ToolConfig(name="python", sandbox=SandboxConfig(timeout_s=2.0, cpu_s=2, workers=2))
PROGRAM = "```python\nprint(12 + 5)\n```\n"


class ScriptedBackend:
    """Answers by the prompt's end: a question, a program opened, an output block seen. Every call is
    recorded (prompts and settings), so tests can count engine calls."""

    name = "scripted"
    model_path = "scripted"

    def __init__(self, *, program: str = PROGRAM, answer: str = "\nThe answer is 17."):
        self.program = program
        self.answer = answer
        self.calls: list[tuple[list[str], object]] = []
        self.usage = Usage()
        self.last_usage = Usage()

    def _one(self, prompt: str, settings) -> Sample:
        fence = OUTPUT_OPEN in settings.stop
        if prompt.endswith("```"):  # an output block was just appended: state the answer
            return Sample(self.answer, 5, -0.5, FINISH_EOS)
        if prompt.endswith("```\n"):  # the step before was a program with its output
            return Sample(self.answer.lstrip("\n"), 5, -0.5, FINISH_EOS)
        if prompt.endswith("```python\n"):  # a step opened a program: write it up to the output fence
            body = self.program.split("\n", 1)[1]
            return Sample(body, 7, -0.7, FINISH_STOP if fence else FINISH_LENGTH)
        if "\n" in settings.stop:  # a step: open the program
            return Sample("```python", 3, -0.3, FINISH_STOP)
        if fence:  # a whole solution: rationale and program, stopped at the output fence
            return Sample("Tom buys 5 more, so we add.\n" + self.program, 12, -1.2, FINISH_STOP)
        return Sample("The answer is 17.", 5, -0.5, FINISH_EOS)

    def sample(self, prompts, settings):
        self.calls.append((list(prompts), settings))
        return [Completion(samples=tuple(self._one(p, settings) for _ in range(settings.n)), prompt_tokens=10,
                           cached_tokens=4) for p in prompts]

    def choice_probs(self, prompts, choices):
        from policy.backends.base import ChoiceResult

        return [ChoiceResult(probs=(0.6, 0.4), prompt_tokens=20) for _ in prompts]


class Formatter:
    class cfg:
        step_separator = "\n"
        eval_choices = ("A", "B")

    def solution_prompt(self, problem, steps):
        return f"Q: {problem.question}\n" + "".join(s + "\n" for s in steps)

    def eval_prompt(self, problem, steps, *, with_reference):
        return self.solution_prompt(problem, steps) + "Is it right? ("


PROBLEM = Problem("p1", "Tom has 12 apples and buys 5 more. How many?", "17")


def test_whole_solution_runs_its_program_and_continues_after_the_output():
    backend = ScriptedBackend()
    executor = ToolExecutor(TOOL)
    from policy.backends.base import SamplingSettings

    [completion] = sample_solutions(backend, ["Q: x\n"], SamplingSettings(n=2, max_tokens=100), executor)
    assert len(completion.samples) == 2
    sample = completion.samples[0]
    assert sample.text == ("Tom buys 5 more, so we add.\n```python\nprint(12 + 5)\n```\n```output\n17\n```"
                           "\nThe answer is 17.")
    assert [c.output for c in sample.tool_calls] == ["17"] and sample.tool_calls[0].ok
    assert sample.num_tokens == 12 + 5 and sample.logprob == pytest.approx(-1.7)  # output tokens are not the policy's
    [(start, end)] = output_spans(sample.text)
    assert sample.text[start:end] == "\n17\n```"
    assert policy_text(sample.text).count("17") == 1  # the answer line's; the output block's is the environment's
    assert len(backend.calls) == 2  # one call for both samples, one for both continuations
    assert executor.stats.calls == 2 and executor.stats.batches == 1
    assert completion.prompt_tokens == 10 + 2 * 10


def test_a_failing_program_shows_its_error_and_the_solution_goes_on():
    backend = ScriptedBackend(program="```python\nprint(1 / 0)\n```\n")
    from policy.backends.base import SamplingSettings

    [completion] = sample_solutions(backend, ["Q\n"], SamplingSettings(n=1, max_tokens=100), ToolExecutor(TOOL))
    call = completion.samples[0].tool_calls[0]
    assert not call.ok and "ZeroDivisionError" in call.output
    assert "```output\nZeroDivisionError" in completion.samples[0].text


def test_without_a_tool_generation_is_untouched():
    from policy.backends.base import SamplingSettings

    backend = ScriptedBackend()
    [completion] = sample_solutions(backend, ["Q\n"], SamplingSettings(n=1, max_tokens=100), None)
    assert completion.samples[0].text == "The answer is 17." and not completion.samples[0].tool_calls
    assert backend.calls[0][1].stop == ()


def test_max_calls_ends_the_solution_without_running_more():
    from policy.backends.base import SamplingSettings

    backend = ScriptedBackend()
    executor = ToolExecutor(replace(TOOL, max_calls=1))
    [completion] = sample_solutions(backend, ["Q\n"], SamplingSettings(n=1, max_tokens=100), executor,
                                    prior_calls=[1])
    sample = completion.samples[0]
    assert not sample.tool_calls and sample.finish_reason == FINISH_LENGTH and executor.stats.calls == 0


def test_a_step_that_opens_a_program_becomes_the_program_with_its_output():
    backend = ScriptedBackend()
    policy = StepPolicy(backend, Formatter(), GenerationConfig(), eval_with_reference=False, tool=TOOL)
    [expansion] = policy.expand([ExpandRequest(PROBLEM, ("Tom buys 5 more, so we add.",), n=3)])
    assert len(expansion.samples) == 3
    step = expansion.samples[0]
    assert step.text == "```python\nprint(12 + 5)\n```\n```output\n17\n```"
    assert not step.finished and step.num_tokens == 3 + 7 and step.logprob == pytest.approx(-1.0)
    assert step.tool_calls[0].code == "print(12 + 5)" and step.tool_calls[0].output == "17"
    assert len(backend.calls) == 2 and policy.tool_stats["calls"] == 3 and policy.tool_stats["batches"] == 1
    assert expansion.prompt_tokens == 10 + 3 * 10


def test_the_search_grows_program_steps_and_answers_after_them():
    backend = ScriptedBackend()
    policy = StepPolicy(backend, Formatter(), GenerationConfig(), eval_with_reference=False, tool=TOOL)
    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="t", kind="arith", n=1), TOOL)
    config = SearchConfig(simulations=3, breadth_root=2, breadth=1, max_depth=4, value="none")
    [tree] = list(run_search([PROBLEM], expander=policy, evaluator=policy, verifier=task, config=config))
    code_nodes = [n for n in tree.nodes if n.tool_calls]
    assert code_nodes and all(n.tool_calls[0]["output"] == "17" for n in code_nodes)
    assert tree.solved()
    assert len(code_nodes) == 1 and tree.compute["tool_calls"] == 2  # both root samples ran; equal steps merge
    again = Tree.from_json(tree.to_json())
    assert [n.tool_calls for n in again.nodes] == [n.tool_calls for n in tree.nodes]


def test_answers_printed_by_a_program_are_not_the_policys():
    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="t", kind="arith", n=1), TOOL)
    text = "```python\nprint('The answer is 9')\n```\n```output\nThe answer is 9\n```"
    assert task.extract(text) is None
    assert task.extract(text + "\nThe answer is 9.") == "9"
    plain = make_task(TaskConfig(name="t", kind="arith", n=1))
    assert plain.style == "cot" and task.style == "python"
    assert "```python" in task.few_shot[0].solution and "```output" in task.few_shot[0].solution


def _program_tree() -> Tree:
    from mcts.tree import ROOT

    tree = Tree(PROBLEM)
    call = {"code": "print(12 + 5)", "output": "17", "ok": True, "seconds": 0.02, "error": None}
    good = tree.add_child(ROOT, text="```python\nprint(12 + 5)\n```\n```output\n17\n```", tool_calls=[call],
                          visits=2, value_sum=1.0)
    tree.add_child(good.id, text="The answer is 17.", terminal=True, answer="17", outcome=1.0, visits=1, value_sum=1.0)
    bad_call = {"code": "print(12 - 5)", "output": "7", "ok": True, "seconds": 0.02, "error": None}
    bad = tree.add_child(ROOT, text="```python\nprint(12 - 5)\n```\n```output\n7\n```", tool_calls=[bad_call],
                         visits=2, value_sum=-1.0)
    tree.add_child(bad.id, text="The answer is 7.", terminal=True, answer="7", outcome=-1.0, visits=1, value_sum=-1.0)
    tree.root.visits = 4
    return tree


def test_pairs_say_where_they_branch_at_a_program_and_keep_its_output_block():
    from mcts.pairs import PairsConfig, extract_pairs, pair_stats

    [pair] = extract_pairs(_program_tree(), config=PairsConfig(verified=True, full=True),
                           format_prompt=lambda p, steps: "Q\n" + "".join(s + "\n" for s in steps))
    assert pair["chosen_programs"] == 1 and pair["rejected_programs"] == 1
    assert pair["chosen"] == "```python\nprint(12 + 5)\n```\n```output\n17\n```\nThe answer is 17."
    assert [pair["chosen"][a:b] for a, b in output_spans(pair["chosen"])] == ["\n17\n```"]
    assert pair_stats([pair])["program_branch_share"] == 1.0


def test_the_viewer_shows_programs_and_outputs_apart():
    import mcts.viewer as viewer
    import tools.format as fmt
    from mcts.tree import Node

    assert (viewer.CODE_OPEN, viewer.OUTPUT_OPEN, viewer.FENCE) == (fmt.CODE_OPEN, fmt.OUTPUT_OPEN, fmt.FENCE)
    tree = _program_tree()
    assert viewer.step_text(tree.nodes[1]) == "(program)"
    page = viewer.render_html([tree])
    assert '<div class="code">print(12 + 5)</div>' in page and '<div class="out">17</div>' in page
    assert '"segments"' in page
    whole = Node(id=5, parent=0, depth=1, text="Add.\n```python\nprint(1/0)\n```\n```output\nZeroDivisionError\n```"
                 "\nSo 17.\n```python\nprint(17)\n```\nThe answer is 17.",
                 tool_calls=[{"code": "print(1/0)", "output": "ZeroDivisionError", "ok": False}])
    assert viewer.segments(whole) == [["text", "Add.", True], ["code", "print(1/0)", True],
                                      ["output", "ZeroDivisionError", False], ["text", "So 17.", True],
                                      ["code", "print(17)", True], ["text", "The answer is 17.", True]]


def test_greedy_evaluation_runs_programs_and_reports_them():
    from harness.evaluation import EvalConfig, evaluate_problems, summary_line
    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="t", kind="arith", n=1), TOOL)
    result = evaluate_problems(task, [PROBLEM, replace(PROBLEM, id="p2")], backend=ScriptedBackend(),
                               formatter=Formatter(), gen=GenerationConfig(), cfg=EvalConfig(mode="greedy"),
                               search=SearchConfig(), params=1, tool=TOOL)
    assert result["accuracy"] == 1.0 and result["tool"]["calls"] == 2 and result["tool"]["failed"] == 0
    assert result["records"][0]["tool_calls"][0]["output"] == "17"
    assert "2 programs, 100% ran" in summary_line(result)


def test_tool_config_composes_and_names_bad_keys():
    from harness.config import ConfigError, build
    from tests.conftest import job_settings

    s = job_settings("iterate", ["tool=python"])
    assert s.tool.enabled and s.tool.max_calls == 4 and s.tool.sandbox.timeout_s == 5.0
    assert job_settings("iterate", []).tool.name == "python"  # the demo's (issue 21)
    assert job_settings("iterate", ["tool=none"]).tool.name == ToolConfig().name == "none"  # the library's
    with pytest.raises(ConfigError, match="tool.sandbox.timeout"):
        build(ToolConfig, {"name": "python", "sandbox": {"timeout": 1}}, "tool")
    with pytest.raises(ConfigError, match="tool.name"):
        build(ToolConfig, {"name": "bash"}, "tool")


def test_baseline_table_has_a_column_per_tool():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("baseline_table",
                                                  Path(__file__).parent.parent / "experiments" / "baseline_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [dict(label="mawps_singleop", tool_name="none", mode="greedy", n=100, accuracy=0.17, ci95=[0.1, 0.26]),
            dict(label="mawps_singleop", tool_name="python", mode="greedy", n=100, accuracy=0.39, ci95=[0.3, 0.49],
                 tool={"calls": 98, "failed": 6})]
    table = module.table_markdown(rows)
    assert "accuracy (none)" in table and "accuracy (python)" in table
    assert "| mawps_singleop | greedy | 100 | 17.0% | 10.0-26.0 | 39.0% | 30.0-49.0 | 94% of 98 |" in table


@pytest.mark.slow
def test_the_default_model_writes_programs_that_run(default_model_dir):
    """The embedded SmolLM2-135M with the tool-format prompt (transformers, greedy): it writes programs,
    they run in the sandbox, their output is in the solution as the environment's block, and one search
    wave on the same problems grows program steps."""
    from harness.evaluation import EvalConfig, evaluate_problems
    from policy.backends import BackendConfig, make_backend
    from policy.models import load_tokenizer
    from policy.prompts import PromptConfig, PromptFormatter
    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="arith_dev", kind="arith", split="dev", n=3), TOOL)
    formatter = PromptFormatter(load_tokenizer(str(default_model_dir)), task, PromptConfig())
    backend = make_backend(BackendConfig(name="hf"), str(default_model_dir))
    try:
        result = evaluate_problems(task, task.problems(), backend=backend, formatter=formatter,
                                   gen=GenerationConfig(solution_max_tokens=128), cfg=EvalConfig(mode="greedy"),
                                   search=SearchConfig(), params=1, tool=TOOL)
        calls = [c for r in result["records"] for c in r.get("tool_calls", [])]
        assert calls and any(c["ok"] for c in calls), [r["output"] for r in result["records"]]
        ran = next(r for r in result["records"] if r.get("tool_calls"))
        assert ([ran["output"][a:b] for a, b in output_spans(ran["output"])][0].strip("\n`")
                == ran["tool_calls"][0]["output"])
        policy = StepPolicy(backend, formatter, GenerationConfig(step_max_tokens=32), eval_with_reference=False,
                            tool=TOOL)
        expansions = policy.expand([ExpandRequest(p, ("Let's write a program.",), n=2, seed=i)
                                    for i, p in enumerate(task.problems())])
        steps = [s for e in expansions for s in e.samples]
        assert any(s.tool_calls for s in steps), [s.text for s in steps]
        for s in steps:
            if s.tool_calls:
                assert s.text.startswith("```python") and output_spans(s.text)
    finally:
        backend.close()


class _Varied(ScriptedBackend):
    """Whole solutions of different lengths per prompt; after the first output block, a bare output fence
    (no new program); after the second block, the answer."""

    def _one(self, prompt, settings):
        if prompt.count("```output") == 1 and prompt.endswith("```"):
            return Sample("\nso\n", 2, -0.2, FINISH_STOP)  # stopped at the output fence again, no program
        if prompt.endswith("```"):
            return Sample("\nThe answer is 17.", 5, -0.5, FINISH_EOS)
        return Sample("Add.\n" + PROGRAM, 10 + len(prompt) % 5, -1.0, FINISH_STOP)


def test_continuations_are_one_call_per_round_and_a_bare_fence_runs_nothing():
    from policy.backends.base import SamplingSettings

    backend = _Varied()
    executor = ToolExecutor(TOOL)
    prompts = ["Q1\n", "Q22\n", "Q333\n"]
    completions = sample_solutions(backend, prompts, SamplingSettings(n=2, max_tokens=100), executor)
    assert [len(batch) for batch, _ in backend.calls] == [3, 6, 6]  # first call, then one per round
    for c in completions:
        [first, second] = c.samples[0].tool_calls
        assert first.ok and first.output == "17"
        assert second.error == "no_program" and not second.code  # the earlier program is not run again
        assert c.samples[0].text.endswith("```output\nno program before the output fence\n```\nThe answer is 17.")
    assert executor.stats.calls == 6  # programs actually run: one per sample


def test_a_made_up_output_step_gets_the_environments_answer():
    class MadeUp(ScriptedBackend):
        def _one(self, prompt, settings):
            return Sample("```output", 3, -0.3, FINISH_STOP)

    policy = StepPolicy(MadeUp(), Formatter(), GenerationConfig(), eval_with_reference=False, tool=TOOL)
    [expansion] = policy.expand([ExpandRequest(PROBLEM, (), n=1)])
    [step] = expansion.samples
    assert step.text == "```output\nno program before the output fence\n```" and step.num_tokens == 3
    assert step.tool_calls[0].error == "no_program" and policy.tool_stats["calls"] == 0
    from mcts.types import programs_run

    assert programs_run(step.tool_calls) == 0


def test_analysis_reads_tool_answers_as_the_task_does():
    from tests.test_experiments import an as analyze

    output = "```python\nprint('The answer is 9')\n```\n```output\nThe answer is 9\n```\nThe answer is 17."
    records = [{"output": output, "gold": "17"}]
    assert analyze.count_first_correct(records, "The answer is", "number", tool=True) == 1
    assert analyze.count_first_correct(records, "The answer is", "number", tool=False) == 0  # a program's print
    assert analyze.count_run_on(records, "The answer is", tool=True) == 0


@pytest.mark.parametrize("mode", ["sampling", "mcts"])
def test_sampling_and_mcts_evaluation_run_programs(mode):
    from harness.evaluation import EvalConfig, evaluate_problems
    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="t", kind="arith", n=1), TOOL)
    result = evaluate_problems(task, [PROBLEM], backend=ScriptedBackend(),
                               formatter=Formatter(), gen=GenerationConfig(),
                               cfg=EvalConfig(mode=mode, k=3), search=SearchConfig(simulations=3, max_depth=4),
                               params=1, tool=TOOL)
    assert result["accuracy"] == 1.0 and result["tool"]["calls"] >= 1 and result["tool"]["failed"] == 0
