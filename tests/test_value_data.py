"""Value-model data from hand-built trees: terminal counts, soft/hard/q targets, filters, sibling pairs, JSON."""

from __future__ import annotations

import json

import pytest

from harness.rundir import write_jsonl_atomic
from mcts.tree import ROOT, Tree
from mcts.types import Problem
from mcts.value_data import (
    ValueDataConfig,
    ValueExample,
    ValuePair,
    example_from_json,
    example_to_json,
    examples_from_json,
    examples_from_trees,
    pair_from_json,
    pair_to_json,
    read_value_data,
    summary,
    terminal_counts,
    value_examples,
    value_pairs,
    value_rows,
)

PROBLEM = Problem("p1", "Tom has 2 apples and buys 3. How many?", "5")


ALL = ValueDataConfig(max_examples_per_tree=0)  # every example, no sample


def stats(node, visits: int, q: float) -> None:
    node.visits, node.value_sum = visits, q * visits


def build() -> Tree:
    """ids in brackets; C = terminal correct, W = terminal wrong, N = terminal with outcome None.

    root [0]
      a [1] (q .5)  -> a1 [5] C, a2 [6] W, a3 [7] N, a4 [8] (q .6) -> a41 [11] C
      b [2] (q -1)  -> b1 [9] W, b2 [10] W
      c [3] (q .2)  an unexpanded leaf: no terminal below
      d [4] C
    """
    t = Tree(PROBLEM)
    stats(t.root, 12, 0.1)
    a = t.add_child(ROOT, text="A")
    b = t.add_child(ROOT, text="B")
    c = t.add_child(ROOT, text="C")
    d = t.add_child(ROOT, text="D", terminal=True, answer="5", outcome=1.0)
    for node, visits, q in ((a, 4, 0.5), (b, 2, -1.0), (c, 1, 0.2), (d, 1, 1.0)):
        stats(node, visits, q)
    a1 = t.add_child(a.id, text="A1", terminal=True, answer="5", outcome=1.0)
    a2 = t.add_child(a.id, text="A2", terminal=True, answer="6", outcome=-1.0)
    a3 = t.add_child(a.id, text="A3", terminal=True, answer="5", outcome=None)
    a4 = t.add_child(a.id, text="A4")
    b1 = t.add_child(b.id, text="B1", terminal=True, answer="1", outcome=-1.0)
    b2 = t.add_child(b.id, text="B2", terminal=True, answer="2", outcome=-1.0)
    a41 = t.add_child(a4.id, text="A41", terminal=True, answer="5", outcome=1.0)
    for node, q in ((a1, 1.0), (a2, -1.0), (a3, 0.0), (a4, 0.6), (b1, -1.0), (b2, -1.0), (a41, 1.0)):
        stats(node, 1, q)
    assert [n.id for n in (a1, a2, a3, a4, b1, b2, a41)] == [5, 6, 7, 8, 9, 10, 11]
    return t


def targets(examples: list[ValueExample]) -> dict[int, float]:
    return {e.node_id: e.target for e in examples}


def pair_ids(pairs: list[ValuePair]) -> list[tuple[int, int, int]]:
    return [(p.parent_id, p.chosen_id, p.rejected_id) for p in pairs]


def test_terminal_counts_by_hand():
    assert terminal_counts(build()) == {
        0: (3, 6), 1: (2, 3), 2: (0, 2), 3: (0, 0), 4: (1, 1), 5: (1, 1), 6: (0, 1), 7: (0, 0), 8: (1, 1),
        9: (0, 1), 10: (0, 1), 11: (1, 1),
    }


def test_unvalidated_terminal_is_not_counted():
    tree = build()
    assert terminal_counts(tree)[7] == (0, 0) and terminal_counts(tree)[1] == (2, 3)
    assert 7 not in targets(value_examples(tree))
    tree.nodes[7].outcome = 1.0  # once validated it counts, below a and at the root
    counts = terminal_counts(tree)
    assert counts[7] == (1, 1) and counts[1] == (3, 4) and counts[ROOT] == (4, 7)
    assert targets(value_examples(tree))[7] == 1.0
    # only terminals count: an outcome on a non-terminal node is ignored
    tree.nodes[3].outcome = 1.0
    assert terminal_counts(tree)[3] == (0, 0)


