"""The batched search driver: select -> expand -> evaluate -> backup, in lockstep over many trees.

`run_search` keeps up to `config.batch_trees` trees active. One *wave*:

1. select up to `leaves_per_tree` leaves in every active tree (PUCT from the tree's search root;
   further leaves of the same tree are chosen under virtual loss, and a leaf already pending in this
   wave is never chosen twice);
2. ONE `expander.expand` call with every expandable leaf of every tree (requests sorted by problem id
   then steps so shared prefixes are adjacent for prefix caching);
3. ONE `evaluator.evaluate` call with every new child of every tree (skipped when `search.value` is none);
4. outcome validation at new terminals (when `use_outcome`), then backup;
5. trees whose budget is spent or whose search root is resolved are yielded at once, and new problems
   are pulled from the iterable to refill the wave.

A wave where no tree expands anything (every selected leaf is a terminal) makes no engine call.

Values and backup (the definitions the tests check):

- leaf value v(n) of a node n: non-terminal: 2*s-1 with s the self-evaluation (0 when `search.value`
  is none); terminal with an outcome o in {+1,-1} (gold known, `use_outcome`):
  (w_o*o + w_e*(2s-1)) / (w_o + w_e), or o alone when `search.value` is none; terminal without an outcome: 2s-1.
- a *simulation* selects one leaf l. If l is expandable it is expanded into children c_1..c_k; each
  child starts with visits = 1 and value_sum = v(c_i) (its "own" visit); then
  b = mean(v(c_i)) (or max, `backup: max`) is added to every node on the path root..l, l included
  (visits += 1, value_sum += b). If l is terminal it is not expanded: b = v(l) is added along
  root..l, l included.
- invariant: for every node n, visits(n) = own(n) + S(n), with own(n) = 1 for every node but the root
  (0) and S(n) = the number of simulations whose selected leaf lies in n's subtree (n included).
  Equivalently, locally: a node with children has visits = own + 1 + sum_children(visits(c) - 1) (it
  was expanded once and is never a selected leaf again); a non-terminal leaf has visits = 1; a
  terminal has visits = 1 + the times it was re-selected. The root's visits = simulations run.
  Every backed-up value lies in [-1, 1], so every Q does.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

from mcts.seeds import derive_seed  # the project's one seed derivation
from mcts.select import (
    merge_duplicates,
    most_visited_child,
    is_resolved,
    select_leaf,
    step_priors,
)
from mcts.tree import ROOT, Tree
from mcts.types import EvalRequest, Evaluator, Expander, ExpandRequest, Problem, Verifier, programs_run

log = logging.getLogger(__name__)

BACKUPS = ("mean", "max")
VALUES = ("self_eval", "model", "none")
"""search.value: what scores new children (see SearchConfig)."""
VOTE_RULES = ("value_vote", "visit_vote", "max_q", "most_visited")

STOP_SIMULATIONS = "simulations"
STOP_RESOLVED = "resolved"
STOP_TOKENS = "token_cap"


@dataclass(frozen=True)
class SearchConfig:
    """The `search` config group (conf/search/default.yaml documents each default's source).

    simulations: simulations per tree (one selected leaf each); reference MCTS-DPO uses more per step.
    batch_trees: trees searched in lockstep (the wave width).
    breadth_root, breadth: children sampled when expanding the root / any other node.
    breadth_to_end: children sampled at depth max_depth - 1, where one expansion writes the rest of the
        solution (to_end=True) so leaves at the depth limit are whole solutions.
    max_depth: steps from the root to the deepest node; nodes at this depth are terminal.
    c_puct: exploration constant of PUCT.
    length_exponent: lambda in prior ∝ exp(logprob / L**lambda).
    fpu: first-play value: the Q of an unvisited child during selection.
    value: what estimates a new child's value through the Evaluator: "self_eval" (the policy judges
        its partial solution, MCTS-DPO), "model" (a learned value model, policy/value_model.py; the
        caller passes that evaluator), or "none" (no evaluator call; non-terminal values are 0).
        The score lands in each node's `self_eval` field whichever estimates it; trees record it in
        `meta["value"]`.
    self_eval: the former switch, kept so that older commands and run directories compose: false
        means value="none"; true leaves `value` as set.
    use_outcome: validate terminal answers against the gold answer (training); false at inference time.
    outcome_weight, eval_weight: w_o and w_e in a terminal's value (w_o*outcome + w_e*(2s-1)) / (w_o+w_e).
    backup: what an expansion backs up: the mean or the max of the new children's values.
    max_tokens_per_tree: stop a tree once it generated this many tokens (0: no cap).
    revisit_validated: a simulation may select a terminal whose answer was validated (its value is
        backed up again, as in the reference); false: such terminals, and nodes all of whose children
        are excluded, are skipped, as MCTS-Solver skips proven nodes (Winands et al. 2008), so every
        simulation expands a node and none is spent re-counting a known outcome. Only matters with
        `use_outcome`.
    stepwise, commit_every: after every `commit_every` simulations commit to the most-visited child of
        the current search root and search below it (the whole tree is kept).
    leaves_per_tree: leaves selected per tree per wave (more than 1 uses virtual loss).
    virtual_loss: value subtracted (with one visit added) along a pending leaf's path while selecting the
        next leaf of the same tree in the same wave.
    eval_with_reference: show the reference solution in the self-evaluation prompt (read by the policy
        adapter, not by the search).
    """

    simulations: int = 16
    batch_trees: int = 32
    breadth_root: int = 4
    breadth: int = 3
    breadth_to_end: int = 1
    max_depth: int = 8
    c_puct: float = 1.0
    length_exponent: float = 1.25
    fpu: float = 0.0
    value: str = "self_eval"
    self_eval: bool = True
    use_outcome: bool = True
    outcome_weight: float = 1.0
    eval_weight: float = 0.5
    backup: str = "mean"
    max_tokens_per_tree: int = 0
    revisit_validated: bool = True
    stepwise: bool = False
    commit_every: int = 4
    leaves_per_tree: int = 1
    virtual_loss: float = 1.0
    eval_with_reference: bool = False

    def __post_init__(self) -> None:
        positive = ("batch_trees", "breadth_root", "breadth", "breadth_to_end", "max_depth", "commit_every",
                    "leaves_per_tree")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name}={getattr(self, name)}: must be >= 1")
        for name in ("simulations", "max_tokens_per_tree", "c_puct", "outcome_weight", "eval_weight",
                     "virtual_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"search.{name}={getattr(self, name)}: must be >= 0")
        if self.outcome_weight + self.eval_weight <= 0:
            raise ValueError("search.outcome_weight + search.eval_weight must be positive")
        if self.backup not in BACKUPS:
            raise ValueError(f"search.backup={self.backup!r}: expected one of {', '.join(BACKUPS)}")
        if self.value not in VALUES:
            raise ValueError(f"search.value={self.value!r}: expected one of {', '.join(VALUES)}")
        if self.self_eval is False:
            object.__setattr__(self, "value", "none")

    @property
    def evaluates(self) -> bool:
        """Whether new children are scored through the Evaluator (search.value is not "none")."""
        return self.value != "none"


@dataclass
class SearchStats:
    """Counters of one `run_search` call (pass one in to read them): waves run, engine calls made,
    requests sent, trees started and finished."""

    waves: int = 0
    expand_calls: int = 0
    evaluate_calls: int = 0
    expand_requests: int = 0
    eval_requests: int = 0
    trees_started: int = 0
    trees_finished: int = 0


def eval_value(score: float | None) -> float:
    """A self-evaluation score s in [0, 1] as a value 2s - 1 in [-1, 1]; 0 without a score."""
    return 0.0 if score is None else 2.0 * score - 1.0


def leaf_value(node_self_eval: float | None, outcome: float | None, *, config: SearchConfig) -> float:
    """v(n): 2s-1 without an outcome; with one, (w_o*o + w_e*(2s-1)) / (w_o + w_e) (o alone without s)."""
    if outcome is None:
        return eval_value(node_self_eval)
    if node_self_eval is None:
        return float(outcome)
    w_o, w_e = config.outcome_weight, config.eval_weight
    return (w_o * outcome + w_e * eval_value(node_self_eval)) / (w_o + w_e)


def node_value(tree: Tree, node_id: int, *, config: SearchConfig) -> float:
    node = tree.nodes[node_id]
    return leaf_value(node.self_eval, node.outcome, config=config)


def aggregate(values: list[float], how: str) -> float:
    """mean or max of the new children's values (what an expansion backs up)."""
    return max(values) if how == "max" else sum(values) / len(values)


