"""Training data for a value model from searched trees (issue 18): per-node targets and sibling pairs.

A *validated terminal* is a node with `terminal` true and an `outcome` (+1 correct, -1 wrong); a
terminal whose outcome is null (no gold answer was used) counts for nothing here. For every node,
`terminal_counts` gives (correct, validated) over the validated terminals of its subtree, the node
itself included when it is one.

An *example* is a node (the partial solution ending there, `Tree.steps`) with a target in [0, 1]:

- "soft": correct / validated below the node: Math-Shepherd's soft estimation (Wang et al. 2024),
  with the tree's terminals as the completions;
- "hard": 1.0 when any validated terminal below the node is correct, else 0.0: Math-Shepherd's hard
  estimation;
- "q": the node's backed-up MCTS Q mapped from [-1, 1] to [0, 1], (Q + 1) / 2: AlphaMath's target
  (Chen et al. 2024).

A node becomes an example when at least `min_terminals` validated terminals lie below it (for "soft"
and "hard" at least one whatever `min_terminals` says, since their target is undefined without one;
for "q" also at least one visit, since an unvisited node's Q of 0 is a placeholder). The root (the
empty partial solution) is left out unless `include_root`.

A *pair* is two siblings (children of one node, the parent) that are both examples and whose targets
differ by at least `pair_margin` (and by more than zero): the higher one is chosen, the lower
rejected, as in rStar-Math's step-level preference pairs for its process preference model (Guan et
al. 2025). Per parent, the qualifying pairs are ranked by gap, largest first (ties: lower chosen id,
then lower rejected id) and the first `max_pairs_per_parent` are kept; the default 1 keeps the pair
of the best and the worst sibling. Pairs of one tree are in parent id order.

`value.jsonl` holds both kinds, one JSON object per line with `"kind": "example"` or `"kind":
"pair"` (docs/formats.md, "Value-model examples"). Pure Python: nothing here imports a model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from mcts.jsonl import iter_jsonl
from mcts.tree import NO_PARENT, ROOT, Node, Tree

TARGETS = ("soft", "hard", "q")

KINDS = ("example", "pair")

GAP_TOLERANCE = 1e-9
"""A pair's gap may fall short of `pair_margin` by this much (float error); a gap must exceed it."""

Counts = dict[int, tuple[int, int]]
"""node id -> (correct validated terminals, validated terminals) in its subtree, itself included."""


@dataclass(frozen=True)
class ValueDataConfig:
    """Which nodes become value-model examples, with which target, and which siblings become pairs."""

    target: str = "soft"  # soft: share correct, hard: any correct (Math-Shepherd's); q: (Q+1)/2 (AlphaMath's)
    min_terminals: int = 1  # validated terminals a node needs below it to be an example (ours)
    pair_margin: float = 0.5  # least target gap between chosen and rejected sibling (rStar-Math's step margin)
    max_pairs_per_parent: int = 1  # pairs kept per parent, largest gap first; 1 = best vs worst sibling; 0 = all
    include_root: bool = False  # also make the root (empty partial solution) an example (ours)
    max_examples_per_tree: int = 8  # a sample of this many, seeded by the problem id; 0: all (ours: CPU cost)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"value.target={self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.min_terminals < 0:
            raise ValueError(f"value.min_terminals={self.min_terminals}: must be >= 0")
        if not self.pair_margin >= 0:  # also rejects NaN
            raise ValueError(f"value.pair_margin={self.pair_margin}: must be >= 0")
        if self.max_pairs_per_parent < 0:
            raise ValueError(f"value.max_pairs_per_parent={self.max_pairs_per_parent}: must be >= 0 (0 = no cap)")
        if self.max_examples_per_tree < 0:
            raise ValueError(f"value.max_examples_per_tree={self.max_examples_per_tree}: must be >= 0 (0 = all)")


@dataclass(frozen=True)
class ValueExample:
    """One node as a value-model example.

    problem_id, node_id: where it comes from. steps: the step texts from the root (excluded) to the node
    (included), `Tree.steps`; () for the root. target: in [0, 1] (see the module docstring). correct,
    total: validated terminals below the node that are correct / all of them. depth: the node's depth
    (= len(steps)). question: the problem's question, so that a line is self-contained.
    """

    problem_id: str
    node_id: int
    steps: tuple[str, ...]
    target: float
    correct: int
    total: int
    depth: int
    question: str = ""


@dataclass(frozen=True)
class ValuePair:
    """Two sibling examples: the chosen one has the higher target.

    parent_id, prefix: the shared parent and its steps (`Tree.steps(parent_id)`); depth: the parent's
    depth (= len(prefix)). chosen_steps, rejected_steps: each side's whole partial solution, the prefix
    followed by that child's step. question: the problem's question.
    """

    problem_id: str
    parent_id: int
    prefix: tuple[str, ...]
    chosen_id: int
    chosen_steps: tuple[str, ...]
    chosen_target: float
    rejected_id: int
    rejected_steps: tuple[str, ...]
    rejected_target: float
    depth: int = 0
    question: str = ""

    @property
    def gap(self) -> float:
        return self.chosen_target - self.rejected_target


