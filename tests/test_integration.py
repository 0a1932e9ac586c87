"""Search and evaluation on the tiny random model with the transformers backend (no download):
the search writes valid trees, the documented `search.py` call works, every evaluation mode runs end
to end, and inference-time search never shows the gold answer to the model."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from harness.evaluation import EvalConfig, evaluate_problems
from mcts.search import SearchConfig, run_search
from mcts.tree import Tree, read_trees, write_trees
from mcts.types import Problem
from policy.backends import BackendConfig, make_backend
from policy.models import load_tokenizer
from policy.prompts import PromptConfig, PromptFormatter
from policy.step_policy import GenerationConfig, StepPolicy
from tasks import TaskConfig, make_task

ROOT = Path(__file__).resolve().parent.parent
GEN = GenerationConfig(step_max_tokens=8, solution_max_tokens=16)
SEARCH = SearchConfig(simulations=3, batch_trees=4, breadth_root=2, breadth=2, max_depth=3)


class Recording:
    """Wraps a backend and keeps every prompt it was sent."""

    def __init__(self, backend):
        self.backend, self.prompts = backend, []

    def sample(self, prompts, settings):
        self.prompts.extend(prompts)
        return self.backend.sample(prompts, settings)

    def choice_probs(self, prompts, choices):
        self.prompts.extend(prompts)
        return self.backend.choice_probs(prompts, choices)

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    backend = make_backend(BackendConfig(name="hf", seed=0), str(tiny_model_dir))
    task = make_task(TaskConfig(name="arith_test", kind="arith", split="test", n=6))
    formatter = PromptFormatter(load_tokenizer(str(tiny_model_dir)), task, PromptConfig())
    yield backend, task, formatter
    backend.close()


def test_search_writes_valid_trees(setup, tmp_path):
    backend, task, formatter = setup
    policy = StepPolicy(backend, formatter, GEN, eval_with_reference=True)
    problems = task.problems()[:3]
    trees = list(run_search(problems, expander=policy, evaluator=policy, verifier=task, config=SEARCH, seed=1))
    assert sorted(t.problem.id for t in trees) == sorted(p.id for p in problems)
    path = tmp_path / "trees.jsonl"
    write_trees(path, trees)
    back = read_trees(path)
    for tree in back:
        # Every simulation backs up through the root, unless the tree ran out of selectable leaves first.
        if tree.meta["stop"] == "resolved":
            assert 1 <= tree.root.visits <= SEARCH.simulations
        else:
            assert tree.root.visits == SEARCH.simulations
        assert len(tree.nodes) > 1
        assert tree.compute["generated_tokens"] > 0 and tree.compute["prompt_tokens"] > 0
        for node in tree.nodes[1:]:
            assert node.depth <= SEARCH.max_depth + 1
            assert node.self_eval is not None and 0.0 <= node.self_eval <= 1.0
            assert -1.0 <= node.q <= 1.0
            if node.terminal and node.answer is not None:
                assert node.outcome in (1.0, -1.0)
        assert Tree.from_json(json.loads(json.dumps(tree.to_json()))).to_json() == tree.to_json()


@pytest.mark.parametrize("mode", ["greedy", "sampling", "mcts"])
def test_evaluation_modes(setup, mode):
    backend, task, formatter = setup
    problems = task.problems()[:4]
    cfg = EvalConfig(mode=mode, limit=4, k=3)
    result = evaluate_problems(task, problems, backend=backend, formatter=formatter, gen=GEN, cfg=cfg,
                               search=SEARCH, params=1000, seed=0)
    assert result["n"] == 4 and result["mode"] == mode
    assert 0.0 <= result["ci95"][0] <= result["accuracy"] <= result["ci95"][1] <= 1.0
    assert len(result["records"]) == 4
    assert {"question", "gold", "prediction", "correct", "tokens"} <= set(result["records"][0])
    assert result["compute"]["generated_tokens"] > 0 and result["compute"]["flops"] > 0
    if mode == "sampling":
        assert 0.0 <= result["pass_at_k"] <= 1.0 and result["pass_at_k"] >= result["accuracy"] - 1e-9
        assert all(len(r["answers"]) == 3 for r in result["records"])
    json.dumps(result)  # eval.json is plain JSON


def test_mcts_evaluation_never_shows_the_gold_answer(setup):
    backend, task, formatter = setup
    gold = "9876543"
    problems = [Problem(f"secret-{i}", f"Sam has {i + 2} pens and buys {i + 3} more. How many pens?", gold,
                        solution=f"The answer is {gold}.") for i in range(2)]
    spy = Recording(backend)
    result = evaluate_problems(task, problems, backend=spy, formatter=formatter, gen=GEN,
                               cfg=EvalConfig(mode="mcts", limit=None),
                               search=replace(SEARCH, eval_with_reference=True),
                               params=1000)
    assert result["n"] == 2 and spy.prompts
    assert not any(gold in p for p in spy.prompts)


def test_search_command_writes_trees_and_viewer(tiny_model_dir, tmp_path):
    out = tmp_path / "search"
    proc = subprocess.run([sys.executable, "search.py", "model=tiny-random", "backend=hf", "eval.limit=2",
                           "search.simulations=3", "generation.step_max_tokens=8", "generation.solution_max_tokens=16",
                           f"out_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trees = read_trees(out / "trees.jsonl")
    assert len(trees) == 2
    html = (out / "trees.html").read_text()
    assert "<html" in html.lower() and trees[0].problem.id in html


@pytest.mark.parametrize("weighting", ["plain", "weighted"])
def test_best_of_n_ranks_samples_with_the_value_model(setup, tiny_value_dir, weighting):
    from harness.evaluation import ranked_answer

    backend, task, formatter = setup
    problems = task.problems()[:3]
    cfg = EvalConfig(mode="best_of_n", k=3, value_model=str(tiny_value_dir), weighting=weighting)
    result = evaluate_problems(task, problems, backend=backend, formatter=formatter, gen=GEN, cfg=cfg,
                               search=SEARCH, params=1000, seed=0)
    same = lambda a, b: task.is_correct(b, Problem("vote", "", a))  # noqa: E731
    assert result["mode"] == "best_of_n" and result["weighting"] == weighting and result["n"] == 3
    for record in result["records"]:
        assert len(record["scores"]) == 3 and all(0.0 <= s <= 1.0 for s in record["scores"])
        assert record["prediction"] == ranked_answer(record["answers"], record["scores"], same, weighting)
    with pytest.raises(ValueError, match="needs eval.value_model"):
        evaluate_problems(task, problems, backend=backend, formatter=formatter, gen=GEN,
                          cfg=EvalConfig(mode="best_of_n", k=2), search=SEARCH, params=1000)


def test_best_of_n_values_a_batch_of_problems_in_one_call(setup, tiny_value_dir, monkeypatch):
    """best_of_n values all the samples of a sampling batch in one value-model call (micro-batched and
    sorted by length inside it) and gives the same records as one call per problem (eval.batch_size=1,
    the path before batching)."""
    import policy.value_model as vm

    backend, task, formatter = setup
    problems = task.problems()[:4]
    calls, forwards = [], []
    evaluate, padded = vm.ValueModelEvaluator.evaluate, vm._padded
    monkeypatch.setattr(vm.ValueModelEvaluator, "evaluate", lambda self, r: calls.append(len(r)) or evaluate(self, r))
    monkeypatch.setattr(vm, "_padded", lambda rows, *a: forwards.append([len(r) for r in rows]) or padded(rows, *a))
    results = {}
    for batch_size in (1, 256):
        calls.clear(), forwards.clear()
        cfg = EvalConfig(mode="best_of_n", k=5, value_model=str(tiny_value_dir), weighting="weighted",
                         batch_size=batch_size)
        results[batch_size] = evaluate_problems(task, problems, backend=backend, formatter=formatter,
                                                gen=replace(GEN, solution_max_tokens=8), cfg=cfg, search=SEARCH,
                                                params=1000, seed=0)
        results[batch_size]["calls"], results[batch_size]["forwards"] = list(calls), list(forwards)
    per_problem, batched = results[1], results[256]
    assert per_problem["calls"] == [len(f) for f in per_problem["forwards"]] == [5] * 4  # before: one per problem
    assert batched["calls"] == [20] and [len(f) for f in batched["forwards"]] == [16, 4]  # after: one call, 2 forwards
    in_order = [n for f in per_problem["forwards"] for n in f]  # token counts in problem order
    assert [n for f in batched["forwards"] for n in f] == sorted(in_order) != in_order  # batched by length
    for a, b in zip(per_problem["records"], batched["records"]):
        assert a == b  # the same samples, scores (to the bit), answers and predictions
    assert per_problem["compute"] == batched["compute"] and per_problem["accuracy"] == batched["accuracy"]


def test_mcts_evaluation_with_the_value_model(setup, tiny_value_dir):
    backend, task, formatter = setup
    problems = task.problems()[:2]
    result = evaluate_problems(task, problems, backend=backend, formatter=formatter, gen=GEN,
                               cfg=EvalConfig(mode="mcts", value_model=str(tiny_value_dir)),
                               search=replace(SEARCH, value="model"), params=1000)
    assert result["n"] == 2 and result["compute"]["prompt_tokens"] > 0
