"""The search driver on a scripted fake policy: finds the known correct path, keeps its invariants,
batches one engine call per wave, streams, and reproduces a stored tree."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import FakePolicy, correct_steps, prefix_correct, sum_problem
from mcts.select import normalize_step
from mcts.search import (
    SearchConfig,
    SearchStats,
    best_answer,
    derive_seed,
    leaf_value,
    most_visited_path,
    run_search,
    validated_exhausted,
)
from mcts.tree import NO_PARENT, ROOT, Tree
from mcts.types import Problem

ROOT_DIR = Path(__file__).resolve().parent.parent
REGRESSION = Path(__file__).parent / "data" / "regression_tree.json"


def search(problems, config: SearchConfig, *, seed: int = 0, policy: FakePolicy | None = None,
           stats: SearchStats | None = None) -> list[Tree]:
    policy = policy or FakePolicy()
    return list(run_search(problems, expander=policy, evaluator=policy, verifier=policy, config=config, seed=seed,
                           stats=stats))


def check_invariants(tree: Tree, config: SearchConfig) -> None:
    """The backup invariant (see mcts.search) and the structural rules."""
    for node in tree.nodes:
        own = 0 if node.id == ROOT else 1
        if node.children:
            assert not node.terminal
            assert node.visits == own + 1 + sum(tree.nodes[c].visits - 1 for c in node.children), node
        elif node.id != ROOT and not node.terminal:
            assert node.visits == 1, node
        else:
            assert node.visits >= own
        assert -1.0 - 1e-9 <= node.q <= 1.0 + 1e-9
        assert node.depth <= config.max_depth
        if node.depth == config.max_depth:
            assert node.terminal
        if node.id != ROOT:
            assert node.depth == tree.nodes[node.parent].depth + 1
            if config.use_outcome and node.terminal:
                assert node.outcome in (1.0, -1.0)
            else:
                assert node.outcome is None
            assert (node.self_eval is not None) == config.evaluates
        keys = [normalize_step(tree.nodes[c].text) for c in node.children]
        assert len(keys) == len(set(keys)), "duplicate siblings"
        if node.children:
            assert sum(tree.nodes[c].prior for c in node.children) == pytest.approx(1.0)
    assert tree.root.parent == NO_PARENT
    assert tree.root.visits == tree.meta["simulations"] <= config.simulations


def test_finds_the_correct_path():
    problem = sum_problem([2, 3, 4])
    for seed in range(5):
        cfg = SearchConfig(simulations=16, revisit_validated=True)  # the reference: visits follow value
        (tree,) = search([problem], cfg, seed=seed)
        check_invariants(tree, cfg)
        right = correct_steps(problem)
        correct = [n for n in tree.terminals() if n.outcome == 1.0]
        assert correct, f"seed {seed}: no correct terminal"
        assert all(tree.steps(n.id) == tuple(right) for n in correct)
        path = most_visited_path(tree)
        assert prefix_correct(problem, tree.steps(path[1]))  # the root's most-visited child is right
        best = max(tree.terminals(), key=lambda n: n.q)
        assert best.outcome == 1.0
        assert best_answer(tree) == "9"
        assert tree.meta["stop"] in ("simulations", "resolved")


def test_inference_mode_no_outcomes():
    cfg = SearchConfig(simulations=12, use_outcome=False)
    (tree,) = search([sum_problem([2, 3, 4])], cfg)
    check_invariants(tree, cfg)
    assert all(n.outcome is None for n in tree.nodes)
    assert best_answer(tree) == "9"


def test_without_self_eval_the_evaluator_is_not_called():
    policy = FakePolicy()
    cfg = SearchConfig(simulations=10, value="none")
    (tree,) = search([sum_problem([1, 2, 3])], cfg, policy=policy)
    check_invariants(tree, cfg)
    assert policy.evaluate_calls == []
    assert all(n.self_eval is None for n in tree.nodes)
    assert tree.compute["evaluations"] == 0


def test_values():
    cfg = SearchConfig()
    assert leaf_value(0.75, None, config=cfg) == pytest.approx(0.5)
    assert leaf_value(0.75, 1.0, config=cfg) == pytest.approx((1.0 * 1 + 0.5 * 0.5) / 1.5)
    assert leaf_value(None, -1.0, config=cfg) == -1.0
    assert leaf_value(None, None, config=cfg) == 0.0


configs = st.builds(
    SearchConfig,
    simulations=st.integers(0, 20), batch_trees=st.integers(1, 4), breadth_root=st.integers(1, 4),
    breadth=st.integers(1, 3), max_depth=st.integers(1, 5), fpu=st.sampled_from([-0.5, 0.0, 0.5]),
    self_eval=st.booleans(), use_outcome=st.booleans(), backup=st.sampled_from(["mean", "max"]),
    revisit_validated=st.booleans(), stepwise=st.booleans(), commit_every=st.integers(1, 4),
    leaves_per_tree=st.integers(1, 3), c_puct=st.sampled_from([0.0, 1.0, 2.5]),
)
problem_lists = st.lists(st.lists(st.integers(1, 9), min_size=2, max_size=4), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(config=configs, numbers=problem_lists, seed=st.integers(0, 10_000), p_right=st.sampled_from([0.1, 0.4, 0.9]))
def test_properties(config, numbers, seed, p_right):
    problems = [sum_problem(ns, pid=f"p{i}") for i, ns in enumerate(numbers)]
    stats = SearchStats()
    trees = search(problems, config, seed=seed, policy=FakePolicy(p_right=p_right), stats=stats)
    assert sorted(t.problem.id for t in trees) == sorted(p.id for p in problems)
    for tree in trees:
        check_invariants(tree, config)
        assert Tree.from_json(json.loads(json.dumps(tree.to_json()))).to_json() == tree.to_json()
        if config.stepwise and tree.meta.get("committed"):
            chain = [ROOT, *tree.meta["committed"]]
            assert all(tree.nodes[b].parent == a for a, b in zip(chain, chain[1:]))
    again = search(problems, config, seed=seed, policy=FakePolicy(p_right=p_right))
    assert [t.to_json() for t in again] == [t.to_json() for t in trees]
    assert stats.expand_calls <= stats.waves and stats.evaluate_calls <= stats.waves


def test_one_engine_call_per_wave_for_50_trees():
    policy = FakePolicy()
    stats = SearchStats()
    problems = [sum_problem([i % 7 + 1, i % 5 + 2, 3], pid=f"p{i}") for i in range(50)]
    trees = search(problems, SearchConfig(simulations=8, batch_trees=50), policy=policy, stats=stats)
    assert len(trees) == 50
    # at most one expand and one evaluate call per wave, however many trees are in it
    assert stats.waves <= 8
    assert len(policy.expand_calls) == stats.expand_calls <= stats.waves
    assert len(policy.evaluate_calls) == stats.evaluate_calls <= stats.waves
    assert policy.expand_calls[0] == 50  # the first wave expands every root in one call
    assert sum(policy.expand_calls) == sum(t.compute["expansions"] for t in trees)
    assert sum(policy.evaluate_calls) == sum(t.compute["evaluations"] for t in trees)
    # requests are ordered by problem then steps (shared prefixes adjacent)
    first = policy.expand_log[:50]
    assert [r.problem.id for r in first] == sorted(r.problem.id for r in first)


def test_compute_is_accounted():
    policy = FakePolicy()
    (tree,) = search([sum_problem([2, 3, 4])], SearchConfig(simulations=6), policy=policy)
    assert tree.compute["generated_tokens"] >= sum(n.num_tokens for n in tree.nodes)  # merged samples count too
    assert tree.compute["evaluations"] == len(tree.nodes) - 1
    assert tree.compute["prompt_tokens"] > 0 and tree.compute["cached_tokens"] > 0


def test_streaming_refills_before_the_iterable_is_consumed():
    pulled = []

    def problems():
        for i in range(10):
            pulled.append(i)
            yield sum_problem([i + 1, 2], pid=f"p{i}")

    policy = FakePolicy()
    gen = run_search(problems(), expander=policy, evaluator=policy, verifier=policy,
                     config=SearchConfig(simulations=4, batch_trees=2))
    first = next(gen)
    assert first.problem.id in ("p0", "p1")
    assert len(pulled) < 10
    rest = list(gen)
    assert len(rest) == 9 and len(pulled) == 10


def test_stepwise_commits_along_a_chain():
    cfg = SearchConfig(simulations=12, stepwise=True, commit_every=3, max_depth=6)
    (tree,) = search([sum_problem([1, 2, 3, 4, 5])], cfg)
    check_invariants(tree, cfg)
    committed = tree.meta["committed"]
    assert 1 <= len(committed) <= 4
    chain = [ROOT, *committed]
    for a, b in zip(chain, chain[1:]):
        assert tree.nodes[b].parent == a
        # the committed child was the most visited of its siblings at commit time; later simulations only
        # go below it, so it stays the most visited
        assert tree.nodes[b].visits == max(tree.nodes[c].visits for c in tree.nodes[a].children)


def test_token_cap_stops_the_tree():
    policy = FakePolicy(tokens_per_step=10)
    cfg = SearchConfig(simulations=50, max_tokens_per_tree=45, max_depth=6)
    (tree,) = search([sum_problem([1, 2, 3, 4, 5])], cfg, policy=policy)
    assert tree.meta["stop"] == "token_cap"
    assert tree.compute["generated_tokens"] >= 45
    assert tree.meta["simulations"] < 50
    check_invariants(tree, cfg)


def test_validated_exhausted_marks_known_terminals_and_full_parents():
    tree = Tree(sum_problem([1, 2]))
    a = tree.add_child(ROOT, text="a", num_tokens=1, logprob=0.0, prior=0.5)
    b = tree.add_child(ROOT, text="b", num_tokens=1, logprob=0.0, prior=0.5, terminal=True, answer="4", outcome=-1.0)
    a1 = tree.add_child(a.id, text="a1", num_tokens=1, logprob=0.0, prior=0.5, terminal=True, answer="3", outcome=1.0)
    a2 = tree.add_child(a.id, text="a2", num_tokens=1, logprob=0.0, prior=0.5, terminal=True, answer="5", outcome=-1.0)
    # every leaf validated: the root itself is exhausted
    assert validated_exhausted(tree) == {ROOT, a.id, b.id, a1.id, a2.id}
    a3 = tree.add_child(a.id, text="a3", num_tokens=1, logprob=0.0, prior=0.0)  # expandable
    assert validated_exhausted(tree) == {b.id, a1.id, a2.id}
    a3.terminal, a3.answer = True, "9"  # a terminal without a validated outcome (inference time) stays selectable
    assert validated_exhausted(tree) == {b.id, a1.id, a2.id}


@pytest.mark.parametrize("seed", range(4))
def test_skipping_validated_terminals_spends_every_simulation_on_an_expansion(seed):
    problem = sum_problem([2, 3, 4, 5])
    revisit = SearchConfig(simulations=24, revisit_validated=True)
    skip = dataclasses.replace(revisit, revisit_validated=False)
    (t_revisit,), (t_skip,) = search([problem], revisit, seed=seed), search([problem], skip, seed=seed)
    check_invariants(t_skip, skip)
    # no terminal with a validated outcome is ever selected again (the root's visit counts simulations)
    assert all(n.visits == 1 for n in t_skip.terminals() if n.outcome is not None)
    assert t_skip.compute["expansions"] == t_skip.meta["simulations"]
    assert any(n.visits > 1 for n in t_revisit.terminals())  # the reference re-counts known outcomes...
    assert t_revisit.compute["expansions"] < t_skip.compute["expansions"]  # ... at the expense of expansions
    assert len(t_skip.terminals()) > len(t_revisit.terminals())
    assert t_skip.solved() and t_revisit.solved()


def test_skipping_validated_terminals_stops_when_everything_is_known():
    cfg = SearchConfig(simulations=100, breadth_root=2, breadth=2, max_depth=3, revisit_validated=False)
    (tree,) = search([sum_problem([1, 2])], cfg)
    assert tree.meta["stop"] == "resolved"
    assert tree.compute["expansions"] == tree.meta["simulations"] < 100
    check_invariants(tree, cfg)


def test_depth_limit_generates_to_the_end():
    policy = FakePolicy()
    cfg = SearchConfig(simulations=20, max_depth=2)
    (tree,) = search([sum_problem([1, 2, 3, 4])], cfg, policy=policy)
    check_invariants(tree, cfg)
    to_end = [r for r in policy.expand_log if r.to_end]
    assert to_end and all(len(r.steps) == 1 and r.n == 1 for r in to_end)
    deep = [n for n in tree.nodes if n.depth == 2]
    assert deep and all(n.terminal and n.answer is not None for n in deep)


def test_resolved_tree_stops_early():
    cfg = SearchConfig(simulations=100, breadth_root=1, breadth=1, max_depth=3)
    (tree,) = search([sum_problem([1, 2])], cfg, policy=FakePolicy(p_right=1.0))
    assert tree.meta["stop"] == "resolved"
    assert tree.meta["simulations"] < 100


def test_several_leaves_per_tree_use_virtual_loss():
    policy = FakePolicy()
    cfg = SearchConfig(simulations=12, leaves_per_tree=3)
    stats = SearchStats()
    (tree,) = search([sum_problem([2, 3, 4, 5])], cfg, policy=policy, stats=stats)
    check_invariants(tree, cfg)
    assert stats.waves < 12
    assert max(policy.expand_calls) > 1  # several leaves of one tree expanded in one call
    expanded = [(r.problem.id, r.steps) for r in policy.expand_log]
    assert len(expanded) == len(set(expanded))  # no leaf expanded twice


def test_seeds_are_stable_and_distinct():
    assert derive_seed(0, "p0", 0) == derive_seed(0, "p0", 0)
    assert derive_seed(0, "p0", 0) == 31333713  # pinned: must not change between processes or versions
    seeds = {derive_seed(s, p, n) for s in range(3) for p in ("a", "b") for n in range(5)}
    assert len(seeds) == 30 and all(0 <= s < 2**31 for s in seeds)


def test_best_answer_rules():
    tree = Tree(problem=Problem("p", "q", "5"))
    tree.root.visits = 10
    tree.add_child(ROOT, terminal=True, answer="5", visits=3, value_sum=1.5)    # Q .5: vote 3*.75 = 2.25
    tree.add_child(ROOT, terminal=True, answer="6", visits=4, value_sum=-2.0)   # Q -.5: vote 4*.25 = 1.0
    tree.add_child(ROOT, terminal=True, answer="6", visits=2, value_sum=1.8)    # Q .9: vote 2*.95 = 1.9
    tree.add_child(ROOT, terminal=True, answer=None, visits=1, value_sum=1.0)
    assert best_answer(tree) == "6"                   # 2.9 > 2.25
    assert best_answer(tree, rule="visit_vote") == "6"
    assert best_answer(tree, rule="max_q") == "6"
    assert best_answer(tree, rule="most_visited") == "6"
    tree.nodes[3].answer = "5.0"
    assert best_answer(tree) == "5"                   # 2.25 > 1.0 and 1.9
    assert best_answer(tree, same=lambda a, b: float(a) == float(b)) == "5"   # 4.15
    assert best_answer(Tree(problem=Problem("p", "q", "5"))) is None
    with pytest.raises(ValueError):
        best_answer(tree, rule="nope")


def test_config_validation_and_yaml_defaults():
    with pytest.raises(ValueError, match="backup"):
        SearchConfig(backup="median")
    with pytest.raises(ValueError, match="breadth"):
        SearchConfig(breadth=0)
    data = yaml.safe_load((ROOT_DIR / "conf" / "search" / "default.yaml").read_text())
    assert data == dataclasses.asdict(SearchConfig())


def regression_trees() -> list[dict]:
    cfg = SearchConfig(simulations=10, breadth_root=3, breadth=2, max_depth=4,
                       revisit_validated=True)  # the reference rule, as stored
    problems = [sum_problem([2, 3, 4]), sum_problem([7, 1, 5, 2], pid="hard")]
    return [t.to_json() for t in search(problems, cfg, seed=1234)]


def test_regression_tree():
    fresh = json.loads(json.dumps(regression_trees()))
    if os.environ.get("MCTSLOOP_REGEN") == "1":
        REGENERATE = REGRESSION
        REGENERATE.write_text(json.dumps(fresh, indent=1, ensure_ascii=False) + "\n")
    stored = json.loads(REGRESSION.read_text())
    assert fresh == stored, "search changed: if intended, regenerate with MCTSLOOP_REGEN=1 pytest -k regression"


def test_search_value_setting():
    """search.value chooses what scores new children; the former self_eval=false still means none."""
    assert SearchConfig().value == "self_eval" and SearchConfig().evaluates
    assert SearchConfig(value="none").evaluates is False
    assert SearchConfig(self_eval=False).value == "none"
    assert SearchConfig(value="model", self_eval=True).value == "model"
    with pytest.raises(ValueError, match="search.value='learned'"):
        SearchConfig(value="learned")


class _ConstantValue:
    """An evaluator with no signal: every partial solution scores 0.5."""

    def evaluate(self, requests):
        from mcts.types import Evaluation

        return [Evaluation(0.5) for _ in requests]


def test_an_informative_value_reaches_the_correct_path_in_fewer_simulations():
    """Issue 18: a value evaluator that tells correct partial solutions from wrong ones (the fake's scores,
    as a learned value model would give) steers the search, without gold, to the correct answer within a
    budget where a constant value mostly does not (measured: 26 of 30 trees against 10)."""
    import random

    rng = random.Random(0)
    problems = [sum_problem([rng.randint(1, 9) for _ in range(4)], pid=f"v{i}") for i in range(30)]
    policy = FakePolicy(p_right=0.4, noise=0.05, right_score=0.9, wrong_score=0.1)
    config = SearchConfig(simulations=6, batch_trees=8, breadth_root=4, breadth=4, max_depth=5, use_outcome=False,
                          value="model")
    found = {}
    for name, evaluator in (("informed", policy), ("constant", _ConstantValue())):
        trees = run_search(problems, expander=policy, evaluator=evaluator, verifier=policy, config=config, seed=7)
        found[name] = sum(any(n.terminal and policy.is_correct(n.answer, t.problem) for n in t.nodes) for t in trees)
    assert found["informed"] >= found["constant"] + 10, found
