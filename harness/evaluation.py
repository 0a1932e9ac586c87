"""The evaluation harness shared by `evaluate.py` and the round loop.

Modes: greedy (pass@1), sampling (majority@k and pass@k), mcts (the search engine at inference time:
self-evaluation only, no gold answer in any prompt; the answer is a value-weighted vote over
terminal nodes).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from tqdm import tqdm

from harness.compute import phase_record
from harness.seeds import derive_seed
from mcts.search import SearchConfig, best_answer, run_search
from mcts.types import EvalRequest, Problem
from policy.backends.base import Backend, SamplingSettings
from policy.prompts import PromptFormatter
from policy.step_policy import GenerationConfig, StepPolicy
from policy.tool_use import ToolExecutor, ran_share, sample_solutions
from tools.config import ToolConfig
from tasks.arith import difficulty_of

log = logging.getLogger(__name__)

WILSON_Z = 1.96  # 95% two-sided normal quantile


@dataclass(frozen=True)
class EvalConfig:
    """The `eval` config group.

    mode: greedy | sampling | mcts | best_of_n (k samples, the answer the value model ranks first).
    limit: evaluate on at most this many problems per task (null = all).
    seed: the slice seed (a seeded shuffle before `limit`; null = the first `limit` problems).
    k: samples per problem in sampling mode (majority@k, pass@k).
    temperature, top_p: sampling mode's settings.
    batch_size: problems per backend call (greedy/sampling/best_of_n), and in best_of_n per value-model call
        (all their samples; the model splits them into its own micro-batches) — bounds memory, not results.
    value_model: a trained value model folder (round_<k>/value): best_of_n ranks with it, and mcts mode
        scores new children with it when search.value=model. No gold answer is used either way.
    weighting: best_of_n: "plain" takes the single best-scored sample's answer; "weighted" sums the
        scores of the samples that give each answer (weighted majority) and takes the largest.
    """

    mode: str = "greedy"
    limit: int | None = None
    seed: int | None = 0
    k: int = 8
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 256
    value_model: str | None = None
    weighting: str = "plain"

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"eval.weighting={self.weighting!r}: expected one of {', '.join(WEIGHTINGS)}")


MODES = ("greedy", "sampling", "mcts", "best_of_n")
WEIGHTINGS = ("plain", "weighted")


def wilson_interval(correct: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def slice_problems(problems: Sequence[Problem], limit: int | None, seed: int | None) -> list[Problem]:
    """A reproducible evaluation slice: seeded shuffle (if seed is given), then the first `limit`."""
    items = list(problems)
    if seed is not None:
        random.Random(seed).shuffle(items)
    return items if limit is None else items[:limit]


def majority_vote(answers: Sequence[str | None], same) -> str | None:
    """The most frequent answer; `same(a, b)` decides equality (e.g. numerically). Ties: first seen."""
    clusters: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        for cluster in clusters:
            if same(cluster[0], a):
                cluster.append(a)
                break
        else:
            clusters.append([a])
    return max(clusters, key=len)[0] if clusters else None


def ranked_answer(answers: Sequence[str | None], scores: Sequence[float], same, weighting: str) -> str | None:
    """best_of_n's choice among samples with value-model scores: the best-scored sample's answer
    ("plain"), or the answer whose samples' scores sum highest ("weighted"). Samples without an
    answer are left out; ties go to the first seen."""
    scored = [(a, s) for a, s in zip(answers, scores) if a is not None]
    if not scored:
        return None
    if weighting == "plain":
        return max(scored, key=lambda x: x[1])[0]
    clusters: list[list] = []
    for a, s in scored:
        for cluster in clusters:
            if same(cluster[0], a):
                cluster[1] += s
                break
        else:
            clusters.append([a, s])
    return max(clusters, key=lambda c: c[1])[0]


def value_evaluator(cfg: EvalConfig, formatter: PromptFormatter, search: SearchConfig):
    """The value model that best_of_n (and mcts with search.value=model) scores with; None when unused."""
    if not (cfg.mode == "best_of_n" or (cfg.mode == "mcts" and search.value == "model")):
        return None
    if not cfg.value_model:
        raise ValueError(f"eval.mode={cfg.mode}" + (" with search.value=model" if cfg.mode == "mcts" else "")
                         + " needs eval.value_model=<folder of a trained value model, e.g. runs/<name>/round_0/value>")
    from policy.value_model import ValueModelEvaluator, value_complete

    if not value_complete(cfg.value_model):
        raise ValueError(f"eval.value_model={cfg.value_model}: not a finished value model (no value_result.json)")
    return ValueModelEvaluator(cfg.value_model, formatter.value_prompt)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def problem_seeds(problems: Sequence[Problem], seed: int) -> tuple[int, ...]:
    """Each problem's sampling seed, derive_seed(seed, problem id): a problem's samples do not depend
    on which problems share its backend call (where the engine honours per-prompt seeds)."""
    return tuple(derive_seed(seed, p.id) for p in problems)


def _sample_solutions(problems: list[Problem], backend: Backend, formatter: PromptFormatter,
                      settings: SamplingSettings, batch_size: int, desc: str,
                      executor: ToolExecutor | None, seed: int) -> list[tuple[list, int, int, int]]:
    """Per problem: (samples, generated tokens, prompt tokens, cached tokens); with an executor the
    solutions run their programs as they write them (policy/tool_use.py)."""
    out = []
    with tqdm(total=len(problems), desc=desc, unit="problem", leave=False) as bar:
        for chunk in _chunks(problems, batch_size):
            prompts = [formatter.solution_prompt(p, ()) for p in chunk]
            chunk_settings = replace(settings, seeds=problem_seeds(chunk, seed))
            for completion in sample_solutions(backend, prompts, chunk_settings, executor):
                out.append((list(completion.samples), sum(s.num_tokens for s in completion.samples),
                            completion.prompt_tokens, completion.cached_tokens))
            bar.update(len(chunk))
    return out


def value_scores(ranker, problems: Sequence[Problem], texts: Sequence[Sequence[str]], *, batch_size: int,
                 desc: str) -> list[list[Any]]:
    """Each problem's solutions `texts[i]` valued by `ranker` (an Evaluator) as partial solutions: one
    `evaluate` call for all the solutions of `batch_size` problems (the problems a sampling call takes),
    which the value model splits into its own micro-batches. Returns each problem's Evaluations."""
    out: list[list[Any]] = []
    with tqdm(total=len(problems), desc=desc, unit="problem", leave=False) as bar:
        for chunk in _chunks(list(zip(problems, texts)), batch_size):
            requests = [EvalRequest(problem=p, steps=(t,)) for p, ts in chunk for t in ts]
            valued = iter(ranker.evaluate(requests))
            out.extend([next(valued) for _ in ts] for _, ts in chunk)
            bar.update(len(chunk))
    return out