def test_soft_targets_are_shares_of_correct_terminals():
    examples = value_examples(build(), ALL)
    assert targets(examples) == pytest.approx({1: 2 / 3, 2: 0.0, 4: 1.0, 5: 1.0, 6: 0.0, 8: 1.0, 9: 0.0, 10: 0.0,
                                               11: 1.0})
    assert [e.node_id for e in examples] == sorted(e.node_id for e in examples)
    a = examples[0]
    assert (a.problem_id, a.node_id, a.correct, a.total, a.depth, a.steps) == ("p1", 1, 2, 3, 1, ("A",))
    a41 = next(e for e in examples if e.node_id == 11)
    assert a41.steps == ("A", "A4", "A41") and a41.depth == 3 and a41.question == PROBLEM.question


def test_hard_targets_are_any_correct():
    got = targets(value_examples(build(), ValueDataConfig(target="hard", max_examples_per_tree=0)))
    assert got == {1: 1.0, 2: 0.0, 4: 1.0, 5: 1.0, 6: 0.0, 8: 1.0, 9: 0.0, 10: 0.0, 11: 1.0}


def test_q_targets_map_q_to_unit_interval():
    got = targets(value_examples(build(), ValueDataConfig(target="q", max_examples_per_tree=0)))
    assert got == pytest.approx({1: 0.75, 2: 0.0, 4: 1.0, 5: 1.0, 6: 0.0, 8: 0.8, 9: 0.0, 10: 0.0, 11: 1.0})
    # min_terminals=0: nodes with no validated terminal below become examples too, with their Q
    config = ValueDataConfig(target="q", min_terminals=0, include_root=True, max_examples_per_tree=0)
    got = targets(value_examples(build(), config))
    assert got == pytest.approx({0: 0.55, 1: 0.75, 2: 0.0, 3: 0.6, 4: 1.0, 5: 1.0, 6: 0.0, 7: 0.5, 8: 0.8, 9: 0.0,
                                 10: 0.0, 11: 1.0})


def test_q_target_skips_unvisited_nodes():
    tree = build()
    tree.add_child(3, text="C1")  # visits 0: its Q of 0 is a placeholder
    got = targets(value_examples(tree, ValueDataConfig(target="q", min_terminals=0)))
    assert 12 not in got and got[3] == pytest.approx(0.6)


def test_soft_and_hard_need_a_terminal_even_with_min_terminals_zero():
    for target in ("soft", "hard"):
        got = targets(value_examples(build(), ValueDataConfig(target=target, min_terminals=0)))
        assert 3 not in got and 7 not in got and 1 in got


def test_min_terminals_filters_nodes():
    assert sorted(targets(value_examples(build(), ValueDataConfig(min_terminals=2)))) == [1, 2]
    assert sorted(targets(value_examples(build(), ValueDataConfig(min_terminals=3)))) == [1]
    assert value_examples(build(), ValueDataConfig(min_terminals=7, include_root=True)) == []
    assert sorted(targets(value_examples(build(), ValueDataConfig(min_terminals=6, include_root=True)))) == [0]


def test_root_excluded_by_default():
    assert ROOT not in targets(value_examples(build()))
    examples = value_examples(build(), ValueDataConfig(include_root=True))
    root = examples[0]
    assert (root.node_id, root.steps, root.depth, root.correct, root.total) == (0, (), 0, 3, 6)
    assert root.target == pytest.approx(0.5)


def test_no_validated_terminals_no_examples():
    tree = build()
    for node in tree.nodes:
        node.outcome = None
    assert value_examples(tree) == [] and value_pairs(tree) == []
    assert value_examples(tree, ValueDataConfig(target="hard", include_root=True)) == []
    assert examples_from_trees([tree, Tree(Problem("empty", "q", "a"))]) == ([], [])