def is_validated_terminal(node: Node) -> bool:
    """A terminal whose answer was checked against the gold answer (outcome not null)."""
    return node.terminal and node.outcome is not None


def terminal_counts(tree: Tree) -> Counts:
    """(correct, validated) terminals in every node's subtree, the node itself included, in one pass
    over the nodes from the last id to the first (a parent's id is below its children's)."""
    correct = [0] * len(tree.nodes)
    total = [0] * len(tree.nodes)
    for node in reversed(tree.nodes):
        if is_validated_terminal(node):
            total[node.id] += 1
            correct[node.id] += node.outcome > 0
        if node.parent != NO_PARENT:
            if not node.parent < node.id:
                raise ValueError(f"tree {tree.problem.id!r}: node {node.id} has parent {node.parent} (not below it)")
            correct[node.parent] += correct[node.id]
            total[node.parent] += total[node.id]
    return {i: (correct[i], total[i]) for i in range(len(tree.nodes))}


def _target(node: Node, correct: int, total: int, config: ValueDataConfig) -> float | None:
    """The node's target, or None when it is not an example (too few validated terminals, unvisited)."""
    if total < config.min_terminals:
        return None
    if config.target == "q":
        if node.visits < 1:
            return None
        return min(1.0, max(0.0, (node.q + 1.0) / 2.0))
    if total < 1:
        return None
    if config.target == "hard":
        return 1.0 if correct > 0 else 0.0
    return correct / total


def _examples_by_id(tree: Tree, config: ValueDataConfig, counts: Counts) -> dict[int, ValueExample]:
    """Every node that qualifies as an example (the root included), by id."""
    out = {}
    for node in tree.nodes:
        correct, total = counts[node.id]
        target = _target(node, correct, total, config)
        if target is None:
            continue
        out[node.id] = ValueExample(problem_id=tree.problem.id, node_id=node.id, steps=tree.steps(node.id),
                                    target=target, correct=correct, total=total, depth=node.depth,
                                    question=tree.problem.question)
    return out


def value_examples(tree: Tree, config: ValueDataConfig = ValueDataConfig()) -> list[ValueExample]:
    """The tree's value-model examples, in node id order (the root only with `include_root`)."""
    examples = _examples_by_id(tree, config, terminal_counts(tree))
    kept = [e for i, e in sorted(examples.items()) if config.include_root or i != ROOT]
    if config.max_examples_per_tree and len(kept) > config.max_examples_per_tree:
        chosen = random.Random(tree.problem.id).sample(range(len(kept)), config.max_examples_per_tree)
        kept = [kept[i] for i in sorted(chosen)]
    return kept


def _parent_pairs(tree: Tree, parent: Node, examples: dict[int, ValueExample],
                  config: ValueDataConfig) -> list[ValuePair]:
    kids = [examples[c] for c in parent.children if c in examples]
    candidates = []
    for i, a in enumerate(kids):
        for b in kids[i + 1:]:
            chosen, rejected = (a, b) if a.target >= b.target else (b, a)
            gap = chosen.target - rejected.target
            if gap > GAP_TOLERANCE and gap >= config.pair_margin - GAP_TOLERANCE:
                candidates.append((chosen, rejected))
    candidates.sort(key=lambda p: (-(p[0].target - p[1].target), p[0].node_id, p[1].node_id))
    if config.max_pairs_per_parent:
        candidates = candidates[:config.max_pairs_per_parent]
    prefix = tree.steps(parent.id)
    return [ValuePair(problem_id=tree.problem.id, parent_id=parent.id, prefix=prefix, chosen_id=c.node_id,
                      chosen_steps=c.steps, chosen_target=c.target, rejected_id=r.node_id, rejected_steps=r.steps,
                      rejected_target=r.target, depth=parent.depth, question=tree.problem.question)
            for c, r in candidates]


def value_pairs(tree: Tree, config: ValueDataConfig = ValueDataConfig()) -> list[ValuePair]:
    """Sibling pairs (see the module docstring), in parent id order, largest gap first within a parent.
    The root can be a parent whatever `include_root` says (its children are ordinary examples)."""
    examples = _examples_by_id(tree, config, terminal_counts(tree))
    pairs: list[ValuePair] = []
    for node in tree.nodes:
        if len(node.children) >= 2:
            pairs.extend(_parent_pairs(tree, node, examples, config))
    return pairs


def examples_from_trees(trees: Iterable[Tree],
                        config: ValueDataConfig = ValueDataConfig()) -> tuple[list[ValueExample], list[ValuePair]]:
    """All trees' examples and pairs, tree by tree in the given order."""
    examples: list[ValueExample] = []
    pairs: list[ValuePair] = []
    for tree in trees:
        examples.extend(value_examples(tree, config))
        pairs.extend(value_pairs(tree, config))
    return examples, pairs