def backup(tree: Tree, leaf: int, value: float) -> None:
    """Add one visit and `value` to every node on the path root..leaf (leaf included)."""
    for node_id in tree.path(leaf):
        node = tree.nodes[node_id]
        node.visits += 1
        node.value_sum += value


def add_virtual_loss(tree: Tree, leaf: int, loss: float, sign: int = 1) -> None:
    """sign=+1: one visit and -loss along root..leaf; sign=-1 undoes it."""
    for node_id in tree.path(leaf):
        node = tree.nodes[node_id]
        node.visits += sign
        node.value_sum -= sign * loss


def config_summary(config: SearchConfig) -> dict:
    return asdict(config)


@dataclass
class _Active:
    """Search state of one tree in the wave."""

    tree: Tree
    search_root: int = ROOT
    simulations: int = 0
    since_commit: int = 0
    waves: int = 0
    stop: str | None = None
    committed: list[int] = field(default_factory=list)


@dataclass
class _Selection:
    state: _Active
    leaf: int
    expand: bool


def _new_tree(problem: Problem, *, config: SearchConfig, seed: int) -> _Active:
    tree = Tree(problem=problem, meta={"seed": seed, "config": config_summary(config)})
    return _Active(tree=tree)


def _stop_reason(state: _Active, config: SearchConfig) -> str | None:
    if state.simulations >= config.simulations:
        return STOP_SIMULATIONS
    if config.max_tokens_per_tree and state.tree.compute["generated_tokens"] >= config.max_tokens_per_tree:
        return STOP_TOKENS
    if is_resolved(state.tree, state.search_root):
        return STOP_RESOLVED
    return None