def evaluate_problems(task, problems: Sequence[Problem], *, backend: Backend, formatter: PromptFormatter,
                      gen: GenerationConfig, cfg: EvalConfig, search: SearchConfig, params: int,
                      seed: int = 0, tool: ToolConfig | None = None) -> dict[str, Any]:
    """Evaluate on `problems`; returns the eval.json content (accuracy, Wilson CI, records, compute).
    With a tool, every mode runs the solutions' programs in the sandbox; `tool` in the result counts them.
    `seed` seeds the sampling mode (per problem, `problem_seeds`) and the test-time search. Votes (majority
    in sampling mode, the terminal vote in mcts mode) group answers the task's checker calls equal."""
    if cfg.mode not in MODES:
        raise ValueError(f"eval.mode={cfg.mode!r}: expected one of {', '.join(MODES)}")
    problems = list(problems)
    if not problems:
        raise ValueError(f"no problems to evaluate in task {task.name!r}")
    same = lambda a, b: task.is_correct(b, Problem("vote", "", a))  # noqa: E731
    records: list[dict[str, Any]] = []
    prompt_tokens = generated = cached = 0
    extra: dict[str, Any] = {}
    executor = ToolExecutor(tool) if tool is not None and tool.enabled else None
    ranker = value_evaluator(cfg, formatter, search)
    if cfg.mode in ("greedy", "sampling", "best_of_n"):
        greedy = cfg.mode == "greedy"
        settings = SamplingSettings(n=1 if greedy else cfg.k, max_tokens=gen.solution_max_tokens,
                                    temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p)
        outputs = _sample_solutions(problems, backend, formatter, settings, cfg.batch_size, f"eval {task.name}",
                                    executor, seed)
        pass_k = 0
        solutions = [[s.text for s in samples] for samples, *_ in outputs]
        valuations = (value_scores(ranker, problems, solutions, batch_size=cfg.batch_size, desc=f"value {task.name}")
                      if ranker is not None else [None] * len(problems))
        for problem, (samples, gen_tok, p_tok, c_tok), texts, valued in zip(problems, outputs, solutions, valuations):
            answers = [task.extract(t) for t in texts]
            scores = None
            if valued is not None:  # the whole solution as the partial solution to value
                scores = [v.score for v in valued]
                p_tok += sum(v.prompt_tokens for v in valued)
                prediction = ranked_answer(answers, scores, same, cfg.weighting)
            else:
                prediction = answers[0] if greedy else majority_vote(answers, same)
            any_correct = any(task.is_correct(a, problem) for a in answers)
            pass_k += any_correct
            record = dict(id=problem.id, question=problem.question, gold=problem.answer, prediction=prediction,
                          correct=task.is_correct(prediction, problem), tokens=gen_tok)
            if greedy:
                record["output"] = texts[0]
                if executor is not None:
                    record["tool_calls"] = [asdict(c) for c in samples[0].tool_calls]
            else:
                record.update(answers=answers, pass_at_k=any_correct)
                if scores is not None:
                    record["scores"] = scores
            records.append(record)
            prompt_tokens += p_tok
            generated += gen_tok
            cached += c_tok
        if not greedy:
            extra = {"pass_at_k": pass_k / len(problems), "k": cfg.k}
        if ranker is not None:
            extra.update(value_model=cfg.value_model, weighting=cfg.weighting)
    else:
        # Inference-time search: self-evaluation or the value model; no gold answer in any prompt.
        policy = StepPolicy(backend, formatter, gen, eval_with_reference=False, tool=tool)
        executor = policy.executor
        search_cfg = replace(search, use_outcome=False)
        by_id = {p.id: p for p in problems}
        trees = {}
        with tqdm(total=len(problems), desc=f"eval-mcts {task.name}", unit="tree", leave=False) as bar:
            for tree in run_search(problems, expander=policy, evaluator=ranker or policy, verifier=task,
                                   config=search_cfg, seed=seed):
                trees[tree.problem.id] = tree
                bar.update(1)
        for problem_id, problem in by_id.items():
            tree = trees[problem_id]
            prediction = best_answer(tree, same=same)
            compute = tree.compute
            records.append(dict(id=problem.id, question=problem.question, gold=problem.answer, prediction=prediction,
                                correct=task.is_correct(prediction, problem),
                                tokens=compute.get("generated_tokens", 0)))
            prompt_tokens += compute.get("prompt_tokens", 0)
            generated += compute.get("generated_tokens", 0)
            cached += compute.get("cached_tokens", 0)
    return summary(task.name, cfg.mode, problems, records, extra=extra, params=params,
                   tokens=(prompt_tokens, generated, cached), tool=executor.stats.as_dict() if executor else None)


