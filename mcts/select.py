"""Selection and priors: pure functions of node statistics.

Definitions (the constants come from `SearchConfig`, see conf/search/default.yaml for sources):

- prior: among the k samples of one expansion, p_i ∝ exp(logprob_i / L_i ** lam), L_i = max(1, tokens_i);
  computed stably (subtract the max exponent); duplicates share one node whose prior is their summed mass.
- PUCT score of a child: Q(child) + c * prior * sqrt(N_parent) / (1 + N_child), with Q(child) = `fpu`
  (first-play value) when the child is unvisited.
- Selection picks the highest score; ties go to the earliest child (lowest id), so search is deterministic.
"""

from __future__ import annotations

import math
from typing import Collection, Sequence

from mcts.tree import Node, Tree

MIN_LENGTH = 1
"""Length floor for the prior's normalisation (an empty step counts as one token)."""


def normalize_step(text: str) -> str:
    """The key under which sibling steps are merged: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def length_normalized_scores(logprobs: Sequence[float], num_tokens: Sequence[int], *,
                             length_exponent: float) -> list[float]:
    """logprob_i / max(1, L_i) ** length_exponent for each sample (the log of its unnormalised prior)."""
    return [lp / max(MIN_LENGTH, n) ** length_exponent for lp, n in zip(logprobs, num_tokens)]


def softmax(scores: Sequence[float]) -> list[float]:
    """exp(s_i - max s) / sum_j exp(s_j - max s); [] for []."""
    if not scores:
        return []
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def step_priors(logprobs: Sequence[float], num_tokens: Sequence[int], *, length_exponent: float) -> list[float]:
    """Priors of sibling samples: p_i ∝ exp(logprob_i / max(1, L_i) ** length_exponent), summing to 1."""
    return softmax(length_normalized_scores(logprobs, num_tokens, length_exponent=length_exponent))


def merge_duplicates(texts: Sequence[str], priors: Sequence[float]) -> list[tuple[int, float]]:
    """Group samples whose `normalize_step` texts are equal.

    Returns (index of the first sample of the group, summed prior of the group), in first-seen order."""
    first: dict[str, int] = {}
    mass: dict[str, float] = {}
    for i, (text, p) in enumerate(zip(texts, priors)):
        key = normalize_step(text)
        if key not in first:
            first[key] = i
            mass[key] = 0.0
        mass[key] += p
    return [(first[key], mass[key]) for key in first]


def puct_score(q: float, prior: float, parent_visits: int, child_visits: int, *, c_puct: float) -> float:
    """Q + c * prior * sqrt(N_parent) / (1 + N_child)."""
    return q + c_puct * prior * math.sqrt(parent_visits) / (1 + child_visits)


def child_q(child: Node, *, fpu: float) -> float:
    """The child's Q, or the first-play value `fpu` when it has no visits."""
    return child.q if child.visits > 0 else fpu


def child_scores(tree: Tree, node_id: int, *, c_puct: float, fpu: float) -> list[float]:
    """PUCT scores of `node_id`'s children, in `children` order."""
    parent = tree.nodes[node_id]
    return [puct_score(child_q(tree.nodes[c], fpu=fpu), tree.nodes[c].prior, parent.visits, tree.nodes[c].visits,
                       c_puct=c_puct) for c in parent.children]


def select_child(tree: Tree, node_id: int, *, c_puct: float, fpu: float,
                 exclude: Collection[int] = ()) -> int | None:
    """The child of `node_id` with the highest PUCT score (ties: lowest id), skipping `exclude`;
    None when every child is excluded (or there are none)."""
    best, best_score = None, -math.inf
    for child, score in zip(tree.nodes[node_id].children, child_scores(tree, node_id, c_puct=c_puct, fpu=fpu)):
        if child not in exclude and score > best_score:
            best, best_score = child, score
    return best


def select_leaf(tree: Tree, start: int, *, c_puct: float, fpu: float, exclude: Collection[int] = ()) -> int | None:
    """Descend from `start` by `select_child` until a node without children (a leaf: terminal or expandable).

    Nodes in `exclude` are never entered (used for leaves already pending in this wave); returns None when
    `start` itself is excluded or a node on the way has every child excluded."""
    if start in exclude:
        return None
    node = start
    while tree.nodes[node].children:
        nxt = select_child(tree, node, c_puct=c_puct, fpu=fpu, exclude=exclude)
        if nxt is None:
            return None
        node = nxt
    return node


def most_visited_child(tree: Tree, node_id: int) -> int | None:
    """The child with the most visits (ties: higher Q, then lowest id); None for a leaf."""
    children = tree.nodes[node_id].children
    if not children:
        return None
    return max(children, key=lambda c: (tree.nodes[c].visits, tree.nodes[c].q, -c))


def expandable_leaves(tree: Tree, start: int = 0) -> list[int]:
    """Non-terminal nodes without children in the subtree of `start` (the nodes a simulation could expand)."""
    out, stack = [], [start]
    while stack:
        node = tree.nodes[stack.pop()]
        if node.children:
            stack.extend(reversed(node.children))
        elif not node.terminal:
            out.append(node.id)
    return out


def is_resolved(tree: Tree, start: int = 0) -> bool:
    """True when every path below `start` ends in a terminal (no expandable leaf is left)."""
    return not expandable_leaves(tree, start)
