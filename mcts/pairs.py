"""Step-level preference pairs from search trees (MCTS-DPO, Xie et al. 2024).

At every expanded node with at least two evaluated children, the child with the highest Q is
*chosen* and the one with the lowest Q *rejected*; the pair is kept when the Q gap is at least
`margin` and both children have at least `min_visits`. The prompt is the chat-formatted question
plus the shared prefix of steps (a callable from the policy side formats it, so this module stays
free of tokenizers); chosen and rejected are the two steps' text, each followed by the step
separator so the trained policy still ends a step where the search's stop string expects it.

A pair is one dict in TRL's column names (`prompt`, `chosen`, `rejected`) plus metadata: problem id,
node id, depth (steps in the shared prefix), Q and visits of each side, the gap, whether each side
ends the solution, the round, the source, and the programs run by the branching step of each side
(`chosen_programs`, `rejected_programs`: tool-integrated steps, 0 without tools; a pair branches at a
code step when either is positive). `pairs.jsonl` holds one per line.

Options: only pairs branching at most `max_depth` steps deep (0 = at the root); every qualifying
rejected sibling paired with the chosen child (`all_rejected`), not only
the lowest; at most `max_pairs_per_tree` pairs per tree (largest gaps first); only trees that reached a
correct answer (`correct_only`); only "verified" pairs, whose chosen step leads (somewhere in the
tree) to an answer validated correct and whose rejected step leads only to answers validated wrong;
"full" pairs whose chosen and rejected continue to a terminal node
(the chosen side along the highest-Q children, the rejected side along the lowest); duplicate pairs
(same prompt, chosen and rejected) dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mcts.jsonl import iter_jsonl
from mcts.sampling import SOURCE as SAMPLING_SOURCE
from mcts.sampling import outcome_pairs
from mcts.tree import Node, Tree
from mcts.types import Problem

SOURCES = ("mcts", "sampling")

REQUIRED_KEYS = ("prompt", "chosen", "rejected", "chosen_visits", "rejected_visits")

FormatPrompt = Callable[[Problem, tuple[str, ...]], str]


@dataclass(frozen=True)
class PairsConfig:
    """The `pairs` config group (conf/pairs/mcts.yaml: step-level pairs; conf/pairs/sampling.yaml: the demo's).

    source: "mcts" (step-level pairs from search trees) or "sampling" (the outcome-only baseline:
        `samples` whole solutions per problem, correct paired with wrong; see mcts/sampling.py).
    samples: solutions sampled per problem with source=sampling (k).
    margin: minimum Q(chosen) - Q(rejected); Q lies in [-1, 1].
    min_visits: both children need at least this many visits (a child starts with 1, its own).
    max_pairs_per_tree: keep at most this many pairs per tree (per problem), largest gaps first (0 = no
        cap); with source=sampling, the cap on correct x wrong pairs per problem (m).
    correct_only: keep pairs only from trees where some terminal was validated correct.
    verified: choose among children by their validated outcomes first: chosen = the highest-Q child
        whose subtree holds a terminal validated correct, rejected = the lowest-Q child whose subtree
        holds a terminal validated wrong and none validated correct; with `full`, continuations follow
        such children too. The outcomes decide, so `margin` does not apply. A node without both kinds
        of children gives no pair. For small policies whose self-evaluation carries no signal, this
        keeps the pairs the outcomes vouch for.
    full: chosen/rejected continue to a terminal node (best/worst continuation) instead of one step.
    all_rejected: pair the chosen child with every sibling that qualifies as rejected (Q gap at least
        `margin`; with `verified`, every child that leads only to wrong answers), lowest Q first,
        instead of with the lowest-Q one only. A branching point with one child reaching a correct
        answer and three reaching only wrong ones gives three pairs, not one.
    match_steps: with `full`, the rejected child is the qualifying sibling whose continuation has the
        number of steps closest to the chosen continuation's (ties: lowest Q), not simply the lowest-Q
        one. The lowest-Q sibling is often an early wrong answer, shorter than the chosen path, so
        pairs taught "more steps is better"; this keeps that length signal out of the pairs.
    max_depth: keep only pairs that branch at a node of at most this depth (steps in the shared
        prefix); 0 = root-only pairs, whose prompt is the question alone, as with the sampling source;
        None = any depth.
    dedupe: drop a pair whose (prompt, chosen, rejected) was already emitted for the same tree.
    step_suffix: appended to each step of chosen/rejected; null = the prompt's step separator
        (given by the caller); a step that ends the solution gets no suffix.
    """

    source: str = "mcts"
    samples: int = 8
    margin: float = 0.2
    min_visits: int = 1
    max_pairs_per_tree: int = 0
    correct_only: bool = False
    verified: bool = True
    full: bool = True
    all_rejected: bool = False
    match_steps: bool = False
    max_depth: int | None = None
    dedupe: bool = True
    step_suffix: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"pairs.source={self.source!r}: expected one of {', '.join(SOURCES)}")
        if self.samples < 1:
            raise ValueError(f"pairs.samples={self.samples}: must be >= 1")
        if self.margin < 0:
            raise ValueError(f"pairs.margin={self.margin}: must be >= 0")
        if self.min_visits < 0 or self.max_pairs_per_tree < 0:
            raise ValueError("pairs.min_visits and pairs.max_pairs_per_tree must be >= 0")
        if self.max_depth is not None and self.max_depth < 0:
            raise ValueError(f"pairs.max_depth={self.max_depth}: must be >= 0 (0 = root only) or null (any depth)")


Reach = dict[int, tuple[bool, bool]]
"""node id -> (its subtree holds a terminal validated correct, one validated wrong)."""


def outcome_reach(tree: Tree) -> Reach:
    """For every node: whether its subtree (itself included) holds a terminal whose answer was
    validated correct (outcome > 0), and one validated wrong (outcome < 0)."""
    reach: Reach = {}
    for node in sorted(tree.nodes, key=lambda n: -n.depth):  # children before parents
        good = node.terminal and node.outcome is not None and node.outcome > 0
        bad = node.terminal and node.outcome is not None and node.outcome < 0
        for c in node.children:
            child_good, child_bad = reach[c]
            good, bad = good or child_good, bad or child_bad
        reach[node.id] = (good, bad)
    return reach


def _eligible(kids: list[Node], *, best: bool, reach: Reach | None) -> list[Node]:
    if reach is None:
        return kids
    if best:
        return [k for k in kids if reach[k.id][0]]
    return [k for k in kids if reach[k.id][1] and not reach[k.id][0]]


def _extreme_child(tree: Tree, node: Node, *, best: bool, min_visits: int, reach: Reach | None = None) -> Node | None:
    kids = [tree.nodes[c] for c in node.children if tree.nodes[c].visits >= max(min_visits, 1)]
    kids = _eligible(kids, best=best, reach=reach)
    if not kids:
        return None
    # Ties: more visits first, then lower id: deterministic.
    if best:
        return max(kids, key=lambda n: (n.q, n.visits, -n.id))
    return min(kids, key=lambda n: (n.q, -n.visits, n.id))


def continuation(tree: Tree, start: Node, *, best: bool, min_visits: int = 1,
                 reach: Reach | None = None) -> list[Node] | None:
    """The path from `start` down to a terminal, following the highest-Q (best) or lowest-Q child
    (with `reach`: among children that lead to a correct answer, or only to wrong ones); None when
    it ends at an unexpanded non-terminal leaf."""
    path = [start]
    node = start
    while not node.terminal:
        nxt = _extreme_child(tree, node, best=best, min_visits=min_visits, reach=reach)
        if nxt is None:
            return None
        path.append(nxt)
        node = nxt
    return path


def render_steps(nodes: Sequence[Node], suffix: str) -> str:
    """Steps' text joined as the policy writes them: each step followed by `suffix`, except a step
    that ends the solution."""
    return "".join(n.text + ("" if n.terminal else suffix) for n in nodes)


def node_pairs(tree: Tree, node: Node, *, config: PairsConfig, reach: Reach | None = None) -> list[tuple[Node, Node]]:
    """(chosen, rejected) children of `node` that qualify (`reach`: verified pairs): the chosen child
    with the lowest-Q rejected one, with the one closest in steps (`match_steps`), or with every
    qualifying rejected sibling (`all_rejected`), lowest Q first; empty when none qualifies."""
    kids = [tree.nodes[c] for c in node.children if tree.nodes[c].visits >= max(config.min_visits, 1)]
    if len(kids) < 2:
        return []
    chosen = _extreme_child(tree, node, best=True, min_visits=config.min_visits, reach=reach)
    if chosen is None:
        return []
    rejected = sorted((k for k in _eligible(kids, best=False, reach=reach) if k.id != chosen.id),
                      key=lambda n: (n.q, -n.visits, n.id))  # lowest Q first, as _extreme_child orders them
    if reach is None:  # verified pairs rest on validated outcomes, not on a Q gap
        rejected = [r for r in rejected if chosen.q - r.q >= config.margin and not math.isclose(chosen.q, r.q)]
    if config.all_rejected:
        return [(chosen, r) for r in rejected]
    if config.match_steps and config.full:
        rejected = _step_matched(tree, chosen, rejected, min_visits=config.min_visits, reach=reach)
    return [(chosen, r) for r in rejected[:1]]


def _step_matched(tree: Tree, chosen: Node, rejected: list[Node], *, min_visits: int,
                  reach: Reach | None) -> list[Node]:
    """The qualifying `rejected` siblings (lowest Q first) that continue to a terminal, closest in steps
    to the chosen continuation first (a stable sort: ties keep the Q order); [] when the chosen one
    does not continue to a terminal (`match_steps`)."""
    good = continuation(tree, chosen, best=True, min_visits=min_visits, reach=reach)
    if good is None:
        return []
    steps = {}
    for kid in rejected:
        bad = continuation(tree, kid, best=False, min_visits=min_visits, reach=reach)
        if bad is not None:
            steps[kid.id] = abs(len(bad) - len(good))
    return sorted((k for k in rejected if k.id in steps), key=lambda k: steps[k.id])


def extract_pairs(tree: Tree, *, config: PairsConfig, format_prompt: FormatPrompt, round_index: int = 0,
                  separator: str = "\n") -> list[dict[str, Any]]:
    """All preference pairs of one tree (see the module docstring), largest gap first. A tree of the
    sampling source (depth 1, whole solutions) gives its correct x wrong outcome pairs instead."""
    if tree.meta.get("source") == SAMPLING_SOURCE:
        return outcome_pairs(tree, format_prompt=format_prompt, max_pairs=config.max_pairs_per_tree,
                             round_index=round_index)
    if config.correct_only and not tree.solved():
        return []
    suffix = separator if config.step_suffix is None else config.step_suffix
    reach = outcome_reach(tree) if config.verified else None
    pairs: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for node in tree.nodes:
        if not node.children or (config.max_depth is not None and node.depth > config.max_depth):
            continue
        for chosen, rejected in node_pairs(tree, node, config=config, reach=reach):
            _add_pair(pairs, seen, tree, node, chosen, rejected, config=config, reach=reach, suffix=suffix,
                      format_prompt=format_prompt, round_index=round_index)
    pairs.sort(key=lambda p: (-p["gap"], p["depth"], p["node_id"]))
    if config.max_pairs_per_tree:
        pairs = pairs[:config.max_pairs_per_tree]
    return pairs


def _add_pair(pairs: list[dict[str, Any]], seen: set[tuple[str, str, str]], tree: Tree, node: Node, chosen: Node,
              rejected: Node, *, config: PairsConfig, reach: Reach | None, suffix: str, format_prompt: FormatPrompt,
              round_index: int) -> None:
    """Append the pair (chosen, rejected) at `node` to `pairs` unless it is incomplete (with `full`),
    has equal texts, or repeats one in `seen` (with `dedupe`)."""
    if config.full:
        good = continuation(tree, chosen, best=True, min_visits=config.min_visits, reach=reach)
        bad = continuation(tree, rejected, best=False, min_visits=config.min_visits, reach=reach)
        if good is None or bad is None:
            return
    else:
        good, bad = [chosen], [rejected]
    chosen_text, rejected_text = render_steps(good, suffix), render_steps(bad, suffix)
    if chosen_text.strip() == rejected_text.strip():
        return
    prompt = format_prompt(tree.problem, tuple(tree.steps(node.id)))
    key = (prompt, chosen_text, rejected_text)
    if config.dedupe and key in seen:
        return
    seen.add(key)
    pairs.append({
        "prompt": prompt, "chosen": chosen_text, "rejected": rejected_text,
        "problem_id": tree.problem.id, "node_id": node.id, "chosen_id": chosen.id, "rejected_id": rejected.id,
        "depth": node.depth,
        "chosen_q": chosen.q, "rejected_q": rejected.q,
        "chosen_visits": chosen.visits, "rejected_visits": rejected.visits,
        "gap": chosen.q - rejected.q,
        "chosen_terminal": good[-1].terminal, "rejected_terminal": bad[-1].terminal,
        "round": round_index, "source": "mcts",
        "chosen_programs": len(chosen.tool_calls), "rejected_programs": len(rejected.tool_calls),
    })


def pair_stats(pairs: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """Summary figures for logging: count, problems covered, mean gap/depth/visits, terminal shares."""
    n = len(pairs)
    if not n:
        return {"count": 0, "problems": 0}
    mean = lambda key: sum(float(p[key]) for p in pairs) / n  # noqa: E731
    return {
        "count": n,
        "problems": len({p.get("problem_id") for p in pairs}),
        "mean_gap": mean("gap"),
        "mean_depth": mean("depth"),
        "mean_chosen_q": mean("chosen_q"),
        "mean_rejected_q": mean("rejected_q"),
        "mean_chosen_visits": mean("chosen_visits"),
        "mean_rejected_visits": mean("rejected_visits"),
        "chosen_terminal_share": sum(bool(p.get("chosen_terminal")) for p in pairs) / n,
        "rejected_terminal_share": sum(bool(p.get("rejected_terminal")) for p in pairs) / n,
        "program_branch_share": sum(bool(p.get("chosen_programs") or p.get("rejected_programs")) for p in pairs) / n,
    }


def write_pairs(path: str | Path, pairs: Iterable[dict[str, Any]]) -> None:
    """Write pairs as JSON lines (not atomic; the round loop writes through a temporary file)."""
    with Path(path).open("w", encoding="utf-8") as out:
        for pair in pairs:
            out.write(json.dumps(pair, ensure_ascii=False) + "\n")


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Read a pairs file; a malformed line or a missing key raises ValueError naming file and line."""
    pairs = []
    for lineno, pair in iter_jsonl(path):
        missing = [k for k in REQUIRED_KEYS if k not in pair]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
        pairs.append(pair)
    return pairs