def test_default_pairs_best_vs_worst_sibling():
    tree = build()
    pairs = value_pairs(tree)
    # root: d (1) vs b (0), c has no terminal; a: a1 (1) vs a2 (0), a1 before a4 (tie) by id; b: 0 vs 0, no pair
    assert pair_ids(pairs) == [(0, 4, 2), (1, 5, 6)]
    root_pair, a_pair = pairs
    assert root_pair.prefix == () and root_pair.chosen_steps == ("D",) and root_pair.rejected_steps == ("B",)
    assert (root_pair.chosen_target, root_pair.rejected_target, root_pair.gap) == (1.0, 0.0, 1.0)
    assert a_pair.prefix == ("A",) and a_pair.chosen_steps == ("A", "A1") and a_pair.rejected_steps == ("A", "A2")
    assert a_pair.depth == 1 and a_pair.problem_id == "p1"
    for p in pairs:  # siblings under the stated parent
        assert tree.nodes[p.chosen_id].parent == p.parent_id == tree.nodes[p.rejected_id].parent
        assert p.chosen_steps[:-1] == p.prefix == p.rejected_steps[:-1] == tree.steps(p.parent_id)


def test_pairs_respect_margin_and_cap():
    uncapped = lambda margin: pair_ids(value_pairs(build(), ValueDataConfig(pair_margin=margin,  # noqa: E731
                                                                             max_pairs_per_parent=0)))
    # gaps at the root: d-b 1, a-b 2/3, d-a 1/3; at a: a1-a2 1, a4-a2 1, a1-a4 0
    assert uncapped(0.5) == [(0, 4, 2), (0, 1, 2), (1, 5, 6), (1, 8, 6)]
    assert uncapped(0.7) == [(0, 4, 2), (1, 5, 6), (1, 8, 6)]
    assert uncapped(0.0) == [(0, 4, 2), (0, 1, 2), (0, 4, 1), (1, 5, 6), (1, 8, 6)]  # never a gap of 0
    assert uncapped(1.01) == []
    assert pair_ids(value_pairs(build(), ValueDataConfig(pair_margin=0.0, max_pairs_per_parent=2))) == [
        (0, 4, 2), (0, 1, 2), (1, 5, 6), (1, 8, 6)]
    for p in value_pairs(build(), ValueDataConfig(pair_margin=0.3, max_pairs_per_parent=0)):
        assert p.gap >= 0.3 and p.chosen_target > p.rejected_target


def test_pairs_need_enough_terminals_on_both_sides():
    # min_terminals=2: at the root only a (3) and b (2) qualify; d (1) does not
    assert pair_ids(value_pairs(build(), ValueDataConfig(min_terminals=2))) == [(0, 1, 2)]


def test_pairs_hard_target_ties_by_chosen_id():
    pairs = value_pairs(build(), ValueDataConfig(target="hard", max_pairs_per_parent=0))
    assert pair_ids(pairs) == [(0, 1, 2), (0, 4, 2), (1, 5, 6), (1, 8, 6)]


def test_margin_tolerates_float_error():
    t = Tree(PROBLEM)
    x = t.add_child(ROOT, text="X")
    y = t.add_child(ROOT, text="Y")
    stats(x, 2, 0.4)  # (0.4 + 1) / 2 = 0.7
    stats(y, 2, -0.6)  # 0.2; 0.7 - 0.2 < 0.5 in floats
    t.add_child(x.id, text="X1", terminal=True, outcome=1.0, visits=1, value_sum=1.0)
    t.add_child(y.id, text="Y1", terminal=True, outcome=-1.0, visits=1, value_sum=-1.0)
    assert pair_ids(value_pairs(t, ValueDataConfig(target="q", pair_margin=0.5))) == [(0, 1, 2)]
    assert value_pairs(t, ValueDataConfig(target="q", pair_margin=0.51)) == []


