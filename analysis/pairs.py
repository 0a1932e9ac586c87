"""Pair quality: how a round's pairs agree with the trees' verified outcomes, what MCTS-DPO's Q-ranked
rule would take from the same trees (the project's own extraction, mcts.pairs.extract_pairs), whether
its chosen steps beat chance, and where pairs branch and how long their sides are.

A chosen step is good when it lies on a path to a correct answer (it or a descendant is a terminal
with outcome +1, mcts.pairs.outcome_reach), a rejected step is good when it does not.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from analysis.groups import canonical
from mcts.pairs import PairsConfig, extract_pairs, outcome_reach
from mcts.tree import Node, Tree


@dataclass(frozen=True)
class PairQuality:
    """How well a round's pairs agree with the trees' verified outcomes.

    pairs: pairs matched to their tree nodes; unmatched: pairs whose tree or nodes were not found.
    chosen_good: chosen steps on a path to a correct answer; rejected_good: rejected steps on none;
    both_good: pairs with both.
    """

    pairs: int
    unmatched: int
    chosen_good: int
    rejected_good: int
    both_good: int

    def share(self, count: int) -> float | None:
        return count / self.pairs if self.pairs else None

    @property
    def chosen_share(self) -> float | None:
        return self.share(self.chosen_good)

    @property
    def rejected_share(self) -> float | None:
        return self.share(self.rejected_good)

    @property
    def both_share(self) -> float | None:
        return self.share(self.both_good)


@dataclass(frozen=True)
class RankingCheck:
    """Whether a rule's chosen steps beat chance where the outcomes could tell (Q-ranked pairs).

    pairs: pairs checked; informed: pairs at a node with at least one child on a path to a correct
    answer (elsewhere every child is wrong and the ranking has nothing to find); informed_chosen_good:
    of those, pairs whose chosen child is on such a path; informed_random: of those, the expected
    count for a chosen child picked uniformly among the node's children.
    """

    pairs: int
    informed: int
    informed_chosen_good: int
    informed_random: float

    @property
    def informed_share(self) -> float | None:
        return self.informed / self.pairs if self.pairs else None

    @property
    def informed_chosen_share(self) -> float | None:
        return self.informed_chosen_good / self.informed if self.informed else None

    @property
    def informed_random_share(self) -> float | None:
        return self.informed_random / self.informed if self.informed else None


@dataclass(frozen=True)
class PairShape:
    """Where a round's pairs branch and how long their two sides are.

    mean_depth: steps in the shared prefix (0 = the prompt is the question alone); root_share: pairs
    with depth 0; chosen_steps / rejected_steps: mean steps (non-empty lines split on the step
    separator) of the chosen / rejected side. A source whose chosen side is longer teaches longer
    answers, whatever is right in it."""

    pairs: int
    mean_depth: float
    root_share: float
    chosen_steps: float
    rejected_steps: float


def count_steps(text: str, separator: str = "\n") -> int:
    return sum(1 for part in text.split(separator) if part.strip()) if separator else int(bool(text.strip()))


def pair_shape(pairs: Sequence[Mapping[str, Any]], separator: str = "\n") -> PairShape | None:
    """The shape of a set of pairs (None without pairs); a pair without `depth` counts as depth 0."""
    if not pairs:
        return None
    n = len(pairs)
    depths = [int(p.get("depth") or 0) for p in pairs]
    return PairShape(pairs=n, mean_depth=sum(depths) / n, root_share=sum(d == 0 for d in depths) / n,
                     chosen_steps=sum(count_steps(str(p["chosen"]), separator) for p in pairs) / n,
                     rejected_steps=sum(count_steps(str(p["rejected"]), separator) for p in pairs) / n)


def correct_nodes(tree: Tree) -> set[int]:
    """Ids of the nodes that are, or have below them, a terminal validated correct (outcome > 0)."""
    return {node_id for node_id, (good, _) in outcome_reach(tree).items() if good}


def match_child(tree: Tree, parent_id: int, text: str, q: float | None, visits: int | None) -> Node | None:
    """The child of `parent_id` that a pair side starts with (the side is the step text plus a separator,
    or a whole continuation); among equal texts, the one whose Q and visits the pair recorded."""
    if not 0 <= parent_id < len(tree.nodes):
        return None
    kids = [tree.nodes[c] for c in tree.nodes[parent_id].children]
    found = [n for n in kids if n.text and text.startswith(n.text) or n.text.strip() == text.strip()]
    if not found:
        return None

    def distance(n: Node) -> tuple:
        same_q = q is not None and math.isclose(n.q, float(q), rel_tol=1e-9, abs_tol=1e-12)
        return (not same_q, abs(n.visits - int(visits)) if visits is not None else 0, -len(n.text), n.id)

    return min(found, key=distance)


def pair_side(tree: Tree, pair: Mapping[str, Any], side: str) -> Node | None:
    """The child a pair side names: by `<side>_id` when the record has it (mcts/pairs.py writes it) and it
    is a child of `node_id`, else by text among the children of `node_id` (sampling pairs, older files)."""
    parent = int(pair["node_id"])
    node_id = pair.get(f"{side}_id")
    if isinstance(node_id, int) and 0 <= node_id < len(tree.nodes) and tree.nodes[node_id].parent == parent:
        return tree.nodes[node_id]
    return match_child(tree, parent, pair[side], pair.get(f"{side}_q"), pair.get(f"{side}_visits"))


def _tree_index(
    trees: Iterable[Tree], good: dict[str, set[int]] | None
) -> tuple[dict[str, Tree], Callable[[Tree], set[int]]]:
    """Trees by problem id, and a lookup of each tree's correct_nodes computed once (kept in `good`, which
    a caller passes to share it between checks of the same trees)."""
    cache = {} if good is None else good

    def good_of(tree: Tree) -> set[int]:
        if tree.problem.id not in cache:
            cache[tree.problem.id] = correct_nodes(tree)
        return cache[tree.problem.id]

    return {t.problem.id: t for t in trees}, good_of


def pair_quality(trees: Iterable[Tree], pairs: Iterable[Mapping[str, Any]],
                 good: dict[str, set[int]] | None = None) -> PairQuality:
    """Pair quality of one round (see PairQuality). A pair names its tree (`problem_id`), the node whose
    children it compares (`node_id`) and the two children (`chosen_id`, `rejected_id`; without them,
    matched by text, ties broken by the recorded Q and visits)."""
    by_id, good_of = _tree_index(trees, good)
    matched = unmatched = chosen_good = rejected_good = both = 0
    for pair in pairs:
        tree = by_id.get(pair.get("problem_id"))
        if tree is None or "node_id" not in pair:
            unmatched += 1
            continue
        chosen, rejected = pair_side(tree, pair, "chosen"), pair_side(tree, pair, "rejected")
        if chosen is None or rejected is None:
            unmatched += 1
            continue
        good_nodes = good_of(tree)
        c_ok, r_ok = chosen.id in good_nodes, rejected.id not in good_nodes
        matched += 1
        chosen_good += c_ok
        rejected_good += r_ok
        both += c_ok and r_ok
    return PairQuality(matched, unmatched, chosen_good, rejected_good, both)


def ranking_check(trees: Iterable[Tree], pairs: Iterable[Mapping[str, Any]],
                  good: dict[str, set[int]] | None = None) -> RankingCheck:
    """RankingCheck of pairs that carry `node_id` and `chosen_id` (as extract_pairs writes them);
    `good` as in pair_quality."""
    by_id, good_of = _tree_index(trees, good)
    n = informed = chosen_good = 0
    random_good = 0.0
    for pair in pairs:
        tree = by_id.get(pair.get("problem_id"))
        if tree is None:
            continue
        good_nodes = good_of(tree)
        kids = tree.nodes[int(pair["node_id"])].children
        n += 1
        share = sum(c in good_nodes for c in kids) / len(kids) if kids else 0.0
        if share > 0:
            informed += 1
            chosen_good += pair.get("chosen_id") in good_nodes
            random_good += share
    return RankingCheck(n, informed, chosen_good, random_good)


def pairs_digest(pairs: Iterable[Mapping[str, Any]]) -> str:
    """A short hash of the pairs' (prompt, chosen, rejected) in file order: equal digests = same pairs."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(canonical([p.get("prompt"), p.get("chosen"), p.get("rejected")]).encode())
    return h.hexdigest()[:12]


Q_RANKED = PairsConfig(verified=False, full=False)
"""MCTS-DPO's rule (mcts/pairs.py): the highest- against the lowest-Q child, one step each, with a Q
margin; `q_ranked_pairs` gives it the run's margin and min_visits."""
Q_RANKED_KEYS = (("margin", float), ("min_visits", int))


def q_ranked_pairs(trees: Iterable[Tree], config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pairs MCTS-DPO's own extraction (mcts.pairs.extract_pairs with `Q_RANKED`) would take from
    these trees, with the run's `pairs.margin` and `pairs.min_visits` (PairsConfig's defaults where the
    flat `config` has none): their quality says how far the search's values (self-evaluation +
    outcomes) can be trusted, which the run's own verified pairs cannot (their quality is 100% by
    construction). The run's other pair options (verified, full, max_pairs_per_tree, max_depth, ...)
    decide its own pairs, not this rule, and are not applied."""
    cfg = replace(Q_RANKED, **{k: cast(config[f"pairs.{k}"]) for k, cast in Q_RANKED_KEYS if f"pairs.{k}" in config})
    return [p for t in trees for p in extract_pairs(t, config=cfg, format_prompt=lambda problem, steps: "")]