def summary(task_name: str, mode: str, problems: Sequence[Problem], records: list[dict[str, Any]], *,
            extra: dict[str, Any], params: int, tokens: tuple[int, int, int], tool: dict | None) -> dict[str, Any]:
    """The eval.json entry of `records` (one per problem, in `problems`' order): counts, accuracy, its
    Wilson interval, `extra` (pass@k, ...), accuracy by difficulty, the tool's counters and the compute
    of (prompt, generated, cached) `tokens`."""
    n = len(records)
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, n)
    extra = dict(extra)
    by_difficulty = accuracy_by_difficulty(problems, records)
    if by_difficulty:
        extra["by_difficulty"] = by_difficulty
    if tool is not None:
        extra["tool"] = tool
    prompt_tokens, generated, cached = tokens
    return {
        "task": task_name, "mode": mode, "n": n, "correct": correct, "accuracy": correct / n,
        "ci95": [low, high], **extra,
        "compute": phase_record(params, prompt_tokens=prompt_tokens, generated_tokens=generated, cached_tokens=cached),
        "records": records,
    }


PART_KEYS = ("k", "value_model", "weighting")
"""eval.json keys that every shard's entry holds alike (settings, not counts)."""


def merge_results(parts: Sequence[dict[str, Any]], problems: Sequence[Problem], *, params: int) -> dict[str, Any]:
    """One eval.json entry from the entries of `evaluate_problems` on disjoint shards that together hold
    `problems` (launcher=ray, harness/launcher.py): the records in `problems`' order; counts, accuracy,
    pass@k, accuracy by difficulty and compute recomputed; the tool's counters summed. The same content
    as one call on all of `problems` (where each problem's outputs do not depend on its shard)."""
    if not parts:
        raise ValueError("no evaluation parts to merge")
    by_id = {r["id"]: r for part in parts for r in part["records"]}
    ids = [p.id for p in problems]
    if sum(len(part["records"]) for part in parts) != len(ids) or set(by_id) != set(ids):
        raise ValueError(f"the evaluation parts hold {sorted(by_id)[:5]}..., not the {len(ids)} problems evaluated")
    records = [by_id[i] for i in ids]
    first = parts[0]
    extra: dict[str, Any] = {}
    if "pass_at_k" in first:
        extra["pass_at_k"] = sum(r["pass_at_k"] for r in records) / len(records)
    extra.update({key: first[key] for key in PART_KEYS if key in first})
    tool = None
    if "tool" in first:
        tool = {key: sum(part["tool"][key] for part in parts) for key in first["tool"]}
    tokens = tuple(sum(part["compute"][key] for part in parts)
                   for key in ("prompt_tokens", "generated_tokens", "cached_tokens"))
    return summary(first["task"], first["mode"], problems, records, extra=extra, params=params, tokens=tokens,
                   tool=tool)


