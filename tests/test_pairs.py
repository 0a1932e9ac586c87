"""Pair extraction on hand-built trees: margins, min visits, caps, full pairs, correct-only, dedupe."""

from __future__ import annotations

import dataclasses

import json

import pytest

from mcts.pairs import PairsConfig, extract_pairs, pair_stats, read_pairs, write_pairs
from mcts.tree import Tree
from mcts.types import Problem

PROBLEM = Problem("p1", "Tom has 2 apples and buys 3. How many?", "5")


def q_ranked(**kw) -> PairsConfig:
    """MCTS-DPO's extraction (Q-ranked, one step each side) unless `kw` says otherwise; the defaults
    (conf/pairs/mcts.yaml) are verified whole continuations."""
    return PairsConfig(**{"verified": False, "full": False, **kw})


def fmt(problem: Problem, steps: tuple[str, ...]) -> str:
    return f"Q:{problem.question}|" + "".join(s + "\n" for s in steps)


def set_stats(node, visits: int, q: float) -> None:
    node.visits, node.value_sum = visits, q * visits


def build() -> Tree:
    """root -> a (q .6, v 4), b (q -.5, v 2), c (q .1, v 1)
    a -> a1 terminal correct (q 1, v 2), a2 terminal wrong (q -1, v 1)
    b -> b1 terminal wrong (q -.8, v 1)   (one child: no pair at b)"""
    t = Tree(PROBLEM)
    set_stats(t.root, 7, 0.2)
    a = t.add_child(0, text="2 + 3 = 5.")
    b = t.add_child(0, text="2 - 3 = -1.")
    c = t.add_child(0, text="Tom has apples.")
    set_stats(a, 4, 0.6)
    set_stats(b, 2, -0.5)
    set_stats(c, 1, 0.1)
    a1 = t.add_child(a.id, text="The answer is 5.", terminal=True, answer="5", outcome=1.0)
    a2 = t.add_child(a.id, text="The answer is 6.", terminal=True, answer="6", outcome=-1.0)
    set_stats(a1, 2, 1.0)
    set_stats(a2, 1, -1.0)
    b1 = t.add_child(b.id, text="The answer is -1.", terminal=True, answer="-1", outcome=-1.0)
    set_stats(b1, 1, -0.8)
    return t


def test_step_pairs_highest_vs_lowest_q():
    pairs = extract_pairs(build(), config=q_ranked(margin=0.0), format_prompt=fmt, round_index=3)
    assert len(pairs) == 2
    top = pairs[0]  # largest gap first: a1 vs a2 (gap 2.0)
    assert top["prompt"] == fmt(PROBLEM, ("2 + 3 = 5.",))
    assert (top["chosen"], top["rejected"]) == ("The answer is 5.", "The answer is 6.")  # final steps: no suffix
    assert top["gap"] == pytest.approx(2.0) and top["depth"] == 1 and top["round"] == 3
    root_pair = pairs[1]
    assert root_pair["prompt"] == fmt(PROBLEM, ())
    assert (root_pair["chosen"], root_pair["rejected"]) == ("2 + 3 = 5.\n", "2 - 3 = -1.\n")
    assert root_pair["chosen_q"] == pytest.approx(0.6) and root_pair["rejected_q"] == pytest.approx(-0.5)
    assert (root_pair["chosen_visits"], root_pair["rejected_visits"]) == (4, 2)
    assert root_pair["problem_id"] == "p1"


def test_margin_filters_small_gaps():
    pairs = extract_pairs(build(), config=q_ranked(margin=1.5), format_prompt=fmt)
    assert [p["node_id"] for p in pairs] == [1]
    assert extract_pairs(build(), config=q_ranked(margin=2.5), format_prompt=fmt) == []


def test_min_visits_excludes_rarely_visited_children():
    # min_visits 2: at the root only a (4) and b (2) qualify; at a only a1 (2): no pair there.
    pairs = extract_pairs(build(), config=q_ranked(margin=0.0, min_visits=2), format_prompt=fmt)
    assert len(pairs) == 1 and pairs[0]["node_id"] == 0
    # min_visits 3: only a at the root: nothing.
    assert extract_pairs(build(), config=q_ranked(margin=0.0, min_visits=3), format_prompt=fmt) == []


def test_cap_keeps_largest_gaps():
    pairs = extract_pairs(build(), config=q_ranked(margin=0.0, max_pairs_per_tree=1), format_prompt=fmt)
    assert len(pairs) == 1 and pairs[0]["gap"] == pytest.approx(2.0)


