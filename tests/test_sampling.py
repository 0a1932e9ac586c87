"""The sampling (outcome-only) pair source on scripted policies: exact pairs, caps, compute ledger."""

from __future__ import annotations

import re

from mcts.pairs import PairsConfig, extract_pairs, pair_stats
from mcts.sampling import outcome_pairs, sample_trees
from mcts.tree import Tree
from mcts.types import Expansion, Problem, StepSample
from tests.fakes import FakePolicy, sum_problem

ANSWER = re.compile(r"The answer is (-?\d+)")


class Scripted:
    """Expander + Verifier returning fixed solutions per problem id; records calls."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, []

    def expand(self, requests):
        self.calls.append([(r.problem.id, r.n, r.to_end, r.steps) for r in requests])
        return [Expansion(tuple(StepSample(t, num_tokens=len(t.split()), logprob=-1.0, finished=True)
                                for t in self.script[r.problem.id][:r.n]), prompt_tokens=7, cached_tokens=2)
                for r in requests]

    def extract(self, text):
        m = ANSWER.findall(text)
        return m[-1] if m else None

    def is_correct(self, predicted, problem):
        return predicted == problem.answer


def fmt(problem: Problem, steps: tuple[str, ...]) -> str:
    return f"<{problem.question}>" + "".join(s + "\n" for s in steps)


P1 = Problem("a", "1+1?", "2")
P2 = Problem("b", "2+2?", "4")
P3 = Problem("c", "3+3?", "6")
SCRIPT = {
    "a": ["1+1=2\nThe answer is 2.", "1+1=3\nThe answer is 3.", "The answer is 2.", "no answer"],
    "b": ["The answer is 4.", "The answer is 4."],     # all correct: no pairs
    "c": ["The answer is 5.", "6?"],                     # all wrong: no pairs
}


def grow(script=SCRIPT, problems=(P1, P2, P3), samples=4, batch=2):
    policy = Scripted(script)
    return policy, list(sample_trees(problems, expander=policy, verifier=policy, samples=samples, batch_problems=batch))


def test_trees_hold_checked_whole_solutions():
    policy, trees = grow()
    assert [len(call) for call in policy.calls] == [2, 1]  # batched by problems
    assert all(n == 4 and to_end and steps == () for call in policy.calls for _, n, to_end, steps in call)
    a = trees[0]
    assert a.meta["source"] == "sampling" and len(a.nodes) == 5
    assert [n.outcome for n in a.nodes[1:]] == [1.0, -1.0, 1.0, -1.0]
    assert [n.answer for n in a.nodes[1:]] == ["2", "3", "2", None]
    assert all(n.terminal and n.visits == 1 and n.q == n.outcome for n in a.nodes[1:])
    assert a.root.visits == 4 and a.solved()
    assert abs(sum(n.prior for n in a.nodes[1:]) - 1.0) < 1e-9
    # the compute ledger: what the engine reported for this problem's call
    assert a.compute["generated_tokens"] == sum(len(t.split()) for t in SCRIPT["a"])
    assert (a.compute["prompt_tokens"], a.compute["cached_tokens"], a.compute["expansions"]) == (7, 2, 1)
    assert Tree.from_json(a.to_json()).meta["source"] == "sampling"


def test_exact_pairs_correct_against_wrong():
    _, trees = grow()
    pairs = [p for t in trees for p in extract_pairs(t, config=PairsConfig(source="sampling"), format_prompt=fmt,
                                                      round_index=1)]
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("1+1=2\nThe answer is 2.", "1+1=3\nThe answer is 3."),
        ("1+1=2\nThe answer is 2.", "no answer"),
        ("The answer is 2.", "1+1=3\nThe answer is 3."),
        ("The answer is 2.", "no answer"),
    }
    assert all(p["prompt"] == "<1+1?>" and p["problem_id"] == "a" and p["round"] == 1 for p in pairs)
    assert all(p["chosen_q"] == 1.0 and p["rejected_q"] == -1.0 and p["depth"] == 0 for p in pairs)
    assert pair_stats(pairs)["problems"] == 1


def test_cap_spreads_pairs_over_distinct_solutions():
    _, trees = grow()
    capped = outcome_pairs(trees[0], format_prompt=fmt, max_pairs=2)
    assert len(capped) == 2
    assert len({p["chosen"] for p in capped}) == 2 and len({p["rejected"] for p in capped}) == 2
    # duplicate solutions count once
    _, dup = grow({"a": ["The answer is 2.", "The answer is 2.", "The answer is 9."]}, problems=(P1,), samples=3)
    assert len(outcome_pairs(dup[0], format_prompt=fmt)) == 1


def test_with_the_fake_search_policy():
    policy = FakePolicy(p_right=0.5)
    problems = [sum_problem([2, 3, 4], pid=f"s{i}") for i in range(6)]
    trees = list(sample_trees(problems, expander=policy, verifier=policy, samples=8, batch_problems=4))
    assert policy.expand_calls == [4, 2]
    for tree in trees:
        pairs = extract_pairs(tree, config=PairsConfig(source="sampling", max_pairs_per_tree=3), format_prompt=fmt)
        good = {tree.nodes[c].text for c in tree.root.children if tree.nodes[c].outcome > 0}
        bad = {tree.nodes[c].text for c in tree.root.children if tree.nodes[c].outcome < 0}
        assert len(pairs) == min(3, len(good) * len(bad))
        assert all(p["chosen"] in good and p["rejected"] in bad for p in pairs)


def test_priors_use_the_given_length_exponent():
    from mcts.search import SearchConfig
    from mcts.select import step_priors

    lengths = [len(t.split()) for t in SCRIPT["a"]]
    priors = {}
    for exponent in (0.0, 2.0):
        policy = Scripted(SCRIPT)
        (a,) = sample_trees((P1,), expander=policy, verifier=policy, samples=4, length_exponent=exponent)
        priors[exponent] = [n.prior for n in a.nodes[1:]]
        assert priors[exponent] == step_priors([-1.0] * 4, lengths, length_exponent=exponent)
    assert priors[0.0] != priors[2.0]
    _, (default, *_) = grow()
    assert [n.prior for n in default.nodes[1:]] == step_priors([-1.0] * 4, lengths,
                                                              length_exponent=SearchConfig().length_exponent)


def test_request_seeds_are_the_searchs_root_seeds():
    from harness.seeds import derive_seed
    from mcts.tree import ROOT as ROOT_ID

    policy = FakePolicy()
    list(sample_trees([sum_problem([1, 2], pid="q")], expander=policy, verifier=policy, samples=2, seed=7))
    assert [r.seed for r in policy.expand_log] == [derive_seed(7, "q", ROOT_ID)]