def _select(state: _Active, config: SearchConfig) -> list[_Selection]:
    """Up to `leaves_per_tree` leaves (bounded by the remaining simulations) for one tree, under
    virtual loss; expandable leaves already chosen are excluded, terminals may repeat."""
    tree = state.tree
    count = min(config.leaves_per_tree, config.simulations - state.simulations)
    if config.stepwise:
        count = min(count, config.commit_every - state.since_commit)
    chosen: list[_Selection] = []
    blocked: set[int] = set() if config.revisit_validated else validated_exhausted(tree)
    for _ in range(count):
        leaf = select_leaf(tree, state.search_root, c_puct=config.c_puct, fpu=config.fpu, exclude=blocked)
        if leaf is None:
            break
        expand = not tree.nodes[leaf].terminal
        chosen.append(_Selection(state, leaf, expand))
        if expand:
            _block(tree, leaf, blocked)
        if count > 1:
            add_virtual_loss(tree, leaf, config.virtual_loss)
    if not chosen:  # nothing selectable below the search root: it is resolved
        state.stop = STOP_RESOLVED
    if count > 1:
        for sel in chosen:
            add_virtual_loss(tree, sel.leaf, config.virtual_loss, sign=-1)
    return chosen


def validated_exhausted(tree: Tree) -> set[int]:
    """Terminals whose answer was validated, and every node all of whose children are in the set:
    the nodes a simulation gains nothing from when `revisit_validated` is off."""
    out: set[int] = set()
    for node in tree.nodes:
        if node.terminal and node.outcome is not None:
            _block(tree, node.id, out)
    return out


