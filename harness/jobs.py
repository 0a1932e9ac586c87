"""What one engine does with a list of problems: round k's search (trees, as they finish) and an
evaluation (an eval.json entry). The same functions run on the driver (launcher=local) and in each
Ray worker on its shard (launcher=ray, harness/launcher.py); neither the search nor the evaluation
knows which.

    job = partial(search_shard, s=s, run_dir=run_dir, k=0, task=task, formatter=formatter)
    for done in engine.run(job, problems, policy_path):   # TreeDone, one per problem
        ...

A job is `job(backend, problems) -> Iterator[output]`; each output says which problems it completes
(`ids`), so that a launcher can search again, elsewhere, exactly the problems a dead worker left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from harness.evaluation import evaluate_problems
from harness.rundir import round_dir
from harness.seeds import engine_config, search_seed
from mcts.sampling import sample_trees
from mcts.search import run_search
from mcts.tree import Tree
from mcts.types import Problem
from policy.backends.base import Backend
from policy.step_policy import StepPolicy
from policy.value_model import make_value_evaluator, value_complete

log = logging.getLogger(__name__)


def latest_value_model(run_dir: Path, k: int) -> Path | None:
    """The value model of the latest round before k that trained one (search.value=model), or None."""
    for j in range(k - 1, -1, -1):
        if value_complete(round_dir(run_dir, j).value):
            return round_dir(run_dir, j).value
    return None


def search_value_model(s: Any, run_dir: Path, k: int) -> Path | None:
    """The value model that scores round k's new children, or None (self-evaluation, value.before_model)."""
    if s.search.value != "model" or s.pairs.source == "sampling":
        return None
    return latest_value_model(run_dir, k)


def search_evaluator(s: Any, run_dir: Path, k: int, policy: StepPolicy, formatter):
    """(evaluator, search config, value model path or None) for round k's search: the policy's
    self-evaluation, or with search.value=model the latest round's value model (value.before_model
    until one exists)."""
    if s.search.value != "model" or s.pairs.source == "sampling":
        return policy, s.search, None
    path = latest_value_model(run_dir, k)
    if path is None:
        log.info("round %d search: no value model yet; new children are scored by %s (value.before_model)", k,
                 s.value.before_model)
        return policy, replace(s.search, value=s.value.before_model), None
    log.info("round %d search: new children are scored by the value model %s", k, path)
    evaluator = make_value_evaluator(path, formatter.value_prompt, engine=s.value.engine, device=s.value.device,
                                     max_length=s.value.train.max_length, batch_size=s.value.search_batch,
                                     backend_cfg=engine_config(s))
    return evaluator, s.search, str(path)


@dataclass(frozen=True)
class TreeDone:
    """One finished tree, and what the sandbox cost since the job's previous tree (ToolStats fields;
    {} without a tool): the driver sums these over every worker."""

    tree: Tree
    tool: dict

    @property
    def ids(self) -> tuple[str, ...]:
        return (self.tree.problem.id,)


def stats_delta(now: dict, before: dict) -> dict:
    """Counters `now` less counters `before` (a missing key counts 0)."""
    return {key: value - before.get(key, 0) for key, value in now.items()}


def search_shard(backend: Backend, problems: Sequence[Problem], *, s: Any, run_dir: Path, k: int, task,
                 formatter) -> Iterator[TreeDone]:
    """Round k's lockstep search (or the sampling baseline, pairs.source=sampling) over `problems` with
    one backend; trees are yielded as they finish. A problem's request seeds derive from (run.seed, k,
    problem id, node id): its tree does not depend on which shard it is in (where the engine honours
    per-request seeds)."""
    policy = StepPolicy(backend, formatter, s.generation, eval_with_reference=s.search.eval_with_reference,
                        tool=s.tool)
    evaluator, search_cfg, _ = search_evaluator(s, run_dir, k, policy, formatter)
    seed = search_seed(s.run.seed, k)
    if s.pairs.source == "sampling":  # the outcome-only baseline (mcts/sampling.py)
        trees = sample_trees(problems, expander=policy, verifier=task, samples=s.pairs.samples,
                             batch_problems=s.search.batch_trees, seed=seed, length_exponent=s.search.length_exponent)
    else:
        trees = run_search(problems, expander=policy, evaluator=evaluator, verifier=task, config=search_cfg, seed=seed)
    before: dict = {}
    try:
        for tree in trees:
            now = policy.tool_stats
            yield TreeDone(tree, stats_delta(now, before))
            before = now
    finally:
        if evaluator is not policy:
            evaluator.close()


@dataclass(frozen=True)
class EvalPart:
    """evaluate_problems' eval.json entry for one shard of a task's problems."""

    result: dict

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r["id"] for r in self.result["records"])


def evaluate_shard(backend: Backend, problems: Sequence[Problem], *, s: Any, task, formatter, params: int,
                   seed: int) -> Iterator[EvalPart]:
    """An evaluation of `problems` with one backend, as one part (harness.evaluation.merge_results joins
    the parts of several shards)."""
    yield EvalPart(evaluate_problems(task, problems, backend=backend, formatter=formatter, gen=s.generation,
                                     cfg=s.eval, search=s.search, params=params, seed=seed, tool=s.tool))
