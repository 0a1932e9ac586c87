"""Does a learned value model carry the signal the policy's self-evaluation lacks? (issue 18)

Trains a value model (policy/value_model.py, in a fresh process) on the trees of one round of a
finished iterate run and scores the nodes of another round's trees (other problems), then reports,
on the held-out trees, against the policy's own self-evaluation recorded in the same nodes:

- terminal AUC: P(score of a correct terminal > score of a wrong one), the figure that was 0.34 for
  SmolLM2-135M's self-evaluation;
- node AUC: the same between non-terminal nodes whose soft target (share of correct terminals below)
  is at least 0.5 and those below it, among nodes with a validated terminal below;
- sibling accuracy: share of held-out sibling pairs (mcts/value_data.py's rule) the score orders right.

    python experiments/value_auc.py runs/demo_dev/mcts36-s0 --train-round 0 --test-round 1 \
        --out experiments/results/value_auc
writes PREFIX.json and PREFIX.md; the value model goes to runs/value_auc/<name of PREFIX>/ (git ignores
runs/; removed with --clean).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.console import quiet_console  # noqa: E402
from harness.rundir import round_dir, write_json_atomic, write_text_atomic  # noqa: E402
from harness.settings import load_settings  # noqa: E402
from mcts.tree import Tree, read_trees  # noqa: E402
from mcts.types import Problem  # noqa: E402
from mcts.value_data import examples_from_trees, terminal_counts, value_pairs  # noqa: E402

log = logging.getLogger("experiments.value_auc")


def auc(positive: list[float], negative: list[float]) -> float | None:
    """P(a positive's score > a negative's), ties counting half (the Mann-Whitney statistic)."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def held_out_nodes(trees: list[Tree]) -> list[tuple[Tree, int, str, float | None]]:
    """(tree, node id, kind, soft target): validated terminals ("correct"/"wrong") and non-terminal nodes
    with a validated terminal below ("node")."""
    out = []
    for tree in trees:
        counts = terminal_counts(tree)
        for node in tree.nodes[1:]:
            correct, total = counts.get(node.id, (0, 0))
            if node.terminal and node.outcome is not None:
                out.append((tree, node.id, "correct" if node.outcome > 0 else "wrong", None))
            elif not node.terminal and total:
                out.append((tree, node.id, "node", correct / total))
    return out