def _block(tree: Tree, leaf: int, blocked: set[int]) -> None:
    """Exclude a pending leaf, and every ancestor all of whose children are excluded."""
    blocked.add(leaf)
    node = tree.nodes[leaf]
    while node.parent >= 0:
        parent = tree.nodes[node.parent]
        if not all(c in blocked for c in parent.children):
            break
        blocked.add(parent.id)
        node = parent


def _expand_request(sel: _Selection, *, config: SearchConfig, seed: int) -> ExpandRequest:
    tree, node = sel.state.tree, sel.state.tree.nodes[sel.leaf]
    to_end = node.depth >= config.max_depth - 1
    n = config.breadth_to_end if to_end else (config.breadth_root if node.id == ROOT else config.breadth)
    return ExpandRequest(problem=tree.problem, steps=tree.steps(node.id), n=n, to_end=to_end,
                         seed=derive_seed(seed, tree.problem.id, node.id))


def _add_children(tree: Tree, leaf: int, expansion, *, verifier: Verifier, config: SearchConfig) -> list[int]:
    """Turn an Expansion into (merged) children of `leaf`; returns their ids. Accounts the compute."""
    samples = expansion.samples
    tree.compute["generated_tokens"] += sum(s.num_tokens for s in samples)
    tree.compute["prompt_tokens"] += expansion.prompt_tokens
    tree.compute["cached_tokens"] += expansion.cached_tokens
    tree.compute["expansions"] += 1
    tree.compute["tool_calls"] += sum(programs_run(s.tool_calls) for s in samples)
    priors = step_priors([s.logprob for s in samples], [s.num_tokens for s in samples],
                         length_exponent=config.length_exponent)
    depth = tree.nodes[leaf].depth + 1
    ids = []
    for index, prior in merge_duplicates([s.text for s in samples], priors):
        s = samples[index]
        answer = verifier.extract(s.text)
        terminal = answer is not None or s.finished or depth >= config.max_depth
        child = tree.add_child(leaf, text=s.text, num_tokens=s.num_tokens, logprob=s.logprob, prior=prior,
                               terminal=terminal, answer=answer, tool_calls=[asdict(c) for c in s.tool_calls])
        ids.append(child.id)
    return ids


def run_search(problems: Iterable[Problem], *, expander: Expander, evaluator: Evaluator, verifier: Verifier,
               config: SearchConfig, seed: int = 0, progress: Callable[[int], None] | None = None,
               stats: SearchStats | None = None) -> Iterator[Tree]:
    """Grow one tree per problem, up to `config.batch_trees` at a time in lockstep; yield each tree as
    soon as it is finished (streaming; the iterable is consumed lazily to refill the wave).

    Every wave makes at most one `expander.expand` and one `evaluator.evaluate` call, for all trees.
    `progress(n)` is called after every wave with the number of trees finished in it; `stats`, if
    given, is filled with counters. Request seeds derive from (seed, problem id, node id).
    Trees are yielded in the order they finish (in activation order within a wave)."""
    stats = stats if stats is not None else SearchStats()
    source = iter(problems)
    exhausted = False
    active: list[_Active] = []
    while True:
        finished: list[Tree] = []
        while not exhausted and len(active) < config.batch_trees:
            try:
                problem = next(source)
            except StopIteration:
                exhausted = True
                break
            state = _new_tree(problem, config=config, seed=seed)
            stats.trees_started += 1
            state.stop = _stop_reason(state, config) if config.simulations == 0 else None
            if state.stop:
                finished.append(_finish(state))
            else:
                active.append(state)
        if not active:
            stats.trees_finished += len(finished)
            yield from finished
            if progress and finished:
                progress(len(finished))
            if exhausted:
                return
            continue
        _wave(active, expander=expander, evaluator=evaluator, verifier=verifier, config=config, seed=seed,
              stats=stats)
        still = []
        for state in active:
            state.stop = state.stop or _stop_reason(state, config)
            (finished.append(_finish(state)) if state.stop else still.append(state))
        active = still
        stats.trees_finished += len(finished)
        yield from finished
        if progress:
            progress(len(finished))