def test_full_pairs_continue_to_terminals():
    pairs = extract_pairs(build(), config=q_ranked(margin=0.0, full=True), format_prompt=fmt)
    root_pair = next(p for p in pairs if p["node_id"] == 0)
    assert root_pair["chosen"] == "2 + 3 = 5.\nThe answer is 5."
    assert root_pair["rejected"] == "2 - 3 = -1.\nThe answer is -1."
    assert root_pair["chosen_terminal"] and root_pair["rejected_terminal"]


def test_full_pairs_skip_unfinished_continuations():
    t = build()
    # c (unexpanded, non-terminal) becomes the lowest-Q child: its continuation never ends.
    set_stats(t.nodes[3], 1, -0.9)
    pairs = extract_pairs(t, config=q_ranked(margin=0.0, full=True), format_prompt=fmt)
    assert all(p["node_id"] != 0 for p in pairs)
    step = extract_pairs(t, config=q_ranked(margin=0.0), format_prompt=fmt)
    assert any(p["node_id"] == 0 and p["rejected"] == "Tom has apples.\n" for p in step)


def test_correct_only_drops_unsolved_trees():
    t = build()
    assert extract_pairs(t, config=q_ranked(margin=0.0, correct_only=True), format_prompt=fmt)
    t.nodes[4].outcome = -1.0
    assert extract_pairs(t, config=q_ranked(margin=0.0, correct_only=True), format_prompt=fmt) == []
    assert extract_pairs(t, config=q_ranked(margin=0.0), format_prompt=fmt)


def test_dedupe_and_equal_texts():
    t = build()
    # two expanded nodes whose prefixes render the same prompt produce the same pair once
    dup = t.add_child(0, text="2 + 3 = 5.")
    set_stats(dup, 3, 0.6)
    d1 = t.add_child(dup.id, text="The answer is 5.", terminal=True, answer="5", outcome=1.0)
    d2 = t.add_child(dup.id, text="The answer is 6.", terminal=True, answer="6", outcome=-1.0)
    set_stats(d1, 1, 1.0)
    set_stats(d2, 1, -1.0)
    on = extract_pairs(t, config=q_ranked(margin=0.0), format_prompt=fmt)
    off = extract_pairs(t, config=q_ranked(margin=0.0, dedupe=False), format_prompt=fmt)
    assert len(off) == len(on) + 1
    # siblings whose text differs only in whitespace never form a pair
    t2 = Tree(PROBLEM)
    x, y = t2.add_child(0, text="a = 1."), t2.add_child(0, text="a = 1. ")
    set_stats(x, 2, 0.5)
    set_stats(y, 2, -0.5)
    assert extract_pairs(t2, config=q_ranked(margin=0.0), format_prompt=fmt) == []


def test_step_suffix_override_and_ties():
    pairs = extract_pairs(build(), config=q_ranked(margin=0.0, step_suffix=" "), format_prompt=fmt)
    root_pair = next(p for p in pairs if p["node_id"] == 0)
    assert root_pair["chosen"] == "2 + 3 = 5. "
    t = Tree(PROBLEM)
    x, y = t.add_child(0, text="x"), t.add_child(0, text="y")
    set_stats(x, 2, 0.3)
    set_stats(y, 5, 0.3)
    assert extract_pairs(t, config=q_ranked(margin=0.0), format_prompt=fmt) == []  # equal Q: no preference


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="margin"):
        PairsConfig(margin=-0.1)