def measures(nodes, scores: list[float | None], pairs, pair_scores: list[tuple[float, float]] | None) -> dict:
    def kept(kind, test=lambda t: True):
        return [s for (_, _, k, t), s in zip(nodes, scores) if k == kind and s is not None and test(t)]

    out = {"terminal_auc": auc(kept("correct"), kept("wrong")),
           "node_auc": auc(kept("node", lambda t: t >= 0.5), kept("node", lambda t: t < 0.5)),
           "terminals": len(kept("correct")) + len(kept("wrong")), "correct_terminals": len(kept("correct")),
           "nodes": len(kept("node"))}
    if pair_scores is not None:
        valid = [(c, r) for c, r in pair_scores if c is not None and r is not None]
        out["sibling_pairs"] = len(valid)
        out["sibling_accuracy"] = sum(c > r for c, r in valid) / len(valid) if valid else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished iterate run directory (pairs=mcts trees)")
    parser.add_argument("--train-round", type=int, default=0)
    parser.add_argument("--test-round", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="output prefix")
    parser.add_argument("--clean", action="store_true", help="remove the trained model afterwards")
    parser.add_argument("--epochs", type=int, help="value.train.epochs (default: the run's value config)")
    args = parser.parse_args(argv)
    quiet_console()
    from omegaconf import OmegaConf

    from policy.models import load_tokenizer, resolve_model_path
    from policy.prompts import PromptFormatter
    from policy.value_model import ValueConfig, ValueModelEvaluator, train_value_subprocess
    from mcts.types import EvalRequest
    from tasks import make_task

    s = load_settings(OmegaConf.load(args.run / "config.yaml"))
    value = s.value or ValueConfig()  # runs from before the value group: its defaults
    if args.epochs:
        value = replace(value, train=replace(value.train, epochs=args.epochs))
    base = resolve_model_path(s.model)  # the policy that searched round 0; later rounds: the round's checkpoint
    if args.train_round > 0:
        base = str(round_dir(args.run, args.train_round - 1).policy)
    formatter = PromptFormatter(load_tokenizer(base), make_task(s.task, s.tool), s.prompt)

    def text(pid: str, question: str, steps) -> str:
        return formatter.value_prompt(Problem(id=pid, question=question, answer=""), tuple(steps))

    train_trees = read_trees(round_dir(args.run, args.train_round).trees)
    test_trees = read_trees(round_dir(args.run, args.test_round).trees)
    data_cfg = value.data
    examples, pairs = examples_from_trees(train_trees, data_cfg)
    log.info("training data from round %d: %d trees, %d examples, %d sibling pairs", args.train_round,
             len(train_trees), len(examples), len(pairs))
    model_dir = Path("runs") / "value_auc" / Path(args.out).name  # hundreds of MB: not next to the results
    started = time.time()
    result = train_value_subprocess([(text(e.problem_id, e.question, e.steps), e.target) for e in examples],
                                    [(text(p.problem_id, p.question, p.chosen_steps),
                                      text(p.problem_id, p.question, p.rejected_steps)) for p in pairs],
                                    base_path=base, out_dir=str(model_dir), cfg=value.train)
    log.info("trained in %.0f s: loss %.3f, training pairs ordered %s", time.time() - started, result.final_loss,
             result.pair_accuracy)

    nodes = held_out_nodes(test_trees)
    evaluator = ValueModelEvaluator(model_dir, formatter.value_prompt, device="cpu",
                                    max_length=value.train.max_length)
    requests = [EvalRequest(problem=t.problem, steps=t.steps(n)) for t, n, _, _ in nodes]
    learned = [e.score for e in evaluator.evaluate(requests)]
    own = [t.nodes[n].self_eval for t, n, _, _ in nodes]
    test_pairs = [p for t in test_trees for p in value_pairs(t, data_cfg)]
    by_tree = {t.problem.id: t for t in test_trees}
    pair_requests = [EvalRequest(problem=by_tree[p.problem_id].problem, steps=steps) for p in test_pairs
                     for steps in (p.chosen_steps, p.rejected_steps)]
    scored = [e.score for e in evaluator.evaluate(pair_requests)]
    learned_pairs = list(zip(scored[0::2], scored[1::2]))
    own_pairs = [(by_tree[p.problem_id].nodes[p.chosen_id].self_eval,
                  by_tree[p.problem_id].nodes[p.rejected_id].self_eval) for p in test_pairs]
    report = {
        "run": str(args.run), "train_round": args.train_round, "test_round": args.test_round,
        "train": {"trees": len(train_trees), "examples": len(examples), "pairs": len(pairs),
                  "final_loss": result.final_loss, "pair_accuracy": result.pair_accuracy, "seconds": result.seconds,
                  "config": asdict(value.train)},
        "test_trees": len(test_trees),
        "value_model": measures(nodes, learned, test_pairs, learned_pairs),
        "self_eval": measures(nodes, own, test_pairs, own_pairs),
    }
    write_json_atomic(Path(f"{args.out}.json"), report)
    write_text_atomic(Path(f"{args.out}.md"), markdown(report, argv if argv is not None else sys.argv[1:]))
    if args.clean:
        shutil.rmtree(model_dir, ignore_errors=True)
    print(Path(f"{args.out}.md").read_text())
    return 0


def markdown(r: dict, argv: list[str]) -> str:
    def f(x, pct=False):
        return "-" if x is None else (f"{100 * x:.0f}%" if pct else f"{x:.2f}")

    rows = [f"| {name} | {f(m['terminal_auc'])} | {f(m['node_auc'])} | {f(m.get('sibling_accuracy'), True)} |"
            for name, m in (("value model", r["value_model"]), ("self-evaluation", r["self_eval"]))]
    v = r["value_model"]
    return "\n".join([
        "# Value model against self-evaluation on held-out trees",
        "",
        f"Written by `python experiments/value_auc.py {' '.join(argv)}` (do not edit).",
        "",
        f"Trained on round {r['train_round']}'s {r['train']['trees']} trees ({r['train']['examples']} examples, "
        f"{r['train']['pairs']} sibling pairs; loss {r['train']['final_loss']:.3f}, {r['train']['seconds']:.0f} s); "
        f"scored on round {r['test_round']}'s {r['test_trees']} trees (other problems): {v['terminals']} validated "
        f"terminals ({v['correct_terminals']} correct), {v['nodes']} inner nodes, {v.get('sibling_pairs', 0)} "
        "sibling pairs.",
        "",
        "| scorer | terminal AUC (correct vs wrong) | node AUC (soft target >= 0.5 vs below) | sibling pairs ordered |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
