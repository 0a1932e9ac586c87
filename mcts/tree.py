"""Search trees: nodes with ids, parent links, visit counts and values; JSON in and out.

A tree is a flat list of nodes indexed by id (`tree.nodes[i].id == i`); the root is node `ROOT` (0)
with parent `NO_PARENT` (-1), depth 0 and empty text. A node is one reasoning step; the partial
solution at a node is the texts of the nodes on the path from the root (excluded) to it.

On disk a tree is one JSON line (see `Tree.to_json`); `children` is not stored but derived from the
parent links on load; `q` is stored for readers but recomputed from `value_sum / visits`.
`write_trees`/`read_trees` handle files of such lines; `read_trees` drops a half-written last line
(a crash while appending) with a warning, which is how a search resumes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from mcts.jsonl import iter_jsonl
from mcts.types import Problem

log = logging.getLogger(__name__)

ROOT = 0
NO_PARENT = -1

COMPUTE_KEYS = ("generated_tokens", "prompt_tokens", "cached_tokens", "expansions", "evaluations", "tool_calls")
"""Per-tree compute counters: generated/prompt/cached tokens as reported by the engine calls made for
this tree, the number of expansions (ExpandRequests), of self-evaluations (EvalRequests) and of programs
run by tool steps."""


@dataclass
class Node:
    """One reasoning step.

    id: index in `Tree.nodes`; parent: the parent's id (NO_PARENT for the root); depth: steps from the root.
    text: the step text (without the stop string); "" at the root.
    num_tokens, logprob: generated tokens and summed log-probability of the step as sampled.
    prior: the policy prior among siblings (length-normalised probability, sums to 1 over siblings).
    self_eval: the policy's self-evaluation score in [0, 1] of the partial solution ending here (None if
        not evaluated, e.g. the root or with self-evaluation off).
    outcome: +1 (correct) / -1 (wrong) at a terminal when the gold answer was used, else None.
    visits, value_sum: backed-up statistics; q = value_sum / visits (0.0 when unvisited).
    terminal: the solution ends here (an answer was stated, generation finished, or the depth limit).
    answer: the final answer extracted from this step's text (None if there is none).
    tool_calls: the programs this step ran (tool-integrated steps), each a dict with the fields of
        `mcts.types.ToolCall`: code, output, ok, seconds, error; empty for a plain step.
    children: ids of the children (derived from parent links; not stored in JSON).
    """

    id: int
    parent: int
    depth: int
    text: str = ""
    num_tokens: int = 0
    logprob: float = 0.0
    prior: float = 1.0
    self_eval: float | None = None
    outcome: float | None = None
    visits: int = 0
    value_sum: float = 0.0
    terminal: bool = False
    answer: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    children: list[int] = field(default_factory=list)

    @property
    def q(self) -> float:
        """Mean backed-up value: value_sum / visits, 0.0 when unvisited."""
        return self.value_sum / self.visits if self.visits else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "parent": self.parent, "depth": self.depth, "text": self.text,
                "num_tokens": self.num_tokens, "logprob": self.logprob, "prior": self.prior,
                "self_eval": self.self_eval, "outcome": self.outcome, "visits": self.visits, "q": self.q,
                "value_sum": self.value_sum, "terminal": self.terminal, "answer": self.answer,
                "tool_calls": [dict(c) for c in self.tool_calls]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Node:
        return cls(id=int(d["id"]), parent=int(d["parent"]), depth=int(d["depth"]), text=d.get("text", ""),
                   num_tokens=int(d.get("num_tokens", 0)), logprob=float(d.get("logprob", 0.0)),
                   prior=float(d.get("prior", 1.0)), self_eval=d.get("self_eval"), outcome=d.get("outcome"),
                   visits=int(d.get("visits", 0)), value_sum=float(d.get("value_sum", 0.0)),
                   terminal=bool(d.get("terminal", False)), answer=d.get("answer"),
                   tool_calls=[dict(c) for c in d.get("tool_calls") or []])


def empty_compute() -> dict[str, int]:
    """A fresh compute ledger for one tree (all COMPUTE_KEYS at 0)."""
    return {key: 0 for key in COMPUTE_KEYS}


@dataclass
class Tree:
    """One problem's search tree.

    problem: the problem searched. nodes: all nodes, `nodes[i].id == i`, nodes[ROOT] is the root.
    compute: counters (COMPUTE_KEYS) of what growing this tree cost.
    meta: free-form JSON-able facts (seed, config summary, simulations run, committed path, ...).
    """

    problem: Problem
    nodes: list[Node] = field(default_factory=lambda: [Node(id=ROOT, parent=NO_PARENT, depth=0)])
    compute: dict[str, int] = field(default_factory=empty_compute)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Node:
        return self.nodes[ROOT]

    def add_child(self, parent: int, **fields: Any) -> Node:
        """Append a new node under `parent` (depth = parent depth + 1) and return it."""
        node = Node(id=len(self.nodes), parent=parent, depth=self.nodes[parent].depth + 1, **fields)
        self.nodes.append(node)
        self.nodes[parent].children.append(node.id)
        return node

    def path(self, node_id: int) -> list[int]:
        """Node ids from the root to `node_id`, both included."""
        ids = []
        while node_id != NO_PARENT:
            ids.append(node_id)
            node_id = self.nodes[node_id].parent
        return ids[::-1]

    def steps(self, node_id: int) -> tuple[str, ...]:
        """The step texts from the root (excluded) to `node_id` (included): the partial solution."""
        return tuple(self.nodes[i].text for i in self.path(node_id)[1:])

    def terminals(self) -> list[Node]:
        """All terminal nodes, in id order."""
        return [n for n in self.nodes if n.terminal]

    def solved(self) -> bool:
        """Whether some terminal was verified correct (outcome > 0)."""
        return any(n.outcome is not None and n.outcome > 0 for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        """The tree as one JSON-able dict (one line of trees.jsonl)."""
        return {"problem_id": self.problem.id, "question": self.problem.question, "answer": self.problem.answer,
                "solution": self.problem.solution, "nodes": [n.to_json() for n in self.nodes],
                "compute": dict(self.compute), "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Tree:
        """Inverse of `to_json`; children are rebuilt from parent links (in id order)."""
        problem = Problem(id=d["problem_id"], question=d["question"], answer=d["answer"], solution=d.get("solution"))
        nodes = [Node.from_json(n) for n in d["nodes"]]
        for i, node in enumerate(nodes):
            if node.id != i:
                raise ValueError(f"tree {problem.id!r}: node at position {i} has id {node.id}")
            if node.parent != NO_PARENT:
                if not 0 <= node.parent < i:
                    raise ValueError(f"tree {problem.id!r}: node {i} has bad parent {node.parent}")
                nodes[node.parent].children.append(i)
        if not nodes:  # a node 0 with a parent other than NO_PARENT failed the check above
            raise ValueError(f"tree {problem.id!r}: no root")
        compute = empty_compute()
        compute.update({k: int(v) for k, v in d.get("compute", {}).items()})
        return cls(problem=problem, nodes=nodes, compute=compute, meta=dict(d.get("meta", {})))


def dumps_tree(tree: Tree) -> str:
    """One line (without the newline) of a trees file."""
    return json.dumps(tree.to_json(), ensure_ascii=False)


def write_trees(path: str | Path, trees: Iterable[Tree], *, append: bool = False) -> int:
    """Write `trees` one JSON line each (appending if `append`); returns how many were written."""
    count = 0
    with Path(path).open("a" if append else "w", encoding="utf-8") as out:
        for tree in trees:
            out.write(dumps_tree(tree) + "\n")
            out.flush()
            count += 1
    return count


def iter_trees(path: str | Path) -> Iterator[Tree]:
    """Trees from a JSON-lines file, one at a time (blank lines skipped).

    A last line that does not parse (half-written by a crash) is dropped with a warning; a bad line
    anywhere else raises ValueError naming the file and the line number."""
    for number, row in iter_jsonl(path, partial_last=True):
        try:
            tree = Tree.from_json(row)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: malformed tree line: {exc}") from exc
        yield tree


def read_trees(path: str | Path) -> list[Tree]:
    """All trees of a JSON-lines file (see `iter_trees` for the half-written last line)."""
    return list(iter_trees(path))