def summary(examples: Sequence[ValueExample], pairs: Sequence[ValuePair]) -> dict[str, float | int]:
    """Figures for logging: counts (examples, pairs, problems with an example or a pair), the mean
    target and depth of the examples, the share of examples whose target is exactly 0 or 1
    (`extreme_share`), the mean validated terminals per example, and the pairs' mean gap. The means
    are left out when there is nothing to average."""
    out: dict[str, float | int] = {
        "examples": len(examples), "pairs": len(pairs),
        "problems": len({e.problem_id for e in examples} | {p.problem_id for p in pairs}),
    }
    n = len(examples)
    if n:
        out["mean_target"] = sum(e.target for e in examples) / n
        out["extreme_share"] = sum(e.target in (0.0, 1.0) for e in examples) / n
        out["mean_depth"] = sum(e.depth for e in examples) / n
        out["mean_terminals"] = sum(e.total for e in examples) / n
    if pairs:
        out["mean_gap"] = sum(p.gap for p in pairs) / len(pairs)
    return out


# --- JSON -------------------------------------------------------------------------------------------

def example_to_json(example: ValueExample) -> dict[str, Any]:
    """One line of value.jsonl for an example."""
    return {"kind": "example", "problem_id": example.problem_id, "node_id": example.node_id,
            "depth": example.depth, "question": example.question, "steps": list(example.steps),
            "target": example.target, "correct": example.correct, "total": example.total}


def pair_to_json(pair: ValuePair) -> dict[str, Any]:
    """One line of value.jsonl for a pair (`gap` is written for readers, recomputed on load)."""
    return {"kind": "pair", "problem_id": pair.problem_id, "parent_id": pair.parent_id, "depth": pair.depth,
            "question": pair.question, "prefix": list(pair.prefix),
            "chosen_id": pair.chosen_id, "chosen_steps": list(pair.chosen_steps), "chosen_target": pair.chosen_target,
            "rejected_id": pair.rejected_id, "rejected_steps": list(pair.rejected_steps),
            "rejected_target": pair.rejected_target, "gap": pair.gap}


def example_from_json(d: dict[str, Any]) -> ValueExample:
    """Inverse of `example_to_json` (KeyError/TypeError/ValueError on a malformed row)."""
    return ValueExample(problem_id=str(d["problem_id"]), node_id=int(d["node_id"]),
                        steps=tuple(str(s) for s in d["steps"]), target=float(d["target"]),
                        correct=int(d["correct"]), total=int(d["total"]), depth=int(d["depth"]),
                        question=str(d.get("question", "")))


def pair_from_json(d: dict[str, Any]) -> ValuePair:
    """Inverse of `pair_to_json` (KeyError/TypeError/ValueError on a malformed row)."""
    return ValuePair(problem_id=str(d["problem_id"]), parent_id=int(d["parent_id"]),
                     prefix=tuple(str(s) for s in d["prefix"]), chosen_id=int(d["chosen_id"]),
                     chosen_steps=tuple(str(s) for s in d["chosen_steps"]), chosen_target=float(d["chosen_target"]),
                     rejected_id=int(d["rejected_id"]), rejected_steps=tuple(str(s) for s in d["rejected_steps"]),
                     rejected_target=float(d["rejected_target"]), depth=int(d["depth"]),
                     question=str(d.get("question", "")))


def _from_row(row: dict[str, Any], where: str) -> ValueExample | ValuePair:
    """One value.jsonl row as an example or a pair; a malformed row (another kind, a missing key, a value of
    the wrong type) raises ValueError naming `where` (the file and line, or the row's position)."""
    kind = row.get("kind")
    try:
        if kind == "example":
            return example_from_json(row)
        if kind == "pair":
            return pair_from_json(row)
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: malformed value line: {exc!r}") from exc


def _split(located: Iterable[tuple[str, dict[str, Any]]]) -> tuple[list[ValueExample], list[ValuePair]]:
    """(examples, pairs) from (where, row) items, each kind in the rows' order."""
    examples: list[ValueExample] = []
    pairs: list[ValuePair] = []
    for where, row in located:
        item = _from_row(row, where)
        (examples if isinstance(item, ValueExample) else pairs).append(item)
    return examples, pairs


def examples_from_json(rows: Iterable[dict[str, Any]]) -> tuple[list[ValueExample], list[ValuePair]]:
    """Split value.jsonl rows into (examples, pairs), each in file order; a malformed row raises ValueError
    naming its position (0-based)."""
    return _split((f"value row {index}", row) for index, row in enumerate(rows))


def read_value_data(path: str | Path) -> tuple[list[ValueExample], list[ValuePair]]:
    """Read value.jsonl into (examples, pairs); a malformed line raises ValueError naming file and line."""
    return _split((f"{path}:{number}", row) for number, row in iter_jsonl(path))


def value_rows(examples: Iterable[ValueExample], pairs: Iterable[ValuePair]) -> list[dict[str, Any]]:
    """The lines of a value.jsonl as dicts (the examples, then the pairs), for an atomic JSONL writer
    (the loop's is harness/rundir.write_jsonl_atomic)."""
    return [example_to_json(e) for e in examples] + [pair_to_json(p) for p in pairs]
