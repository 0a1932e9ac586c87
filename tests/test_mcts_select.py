"""Priors, PUCT scores and selection against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from mcts.select import (
    child_scores,
    merge_duplicates,
    most_visited_child,
    normalize_step,
    puct_score,
    select_child,
    select_leaf,
    step_priors,
)
from mcts.tree import ROOT, Tree
from mcts.types import Problem


def test_priors_hand_computed():
    # 4 tokens: -2 / 4**1.25 = -0.35355; 8 tokens: -4 / 8**1.25 = -0.29730
    # p = softmax(-0.35355, -0.29730) = (0.48594, 0.51406)
    p = step_priors([-2.0, -4.0], [4, 8], length_exponent=1.25)
    assert p == pytest.approx([0.48594, 0.51406], abs=1e-5)
    # lambda = 0: plain sequence probabilities renormalised: e^-1 / (e^-1 + e^-2) = 0.73106
    assert step_priors([-1.0, -2.0], [3, 3], length_exponent=0.0) == pytest.approx([0.73106, 0.26894], abs=1e-5)


def test_priors_stable_and_length_floor():
    p = step_priors([-5000.0, -5001.0], [1, 1], length_exponent=1.25)
    assert p == pytest.approx([1 / (1 + math.e**-1), 1 / (1 + math.e)])
    # zero tokens count as one
    assert step_priors([-1.0, -1.0], [0, 1], length_exponent=1.25) == pytest.approx([0.5, 0.5])
    assert step_priors([], [], length_exponent=1.25) == []


def test_puct_hand_computed():
    # 0.5 + 1.0 * 0.25 * sqrt(16) / (1 + 3) = 0.75
    assert puct_score(0.5, 0.25, 16, 3, c_puct=1.0) == pytest.approx(0.75)
    # -0.2 + 2.0 * 0.5 * sqrt(9) / (1 + 0) = 2.8
    assert puct_score(-0.2, 0.5, 9, 0, c_puct=2.0) == pytest.approx(2.8)
    assert puct_score(0.3, 0.9, 0, 0, c_puct=1.0) == pytest.approx(0.3)


def hand_tree() -> Tree:
    tree = Tree(problem=Problem("p", "q", "1"))
    tree.root.visits = 9
    tree.add_child(ROOT, text="a", prior=0.6, visits=4, value_sum=1.2)   # Q 0.3
    tree.add_child(ROOT, text="b", prior=0.3, visits=4, value_sum=2.0)   # Q 0.5
    tree.add_child(ROOT, text="c", prior=0.1, visits=0, value_sum=0.0)   # unvisited
    return tree


def test_child_scores_and_fpu():
    tree = hand_tree()
    # a: 0.3 + 0.6*3/5 = 0.66; b: 0.5 + 0.3*3/5 = 0.68; c: fpu + 0.1*3/1 = fpu + 0.3
    assert child_scores(tree, ROOT, c_puct=1.0, fpu=0.0) == pytest.approx([0.66, 0.68, 0.3])
    assert select_child(tree, ROOT, c_puct=1.0, fpu=0.0) == 2
    assert select_child(tree, ROOT, c_puct=1.0, fpu=0.5) == 3  # c: 0.8
    assert select_child(tree, ROOT, c_puct=1.0, fpu=0.0, exclude={2}) == 1
    assert select_child(tree, ROOT, c_puct=1.0, fpu=0.0, exclude={1, 2, 3}) is None
    assert select_leaf(tree, ROOT, c_puct=1.0, fpu=0.5) == 3
    assert most_visited_child(tree, ROOT) == 2  # tie on visits: higher Q


def test_ties_go_to_lowest_id():
    tree = Tree(problem=Problem("p", "q", "1"))
    for _ in range(3):
        tree.add_child(ROOT, prior=1 / 3)
    assert select_child(tree, ROOT, c_puct=1.0, fpu=0.0) == 1


def test_merge_duplicates_sums_mass():
    texts = ["2+3 = 5", " 2+3  =  5 ", "2+3 = 6", "2+3 = 5\t"]
    merged = merge_duplicates(texts, [0.4, 0.1, 0.3, 0.2])
    assert merged == [(0, pytest.approx(0.7)), (2, pytest.approx(0.3))]
    assert normalize_step("  a \n b ") == "a b"