def test_stats_and_round_trip(tmp_path):
    pairs = extract_pairs(build(), config=q_ranked(margin=0.0), format_prompt=fmt)
    stats = pair_stats(pairs)
    assert stats["count"] == 2 and stats["problems"] == 1
    assert stats["mean_gap"] == pytest.approx((2.0 + 1.1) / 2)
    assert pair_stats([]) == {"count": 0, "problems": 0}
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, pairs)
    assert read_pairs(path) == pairs
    path.write_text(path.read_text() + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: missing key"):
        read_pairs(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: not a JSON line"):
        read_pairs(path)


def verified_tree() -> Tree:
    """root -> a (q .5): a1 terminal wrong, a2 -> a21 terminal correct
               b (q -.2): b1 terminal wrong
               c (q -.9): unexpanded (self-evaluation only)
    By Q alone the root pair is a vs c; verified, c leads to no checked answer: a vs b."""
    t = Tree(PROBLEM)
    set_stats(t.root, 8, 0.0)
    a = t.add_child(0, text="5 + 3 = 8.")
    b = t.add_child(0, text="5 - 3 = 2.")
    c = t.add_child(0, text="Hmm.")
    set_stats(a, 4, 0.5)
    set_stats(b, 2, -0.2)
    set_stats(c, 1, -0.9)
    a1 = t.add_child(a.id, text="The answer is 9.", terminal=True, answer="9", outcome=-1.0)
    a2 = t.add_child(a.id, text="So she has 8.")
    set_stats(a1, 1, 0.9)  # a wrong terminal with a high Q (say, a noisy value): verified ignores Q here
    set_stats(a2, 2, 0.1)
    a21 = t.add_child(a2.id, text="The answer is 8.", terminal=True, answer="8", outcome=1.0)
    set_stats(a21, 1, 1.0)
    b1 = t.add_child(b.id, text="The answer is 2.", terminal=True, answer="2", outcome=-1.0)
    set_stats(b1, 1, -1.0)
    return t


def test_outcome_reach():
    from mcts.pairs import outcome_reach

    reach = outcome_reach(verified_tree())
    assert reach[0] == (True, True)
    assert reach[1] == (True, True) and reach[2] == (False, True) and reach[3] == (False, False)
    assert reach[5] == (True, False) and reach[4] == (False, True)


def test_verified_pairs_follow_validated_outcomes():
    plain = extract_pairs(verified_tree(), config=q_ranked(margin=0.0), format_prompt=fmt)
    root = next(p for p in plain if p["node_id"] == 0)
    assert (root["chosen_id"], root["rejected_id"]) == (1, 3)  # Q alone: a vs the unexplored c
    at_a = next(p for p in plain if p["node_id"] == 1)
    assert (at_a["chosen_id"], at_a["rejected_id"]) == (4, 5)  # Q alone prefers the wrong terminal

    pairs = extract_pairs(verified_tree(), config=q_ranked(margin=0.0, verified=True), format_prompt=fmt)
    by_node = {p["node_id"]: p for p in pairs}
    assert set(by_node) == {0, 1}
    assert (by_node[0]["chosen_id"], by_node[0]["rejected_id"]) == (1, 2)
    assert (by_node[1]["chosen_id"], by_node[1]["rejected_id"]) == (5, 4)
    assert by_node[1]["chosen"] == "So she has 8.\n" and by_node[1]["rejected"] == "The answer is 9."

    full = extract_pairs(verified_tree(), config=q_ranked(margin=0.0, verified=True, full=True), format_prompt=fmt)
    root = next(p for p in full if p["node_id"] == 0)
    assert root["chosen"] == "5 + 3 = 8.\nSo she has 8.\nThe answer is 8."  # along the correct branch, not a1
    assert root["rejected"] == "5 - 3 = 2.\nThe answer is 2."



def test_default_pairs_are_verified_whole_continuations():
    default = extract_pairs(verified_tree(), config=PairsConfig(margin=0.0), format_prompt=fmt)
    assert default == extract_pairs(verified_tree(), config=q_ranked(margin=0.0, verified=True, full=True),
                                    format_prompt=fmt)
    assert default != extract_pairs(verified_tree(), config=q_ranked(margin=0.0), format_prompt=fmt)

def test_all_rejected_pairs_the_chosen_with_every_qualifying_sibling():
    # Q-ranked: root a (.6) vs b (-.5) and vs c (.1); the margin still applies to each sibling.
    one = extract_pairs(build(), config=q_ranked(margin=0.2), format_prompt=fmt)
    every = extract_pairs(build(), config=q_ranked(margin=0.2, all_rejected=True), format_prompt=fmt)
    assert sorted((p["node_id"], p["chosen_id"], p["rejected_id"]) for p in one) == [(0, 1, 2), (1, 4, 5)]
    assert sorted((p["node_id"], p["chosen_id"], p["rejected_id"]) for p in every) == [(0, 1, 2), (0, 1, 3), (1, 4, 5)]
    strict = extract_pairs(build(), config=q_ranked(margin=0.6, all_rejected=True), format_prompt=fmt)
    assert sorted((p["node_id"], p["rejected_id"]) for p in strict) == [(0, 2), (1, 5)]

    # Verified: a second wrong-only root child d adds a root pair; the unexplored c never qualifies.
    tree = verified_tree()
    d = tree.add_child(0, text="5 * 3 = 15.")
    set_stats(d, 1, 0.3)
    d1 = tree.add_child(d.id, text="The answer is 15.", terminal=True, answer="15", outcome=-1.0)
    set_stats(d1, 1, -1.0)
    cfg = q_ranked(margin=0.0, verified=True, full=True, all_rejected=True)
    pairs = extract_pairs(tree, config=cfg, format_prompt=fmt)
    root = [p for p in pairs if p["node_id"] == 0]
    assert [p["rejected_id"] for p in sorted(root, key=lambda p: p["rejected_q"])] == [b_id(tree), d.id]
    assert {p["rejected"] for p in root} == {"5 - 3 = 2.\nThe answer is 2.", "5 * 3 = 15.\nThe answer is 15."}
    assert all(p["chosen"] == "5 + 3 = 8.\nSo she has 8.\nThe answer is 8." for p in root)
    capped = extract_pairs(tree, config=q_ranked(margin=0.0, verified=True, full=True, all_rejected=True,
                                                    max_pairs_per_tree=1), format_prompt=fmt)
    assert len(capped) == 1
    assert len(extract_pairs(tree, config=q_ranked(margin=0.0, verified=True, full=True), format_prompt=fmt)) == 2


def b_id(tree: Tree) -> int:
    return next(n.id for n in tree.nodes if n.text == "5 - 3 = 2.")


def test_match_steps_picks_the_rejected_continuation_as_long_as_the_chosen_one():
    tree = verified_tree()  # chosen at the root: a -> a2 -> a21 (3 steps); b -> b1 is wrong in 2
    d = tree.add_child(0, text="5 * 3 = 15.")
    set_stats(d, 2, 0.3)
    d1 = tree.add_child(d.id, text="So she has 15.")
    set_stats(d1, 1, 0.2)
    d11 = tree.add_child(d1.id, text="The answer is 15.", terminal=True, answer="15", outcome=-1.0)
    set_stats(d11, 1, -1.0)
    base = q_ranked(margin=0.0, verified=True, full=True)
    lowest = next(p for p in extract_pairs(tree, config=base, format_prompt=fmt) if p["node_id"] == 0)
    assert lowest["rejected_id"] == b_id(tree)  # the lowest Q: 2 steps against the chosen 3
    cfg = dataclasses.replace(base, match_steps=True)
    matched = next(p for p in extract_pairs(tree, config=cfg, format_prompt=fmt) if p["node_id"] == 0)
    assert matched["rejected_id"] == d.id
    assert matched["chosen"].count("\n") == matched["rejected"].count("\n") == 2
    assert matched["rejected"] == "5 * 3 = 15.\nSo she has 15.\nThe answer is 15."
    # equal distance: the lower Q wins, as without the option
    set_stats(d11, 1, -1.0)
    tree.nodes[d1.id].children.clear()
    tree.nodes[d1.id].terminal, tree.nodes[d1.id].answer, tree.nodes[d1.id].outcome = True, "15", -1.0
    again = next(p for p in extract_pairs(tree, config=cfg, format_prompt=fmt) if p["node_id"] == 0)
    assert again["rejected_id"] == b_id(tree)
    # Q-ranked pairs keep the margin: a sibling too close in Q is not taken
    q_cfg = q_ranked(margin=0.45, full=True, match_steps=True)
    q_root = [p for p in extract_pairs(verified_tree(), config=q_cfg, format_prompt=fmt) if p["node_id"] == 0]
    assert all(p["gap"] >= 0.45 for p in q_root)


def test_max_depth_keeps_pairs_branching_near_the_root():
    tree = verified_tree()  # verified pairs branch at the root (a vs b) and at a (a2 vs a1)
    base = q_ranked(margin=0.0, verified=True, full=True)
    assert sorted(p["depth"] for p in extract_pairs(tree, config=base, format_prompt=fmt)) == [0, 1]
    root_only = extract_pairs(tree, config=dataclasses.replace(base, max_depth=0), format_prompt=fmt)
    assert [(p["node_id"], p["depth"]) for p in root_only] == [(0, 0)]
    assert root_only[0]["prompt"] == fmt(PROBLEM, ())  # the question alone, as a sampled pair's
    deep = extract_pairs(tree, config=dataclasses.replace(base, max_depth=1), format_prompt=fmt)
    assert len(deep) == 2
    with pytest.raises(ValueError, match="pairs.max_depth=-1"):
        PairsConfig(max_depth=-1)