def test_examples_from_trees_and_summary():
    other = Tree(Problem("p2", "2+2?", "4"))
    stats(other.add_child(ROOT, text="4", terminal=True, outcome=1.0), 1, 1.0)
    stats(other.add_child(ROOT, text="5", terminal=True, outcome=-1.0), 1, -1.0)
    examples, pairs = examples_from_trees([build(), other], ALL)
    assert [e.problem_id for e in examples] == ["p1"] * 9 + ["p2"] * 2
    assert pair_ids(pairs) == [(0, 4, 2), (1, 5, 6), (0, 1, 2)] and pairs[-1].problem_id == "p2"
    s = summary(examples, pairs)
    assert (s["examples"], s["pairs"], s["problems"]) == (11, 3, 2)
    assert s["mean_target"] == pytest.approx((2 / 3 + 5) / 11)
    assert s["extreme_share"] == pytest.approx(10 / 11)
    assert s["mean_gap"] == pytest.approx(1.0)
    assert s["mean_terminals"] == pytest.approx((3 + 2 + 7 * 1 + 2 * 1) / 11)  # a, b, seven with one, p2 two with one
    assert summary([], []) == {"examples": 0, "pairs": 0, "problems": 0}


def test_json_round_trip(tmp_path):
    examples, pairs = examples_from_trees([build()], ValueDataConfig(max_pairs_per_parent=0))
    rows = [example_to_json(e) for e in examples] + [pair_to_json(p) for p in pairs]
    assert {r["kind"] for r in rows} == {"example", "pair"}
    assert json.loads(json.dumps(rows)) == rows  # JSON-able
    assert all(example_from_json(example_to_json(e)) == e for e in examples)
    assert all(pair_from_json(pair_to_json(p)) == p for p in pairs)
    assert examples_from_json(rows[::-1]) == (examples[::-1], pairs[::-1])
    path = tmp_path / "value.jsonl"
    write_jsonl_atomic(path, value_rows(examples, pairs))  # as the loop writes it
    assert read_value_data(path) == (examples, pairs)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first["kind"] == "example" and first["steps"] == ["A"] and first["target"] == pytest.approx(2 / 3)


def test_tree_json_round_trip_gives_same_data():
    tree = build()
    again = Tree.from_json(json.loads(json.dumps(tree.to_json())))  # children rebuilt from parent links
    config = ValueDataConfig(target="q", max_pairs_per_parent=0)
    assert value_examples(again, config) == value_examples(tree, config)
    assert value_pairs(again, config) == value_pairs(tree, config)


def test_readers_reject_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="row 0: malformed value line.*kind='other'"):
        examples_from_json([{"kind": "other"}])
    with pytest.raises(ValueError, match="row 1: malformed value line: KeyError"):
        examples_from_json([example_to_json(value_examples(build())[0]), {"kind": "pair", "problem_id": "p"}])
    path = tmp_path / "value.jsonl"
    good = json.dumps(example_to_json(value_examples(build())[0]))
    path.write_text(good + "\n\n" + json.dumps({"kind": "example", "problem_id": "p"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="value.jsonl:3: malformed value line: KeyError"):  # blank line 2 counted
        read_value_data(path)
    path.write_text(good + "\n" + json.dumps({"kind": "rating"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="value.jsonl:2: malformed value line.*kind='rating'"):
        read_value_data(path)


@pytest.mark.parametrize("kw", [{"target": "mean"}, {"min_terminals": -1}, {"pair_margin": -0.1},
                                {"pair_margin": float("nan")}, {"max_pairs_per_parent": -1}])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        ValueDataConfig(**kw)


def test_max_examples_per_tree_samples_reproducibly():
    """value.data.max_examples_per_tree caps a tree's examples by a sample seeded by the problem id;
    pairs are drawn from every example whatever the cap."""
    tree = build()
    full = value_examples(tree, ALL)
    capped = value_examples(tree, ValueDataConfig(max_examples_per_tree=2))
    assert len(full) > 2 and len(capped) == 2
    assert set(e.node_id for e in capped) <= set(e.node_id for e in full)
    assert capped == value_examples(tree, ValueDataConfig(max_examples_per_tree=2))
    assert [e.node_id for e in capped] == sorted(e.node_id for e in capped)
    assert value_pairs(tree, ValueDataConfig(max_examples_per_tree=2)) == value_pairs(tree, ValueDataConfig())
    with pytest.raises(ValueError, match="max_examples_per_tree"):
        ValueDataConfig(max_examples_per_tree=-1)