def accuracy_by_difficulty(problems: Sequence[Problem], records: Sequence[dict[str, Any]]) -> dict[str, dict]:
    """{difficulty: {n, correct, accuracy, ci95}} for problems whose id carries a difficulty (generated
    arithmetic); {} when none does."""
    groups: dict[int, list[bool]] = {}
    for problem, record in zip(problems, records):
        level = difficulty_of(problem)
        if level is not None:
            groups.setdefault(level, []).append(bool(record["correct"]))
    out = {}
    for level in sorted(groups):
        hits = groups[level]
        out[str(level)] = dict(n=len(hits), correct=sum(hits), accuracy=sum(hits) / len(hits),
                               ci95=list(wilson_interval(sum(hits), len(hits))))
    return out


def summary_line(result: dict[str, Any]) -> str:
    low, high = result["ci95"]
    line = (f"{result['task']} [{result['mode']}] accuracy {100 * result['accuracy']:.1f}% "
            f"({result['correct']}/{result['n']}, 95% CI {100 * low:.1f}-{100 * high:.1f})")
    if "pass_at_k" in result:
        line += f", pass@{result['k']} {100 * result['pass_at_k']:.1f}%"
    if result.get("tool", {}).get("calls"):
        tool = result["tool"]
        line += f"; {tool['calls']} programs, {100 * ran_share(tool):.0f}% ran"
    if result.get("by_difficulty"):
        line += "; by difficulty " + ", ".join(
            f"d{level} {100 * g['accuracy']:.0f}% ({g['correct']}/{g['n']})"
            for level, g in result["by_difficulty"].items())
    return line + f", {result['compute']['generated_tokens']} tokens generated"