def _finish(state: _Active) -> Tree:
    tree = state.tree
    tree.meta.update(simulations=state.simulations, waves=state.waves, stop=state.stop)
    if state.committed:
        tree.meta["committed"] = list(state.committed)
    log.debug("tree %s finished (%s) after %d simulations, %d nodes", tree.problem.id, state.stop,
              state.simulations, len(tree.nodes))
    return tree


def _wave(active: list[_Active], *, expander: Expander, evaluator: Evaluator, verifier: Verifier,
          config: SearchConfig, seed: int, stats: SearchStats) -> None:
    """One lockstep wave over `active` trees (see the module docstring): select in every tree, one
    expansion call, one evaluation call, outcomes at new terminals, backup in selection order."""
    stats.waves += 1
    selections = [sel for state in active for sel in _select(state, config)]
    for state in active:
        state.waves += 1
    to_expand = [sel for sel in selections if sel.expand]
    new_children = _expand_wave(to_expand, expander=expander, verifier=verifier, config=config, seed=seed,
                                stats=stats)
    pending = [(sel.state.tree, c) for sel in to_expand for c in new_children[id(sel)]]
    if config.evaluates and pending:
        _evaluate_wave(pending, evaluator=evaluator, stats=stats)
    for tree, c in pending:
        if tree.nodes[c].terminal and config.use_outcome:
            tree.nodes[c].outcome = _outcome(tree, c, verifier)
    for sel in selections:
        _backup_selection(sel, new_children.get(id(sel), []) if sel.expand else [], verifier=verifier,
                          config=config)
    for state in active:
        if config.stepwise and state.since_commit >= config.commit_every:
            _commit(state)


def _outcome(tree: Tree, node_id: int, verifier: Verifier) -> float:
    """Outcome validation against the known answer: +1 correct, -1 wrong."""
    return 1.0 if verifier.is_correct(tree.nodes[node_id].answer, tree.problem) else -1.0


def _expand_wave(to_expand: list[_Selection], *, expander: Expander, verifier: Verifier, config: SearchConfig,
                 seed: int, stats: SearchStats) -> dict[int, list[int]]:
    """One expansion call for every expandable leaf, ordered by problem then steps (so requests that
    share a prefix sit together); returns id(selection) -> the new children's node ids."""
    requests = [_expand_request(sel, config=config, seed=seed) for sel in to_expand]
    order = sorted(range(len(requests)), key=lambda i: (requests[i].problem.id, requests[i].steps))
    new_children: dict[int, list[int]] = {}
    if not requests:
        return new_children
    expansions = expander.expand([requests[i] for i in order])
    stats.expand_calls += 1
    stats.expand_requests += len(requests)
    if len(expansions) != len(requests):
        raise ValueError(f"expander returned {len(expansions)} expansions for {len(requests)} requests")
    for i, expansion in zip(order, expansions):
        sel = to_expand[i]
        new_children[id(sel)] = _add_children(sel.state.tree, sel.leaf, expansion, verifier=verifier, config=config)
    return new_children


