"""Tree data model: paths, steps, JSON round trip, trees files (half-written last line, bad lines)."""

from __future__ import annotations

import json
import logging

import pytest

from mcts.tree import NO_PARENT, ROOT, Tree, read_trees, write_trees
from mcts.types import Problem


def small_tree(pid: str = "p0") -> Tree:
    tree = Tree(problem=Problem(pid, "What is 2+3?", "5", solution="2+3=5"), meta={"seed": 1})
    a = tree.add_child(ROOT, text="2+3 = 5", num_tokens=4, logprob=-1.25, prior=0.7, self_eval=0.9, visits=2,
                       value_sum=1.5)
    tree.add_child(ROOT, text="2+3 = 6 <&>", num_tokens=4, logprob=-3.0, prior=0.3, self_eval=0.2, visits=1,
                   value_sum=-0.6, terminal=True, answer="6", outcome=-1.0)
    tree.add_child(a.id, text="The answer is 5 ✓", num_tokens=5, logprob=-0.1, prior=1.0, self_eval=0.95,
                   visits=1, value_sum=1.0 / 3.0, terminal=True, answer="5", outcome=1.0)
    tree.root.visits, tree.root.value_sum = 3, 0.9
    tree.compute.update(generated_tokens=13, prompt_tokens=40, expansions=2, evaluations=3)
    return tree


def test_root_path_steps_terminals():
    tree = small_tree()
    assert tree.root.id == ROOT and tree.root.parent == NO_PARENT and tree.root.depth == 0 and tree.root.text == ""
    assert tree.path(3) == [0, 1, 3]
    assert tree.steps(3) == ("2+3 = 5", "The answer is 5 ✓")
    assert tree.steps(ROOT) == ()
    assert [n.id for n in tree.terminals()] == [2, 3]
    assert tree.nodes[3].depth == 2
    assert tree.nodes[1].q == pytest.approx(0.75)
    assert tree.nodes[0].children == [1, 2]


def test_unvisited_q_is_zero():
    tree = Tree(problem=Problem("x", "q", "a"))
    assert tree.root.q == 0.0


def test_json_round_trip_exact():
    tree = small_tree()
    d = tree.to_json()
    assert set(d) == {"problem_id", "question", "answer", "solution", "nodes", "compute", "meta"}
    assert list(d["nodes"][0]) == ["id", "parent", "depth", "text", "num_tokens", "logprob", "prior", "self_eval",
                                   "outcome", "visits", "q", "value_sum", "terminal", "answer", "tool_calls"]
    back = Tree.from_json(json.loads(json.dumps(d)))
    assert back.to_json() == d
    assert back == tree  # dataclass equality, children included


def test_write_read_trees(tmp_path):
    path = tmp_path / "trees.jsonl"
    trees = [small_tree(f"p{i}") for i in range(3)]
    assert write_trees(path, trees) == 3
    assert [t.to_json() for t in read_trees(path)] == [t.to_json() for t in trees]


def test_half_written_last_line_is_dropped(tmp_path, caplog):
    path = tmp_path / "trees.jsonl"
    write_trees(path, [small_tree("a"), small_tree("b")])
    line = json.dumps(small_tree("c").to_json())
    with path.open("a") as f:
        f.write(line[: len(line) // 2])
    with caplog.at_level(logging.WARNING, logger="mcts.tree"):
        trees = read_trees(path)
    assert [t.problem.id for t in trees] == ["a", "b"]
    assert "half-written" in caplog.text


def test_malformed_middle_line_raises(tmp_path):
    path = tmp_path / "trees.jsonl"
    write_trees(path, [small_tree("a")])
    with path.open("a") as f:
        f.write("{not json\n")
    write_trees(path, [small_tree("b")], append=True)
    with pytest.raises(ValueError, match=r"trees.jsonl:2"):
        read_trees(path)


def test_malformed_tree_structure_is_named():
    d = small_tree().to_json()
    root, first = d["nodes"][:2]
    for nodes, message in [([], "no root"), ([{**root, "parent": 2}, first], "node 0 has bad parent 2"),
                           ([root, {**first, "id": 5}], "position 1 has id 5"),
                           ([root, {**first, "parent": 1}], "node 1 has bad parent 1")]:
        with pytest.raises(ValueError, match=message):
            Tree.from_json({**d, "nodes": nodes})
