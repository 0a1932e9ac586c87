"""The baseline pair source: outcome-only pairs from plain sampling (rejection-sampling DPO).

For each problem, `samples` whole solutions are sampled from the current policy in one batched call,
each final answer is checked against the gold answer, and correct solutions are paired with wrong
ones (prompt = the question; chosen/rejected = whole solutions). Problems whose samples are all
correct or all wrong give no pairs.

So that the round loop, resume, the viewer, the pair file and the compute ledger treat both sources
alike, a problem's samples are stored as a depth-1 *tree*: the root's children are the sampled
solutions, each terminal, with its outcome as its value (visits 1, Q = +1 or -1). `meta["source"]`
is "sampling".
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Iterable, Iterator, Sequence

from mcts.seeds import derive_seed  # the project's one seed derivation
from mcts.select import normalize_step, step_priors
from mcts.tree import ROOT, Tree
from mcts.types import ExpandRequest, Expander, Problem, Verifier, programs_run

SOURCE = "sampling"


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def sample_tree(problem: Problem, expansion, *, verifier: Verifier, length_exponent: float = 1.25) -> Tree:
    """A depth-1 tree holding one problem's sampled solutions, each checked against the gold answer."""
    tree = Tree(problem)
    samples = expansion.samples
    tree.compute["generated_tokens"] += sum(s.num_tokens for s in samples)
    tree.compute["prompt_tokens"] += expansion.prompt_tokens
    tree.compute["cached_tokens"] += expansion.cached_tokens
    tree.compute["expansions"] += 1
    tree.compute["tool_calls"] += sum(programs_run(s.tool_calls) for s in samples)
    priors = step_priors([s.logprob for s in samples], [s.num_tokens for s in samples],
                         length_exponent=length_exponent) if samples else []
    for sample, prior in zip(samples, priors):
        answer = verifier.extract(sample.text)
        outcome = 1.0 if verifier.is_correct(answer, problem) else -1.0
        tree.add_child(ROOT, text=sample.text, num_tokens=sample.num_tokens, logprob=sample.logprob, prior=prior,
                       terminal=True, answer=answer, outcome=outcome, visits=1, value_sum=outcome,
                       tool_calls=[asdict(c) for c in sample.tool_calls])
    tree.root.visits = len(samples)
    tree.root.value_sum = sum(tree.nodes[c].value_sum for c in tree.root.children)
    tree.meta.update(source=SOURCE, samples=len(samples))
    return tree


def sample_trees(problems: Iterable[Problem], *, expander: Expander, verifier: Verifier, samples: int,
                 batch_problems: int = 32, seed: int = 0, length_exponent: float = 1.25) -> Iterator[Tree]:
    """One depth-1 tree per problem (see the module docstring): `samples` whole solutions each,
    `batch_problems` problems per engine call; trees are yielded as their call returns. Each problem's
    request seed is derive_seed(seed, problem id, ROOT), as the search seeds its root's expansion;
    `length_exponent` is the priors' (search.length_exponent, as in the search)."""
    if samples < 1 or batch_problems < 1:
        raise ValueError("pairs.samples and the sampling batch must be >= 1")
    problems = list(problems)
    for chunk in _chunks(problems, batch_problems):
        requests = [ExpandRequest(p, (), n=samples, to_end=True, seed=derive_seed(seed, p.id, ROOT))
                    for p in chunk]
        for problem, expansion in zip(chunk, expander.expand(requests)):
            yield sample_tree(problem, expansion, verifier=verifier, length_exponent=length_exponent)


def outcome_pairs(tree: Tree, *, format_prompt: Callable[[Problem, tuple[str, ...]], str], max_pairs: int = 0,
                  round_index: int = 0) -> list[dict[str, Any]]:
    """Correct x wrong solutions of a sampling tree, distinct texts only, at most `max_pairs` (0 = all):
    the i-th pair takes the i-th correct and the i-th wrong solution (cycling), so a cap spreads the
    pairs over different solutions."""
    def distinct(nodes):
        seen, out = set(), []
        for n in nodes:
            key = normalize_step(n.text)
            if key not in seen:
                seen.add(key)
                out.append(n)
        return out

    kids = [tree.nodes[c] for c in tree.root.children]
    good = distinct([n for n in kids if n.outcome is not None and n.outcome > 0])
    bad = distinct([n for n in kids if n.outcome is not None and n.outcome < 0])
    if not good or not bad:
        return []
    total = len(good) * len(bad)
    count = min(total, max_pairs) if max_pairs else total
    # Walk the grid diagonally: (0,0), (1,1), ... so that early pairs use different solutions.
    order = sorted(((i, j) for i in range(len(good)) for j in range(len(bad))),
                   key=lambda ij: ((ij[1] - ij[0]) % len(bad), ij[0]))
    prompt = format_prompt(tree.problem, ())
    pairs = []
    for i, j in order[:count]:
        chosen, rejected = good[i], bad[j]
        pairs.append({
            "prompt": prompt, "chosen": chosen.text, "rejected": rejected.text,
            "problem_id": tree.problem.id, "node_id": ROOT, "depth": 0,
            "chosen_q": chosen.q, "rejected_q": rejected.q,
            "chosen_visits": chosen.visits, "rejected_visits": rejected.visits,
            "gap": chosen.q - rejected.q, "chosen_terminal": True, "rejected_terminal": True,
            "round": round_index, "source": SOURCE,
            "chosen_programs": len(chosen.tool_calls), "rejected_programs": len(rejected.tool_calls),
        })
    return pairs