def _evaluate_wave(pending: list[tuple[Tree, int]], *, evaluator: Evaluator, stats: SearchStats) -> None:
    """One self-evaluation call for every new child of every tree; scores clipped to [0, 1]."""
    evaluations = evaluator.evaluate([EvalRequest(problem=t.problem, steps=t.steps(c)) for t, c in pending])
    stats.evaluate_calls += 1
    stats.eval_requests += len(pending)
    if len(evaluations) != len(pending):
        raise ValueError(f"evaluator returned {len(evaluations)} evaluations for {len(pending)} requests")
    for (tree, c), ev in zip(pending, evaluations):
        tree.nodes[c].self_eval = min(1.0, max(0.0, float(ev.score)))
        tree.compute["evaluations"] += 1
        tree.compute["prompt_tokens"] += ev.prompt_tokens
        tree.compute["cached_tokens"] += ev.cached_tokens


def _backup_selection(sel: _Selection, children: list[int], *, verifier: Verifier, config: SearchConfig) -> None:
    """Back up one selection: the aggregate of its new children's values, or the leaf's own value (an
    expansion that returned nothing makes the leaf terminal)."""
    state, tree = sel.state, sel.state.tree
    if sel.expand and not children:
        log.warning("tree %s: expansion of node %d returned no samples; marking it terminal", tree.problem.id,
                    sel.leaf)
        tree.nodes[sel.leaf].terminal = True
        if config.use_outcome:
            tree.nodes[sel.leaf].outcome = _outcome(tree, sel.leaf, verifier)
    if children:
        values = []
        for c in children:
            v = node_value(tree, c, config=config)
            tree.nodes[c].visits, tree.nodes[c].value_sum = 1, v
            values.append(v)
        backup(tree, sel.leaf, aggregate(values, config.backup))
    else:
        backup(tree, sel.leaf, node_value(tree, sel.leaf, config=config))
    state.simulations += 1
    state.since_commit += 1


def _commit(state: _Active) -> None:
    """Stepwise mode: move the search root to its most-visited child."""
    child = most_visited_child(state.tree, state.search_root)
    state.since_commit = 0
    if child is not None:
        state.search_root = child
        state.committed.append(child)


def most_visited_path(tree: Tree) -> list[int]:
    """Node ids from the root following the most-visited child (ties: higher Q, then lowest id) to a leaf."""
    path = [ROOT]
    while (child := most_visited_child(tree, path[-1])) is not None:
        path.append(child)
    return path


def best_answer(tree: Tree, *, rule: str = "value_vote",
                same: Callable[[str, str], bool] | None = None) -> str | None:
    """The answer the search settles on (inference-time MCTS); None when no terminal states an answer.

    Rules, over terminals with an extracted answer:
    - value_vote: each terminal votes for its answer with weight visits * (Q + 1) / 2 (its visit count
      times its Q shifted into [0, 1]); the answer with the largest total wins.
    - visit_vote: weight = visits.
    - max_q: the answer of the terminal with the highest Q (ties: more visits, then lowest id).
    - most_visited: the answer at the end of `most_visited_path` (None if that leaf has none).
    Answers are grouped by exact string, or by `same(a, b)` when given (e.g. numeric equivalence).
    Vote ties go to the answer first reached in node-id order."""
    if rule not in VOTE_RULES:
        raise ValueError(f"rule={rule!r}: expected one of {', '.join(VOTE_RULES)}")
    if rule == "most_visited":
        return tree.nodes[most_visited_path(tree)[-1]].answer
    candidates = [n for n in tree.terminals() if n.answer is not None]
    if not candidates:
        return None
    if rule == "max_q":
        return max(candidates, key=lambda n: (n.q, n.visits, -n.id)).answer
    totals: list[list] = []  # [answer, weight]
    for n in candidates:
        weight = n.visits * (n.q + 1.0) / 2.0 if rule == "value_vote" else float(n.visits)
        for entry in totals:
            if entry[0] == n.answer or (same is not None and same(entry[0], n.answer)):
                entry[1] += weight
                break
        else:
            totals.append([n.answer, weight])
    best = max(range(len(totals)), key=lambda i: (totals[i][1], -i))
    return totals[best][0]
