"""The round loop: search -> pairs -> train -> evaluate, `run.rounds` times, resumable.

    python iterate.py                          # the default: SmolLM2-135M on the CPU (what `make demo` runs)
    python iterate.py experiment=smoke         # a tiny random model, one short round (about a minute)
    python iterate.py run.name=mine run.rounds=3 search.simulations=32 backend=hf

Re-running with the same run directory continues where it stopped: finished trees, pairs,
checkpoints and evaluations are never redone, and finished rounds are not logged again. A phase on
disk that was started with other settings (its fingerprint, harness/fingerprint.py) stops the run
before any work, or with run.on_change=rerun is redone with everything after it (docs/resume.md).
This is the only place that sequences phases.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from harness import fingerprint
from harness.compute import phase_record
from harness.config import ConfigError, as_dict
from harness.console import quiet_console
from harness.errors import exit_on_user_error
from harness.evaluation import merge_results, slice_problems, summary_line
from harness.jobs import evaluate_shard, search_shard, search_value_model
from harness.launcher import Engine, make_engines
from harness.report import write_report
from harness.rundir import (RoundDir, copy_round0_search, owned, read_json, remove_stale_temps, round_dir,
                            truncate_partial_line, write_config, write_json_atomic, write_jsonl_atomic,
                            write_text_atomic)
from harness.seeds import derive_seed, engine_config, eval_seed  # noqa: F401  (engine_config: re-exported)
from harness.settings import Settings, load_settings
from harness.tracking import Tracker, forget_steps
from mcts.pairs import extract_pairs, pair_stats, read_pairs
from mcts.tree import dumps_tree, read_trees
from mcts.types import Problem
from mcts.value_data import examples_from_trees, value_rows
from mcts.value_data import summary as value_summary
from policy.dpo import train_dpo_subprocess
from policy.models import count_parameters, load_tokenizer, resolve_model_path
from policy.prompts import PromptFormatter
from policy.value_model import read_result, train_value_subprocess, value_complete
from tasks import make_task

log = logging.getLogger("iterate")


def search_phase(s: Settings, rd: RoundDir, k: int, problems, policy_path: str, engine: Engine, task, formatter,
                 params: int) -> dict:
    """Grow one tree per problem; trees are appended to trees.jsonl as they finish. Resumes: problems
    whose tree is already on disk are skipped (a half-written last line is dropped)."""
    if rd.search_done.is_file():
        return read_json(rd.search_done)
    started = time.time()
    done = {t.problem.id for t in read_trees(rd.trees)} if truncate_partial_line(rd.trees) else set()
    todo = [p for p in problems if p.id not in done]
    if done:
        log.info("round %d: %d trees already on disk, searching the other %d", k, len(done), len(todo))
    tool: dict = {}
    if todo:
        rd.path.mkdir(parents=True, exist_ok=True)
        job = partial(search_shard, s=s, run_dir=rd.path.parent, k=k, task=task, formatter=formatter)
        with rd.trees.open("a", encoding="utf-8") as out, \
                tqdm(total=len(problems), initial=len(done), desc=f"round {k} search", unit="tree") as bar:
            for finished in engine.run(job, todo, policy_path):
                out.write(dumps_tree(finished.tree) + "\n")
                out.flush()
                bar.update(1)
                tool = {key: tool.get(key, 0) + value for key, value in finished.tool.items()}
    trees = read_trees(rd.trees)
    compute = {key: sum(t.compute.get(key, 0) for t in trees)
               for key in ("prompt_tokens", "generated_tokens", "cached_tokens")}
    solved = sum(t.solved() for t in trees)
    record = {"trees": len(trees), "solved": solved, "nodes": sum(len(t.nodes) for t in trees),
              "compute": phase_record(params, **compute)}
    value_model = search_value_model(s, rd.path.parent, k) if todo else None
    if value_model:
        record["value_model"] = str(value_model)
    if tool:  # what the sandbox cost in this invocation's search (summed over the launcher's workers)
        record["tool"] = {**tool, "search_seconds": time.time() - started}
    write_json_atomic(rd.search_done, record)
    log.info("round %d search: %d of %d trees solved, %d nodes, %d tokens generated, %.0f s", k, solved, len(trees),
             record["nodes"], compute["generated_tokens"], time.time() - started)
    return record


def pairs_phase(s: Settings, rd: RoundDir, k: int, formatter) -> list[dict]:
    if rd.pairs.is_file():
        return read_pairs(rd.pairs)
    pairs: list[dict] = []
    for tree in read_trees(rd.trees):
        pairs.extend(extract_pairs(tree, config=s.pairs, format_prompt=formatter.solution_prompt, round_index=k,
                                    separator=s.prompt.step_separator))
    write_jsonl_atomic(rd.pairs, pairs)
    stats = pair_stats(pairs)
    log.info("round %d pairs: %d, from %d problems", k, len(pairs), stats["problems"])
    return pairs


def value_phase(s: Settings, rd: RoundDir, k: int, policy_path: str, engine: Engine, formatter) -> dict:
    """Train round k's value model (value.enabled) on the targets and sibling pairs of this round's trees
    and the value.rounds_of_data - 1 rounds before; round_<k>/value.jsonl holds the data, round_<k>/value/
    the model. Returns its ValueTrainResult as a dict ({} when off, {"skipped": True} without data)."""
    if not (s.value and s.value.enabled):
        return {}
    if value_complete(rd.value):
        return as_dict(read_result(rd.value))
    run_dir = rd.path.parent
    rounds = range(max(0, k - s.value.rounds_of_data + 1), k + 1)
    files = [round_dir(run_dir, j).trees for j in rounds]
    trees = [t for path in files if path.is_file() for t in read_trees(path)]
    examples, pairs = examples_from_trees(trees, s.value.data)
    write_jsonl_atomic(rd.value_data, value_rows(examples, pairs))
    stats = value_summary(examples, pairs)
    if not examples and not pairs:
        log.warning("round %d value: the trees hold no validated terminals; no value model this round", k)
        return {"skipped": True, **stats}

    def text(pid: str, question: str, steps: tuple[str, ...]) -> str:
        return formatter.value_prompt(Problem(id=pid, question=question, answer=""), tuple(steps))

    point = [(text(e.problem_id, e.question, e.steps), e.target) for e in examples]
    sides = [(text(p.problem_id, p.question, p.chosen_steps), text(p.problem_id, p.question, p.rejected_steps))
             for p in pairs]
    engine.close()  # training runs in its own process; the engine's memory is freed first (as for DPO)
    base = policy_path if s.value.backbone == "policy" else s.value.backbone
    result = as_dict(train_value_subprocess(point, sides, base_path=base, out_dir=str(rd.value),
                                            cfg=replace(s.value.train, seed=derive_seed(s.run.seed, k, "value"))))
    accuracy = "-" if result["pair_accuracy"] is None else f"{100 * result['pair_accuracy']:.0f}%"
    log.info("round %d value: %d examples (mean target %.2f), %d pairs from %d trees, %d steps, loss %.3f, "
             "pairs ordered %s, %.0f s", k, len(examples), stats.get("mean_target", float("nan")), len(pairs),
             len(trees), result["steps"], result["final_loss"], accuracy, result["seconds"])
    return result


def train_phase(s: Settings, rd: RoundDir, k: int, pairs: list[dict], policy_path: str, initial_path: str,
                engine: Engine) -> dict:
    if rd.policy_complete():
        return read_json(rd.train)
    if not pairs:
        log.warning("round %d: no preference pairs; the policy is carried over unchanged", k)
        result = {"skipped": True, "policy": policy_path, "tokens": 0}
        write_json_atomic(rd.train, result)
        return result
    engine.close()  # free the engine's memory; training runs in its own process (docs/notes.md)
    ref = initial_path if s.train.reference == "initial" else policy_path
    result = train_dpo_subprocess(pairs, policy_path=policy_path, ref_path=ref, out_dir=str(rd.policy),
                                  cfg=replace(s.train, seed=derive_seed(s.run.seed, k, "train")))
    record = as_dict(result)
    record["policy"] = str(rd.policy)
    write_json_atomic(rd.train, record)
    log.info("round %d train: %d pairs, %d steps, loss %.3f, reward margin %.3f, reward accuracy %.2f, %.0f s", k,
             record.get("pairs", 0), record.get("steps", 0), record.get("final_loss", float("nan")),
             record.get("reward_margin", float("nan")), record.get("reward_accuracy", float("nan")),
             record.get("seconds", float("nan")))
    return record


def eval_phase(s: Settings, path: Path, policy_path: str, engine: Engine, eval_tasks, formatter_for,
               params: int, seed: int, fingerprints: dict[str, dict] | None = None) -> dict:
    """Evaluate `policy_path` on every evaluation task not yet in eval.json at `path` (rewritten as
    each task finishes; a task added to a finished run is evaluated, the others are not redone).
    `fingerprints`: {task: fingerprint}, recorded as each task starts (harness/fingerprint.py)."""
    results = read_json(path) if path.is_file() else {}
    for name, (task, problems) in eval_tasks.items():
        if name in results:
            continue
        if fingerprints:
            fingerprint.record(path.parent, "eval", {name: fingerprints[name]})
        job = partial(evaluate_shard, s=s, task=task, formatter=formatter_for(task), params=params, seed=seed)
        parts = [part.result for part in engine.run(job, problems, policy_path)]
        result = parts[0] if len(parts) == 1 else merge_results(parts, problems, params=params)
        log.info("%s", summary_line(result))
        results[name] = result
        write_json_atomic(path, results)
    return {name: results[name] for name in eval_tasks}


def eval_metrics(results: dict) -> dict:
    return {f"eval/{name}/accuracy": r["accuracy"] for name, r in results.items()}


SEARCH_FROM_MATCH = ("model", "task", "tool", "search", "generation", "prompt", "pairs", "eval", "eval_tasks")
"""Config groups that must be equal in a `run.search_from` source (what makes its round-0 search and pairs)."""


def round_problems(pool: list, s: Settings, k: int) -> list:
    return pool[k * s.run.problems_per_round:(k + 1) * s.run.problems_per_round]


def check_resume(s: Settings, run_dir: Path, pool: list, flat: dict) -> None:
    """Compare every started phase on disk with this invocation's config, before any work: a change
    raises ConfigError naming the keys (run.on_change=error) or deletes the affected phases and all
    after them (rerun). Phases without a fingerprint (older run directories) are warned about.
    `flat`: this invocation's settings, flattened (fingerprint.flatten)."""
    conflicts, unknown = [], []
    if s.run.evaluate_initial and s.eval_tasks:
        expected = {"eval": fingerprint.eval_fingerprints(flat, s.eval_tasks, "initial")}
        c, u = fingerprint.check_folder(run_dir / "initial", "initial", expected)
        conflicts += c
        unknown += [f"initial {p}" for p in u]
    for k in range(s.run.rounds):
        rd = round_dir(run_dir, k)
        if not rd.path.is_dir():
            continue
        expected = fingerprint.round_fingerprints(flat, run_dir, k, round_problems(pool, s, k), s.eval_tasks)
        c, u = fingerprint.check_folder(rd.path, f"round_{k}", expected)
        conflicts += c
        unknown += [f"round_{k} {p}" for p in u]
    if unknown:
        log.warning("%s: %s on disk without a fingerprint (written before fingerprints existed): their "
                    "settings are not checked", run_dir, ", ".join(unknown))
    if not conflicts:
        return
    line = fingerprint.message(run_dir, conflicts)
    if s.run.on_change == "error":
        raise ConfigError(line)
    plan = fingerprint.rerun_plan(run_dir, conflicts)
    log.warning("run.on_change=rerun: %s", line.split(": use a new run.name")[0])
    for removed in fingerprint.apply_rerun(plan):
        log.warning("run.on_change=rerun: removed %s", removed)
    dropped = forget_steps(run_dir / "metrics.jsonl", plan.forgets)
    if dropped:
        log.warning("run.on_change=rerun: %d metrics.jsonl lines of the redone rounds dropped", dropped)


def run(cfg: DictConfig) -> dict:
    s = load_settings(cfg)
    run_dir = Path(s.run.dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(owned(run_dir))  # one invocation at a time; a killed one's children stopped
        except ValueError as err:
            raise ConfigError(str(err)) from None
        engine = make_engines(s, stack)  # launcher=local: Engine; ray: Ray actors (a missing ray package stops here)
        remove_stale_temps(run_dir)
        if s.run.search_from:
            same = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in SEARCH_FROM_MATCH}
            same["run.problems_per_round"] = s.run.problems_per_round
            try:
                copied = copy_round0_search(Path(s.run.search_from), run_dir, must_match=same)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            log.info("run.search_from=%s: copied %s", s.run.search_from, ", ".join(copied) or "nothing (already here)")
        task = make_task(s.task, s.tool)
        pool = task.problems()
        needed = s.run.rounds * s.run.problems_per_round
        if len(pool) < needed:
            raise ConfigError(f"task {task.name!r} has {len(pool)} problems; {s.run.rounds} rounds x "
                              f"{s.run.problems_per_round} problems need {needed}: "
                              "raise task.n or lower run.problems_per_round")
        flat = fingerprint.flatten(as_dict(s))
        check_resume(s, run_dir, pool, flat)
        config_text = OmegaConf.to_yaml(cfg, resolve=True)
        write_config(run_dir, config_text)
        tracker = stack.enter_context(contextlib.closing(
            Tracker(run_dir, s.tracking, run_name=s.run.name, config=as_dict(s))))
        return _rounds(s, run_dir, tracker, engine, task, pool, config_text, flat)


@dataclass(frozen=True)
class RoundContext:
    """What every round of a run shares: settings, resources and the fixed inputs of the phases."""
    s: Settings
    run_dir: Path
    engine: Engine
    task: Any
    pool: list
    config_text: str
    flat: dict
    formatter: PromptFormatter
    formatter_for: Callable[[Any], PromptFormatter]
    eval_tasks: dict
    params: int
    initial_path: str


def _eval_tasks(s: Settings) -> dict:
    """name -> (task, the problems evaluated on), fixed for the whole run."""
    out = {}
    for name, tcfg in s.eval_tasks.items():
        etask = make_task(tcfg, s.tool)
        out[name] = (etask, slice_problems(etask.problems(), s.eval.limit, s.eval.seed))
    return out


def round_compute(search: dict, train: dict, results: dict, params: int, value: dict | None = None) -> dict:
    """A round's compute.json: each phase's FLOPs and tokens, and the round's total (the value model's
    training only when the round trained one)."""
    compute = {
        "search": search.get("compute", {}),
        "train": phase_record(params, train_tokens=int(train.get("tokens", 0))),
        "eval": {name: r["compute"] for name, r in results.items()},
    }
    if value and value.get("tokens"):
        compute["value"] = phase_record(params, train_tokens=int(value["tokens"]))
    compute["total_flops"] = compute["search"].get("flops", 0.0) + compute["train"]["flops"] + sum(
        c["flops"] for c in compute["eval"].values()) + compute.get("value", {}).get("flops", 0.0)
    return compute


def round_metrics(search: dict, stats: dict, value: dict, train: dict, results: dict, compute: dict,
                  cumulative_flops: float, times: dict) -> dict:
    """The round's line in metrics.jsonl and wandb."""
    value_keys = ("examples", "pairs", "final_loss", "pair_accuracy")
    return {
        **{f"value/{key}": value[key] for key in value_keys if value.get(key) is not None},
        "search/trees": search.get("trees", 0), "search/solved": search.get("solved", 0),
        "search/nodes": search.get("nodes", 0),
        **{f"pairs/{key}": v for key, v in stats.items() if isinstance(v, (int, float))},
        "train/loss": train.get("final_loss"), "train/reward_margin": train.get("reward_margin"),
        **eval_metrics(results),
        "compute/search_flops": compute["search"].get("flops", 0.0),
        "compute/train_flops": compute["train"]["flops"],
        "compute/round_flops": compute["total_flops"], "compute/cumulative_flops": cumulative_flops,
        "compute/generated_tokens": compute["search"].get("generated_tokens", 0),
        **{f"time/{key}_s": v for key, v in times.items()},
    }


def _round(c: RoundContext, k: int, policy_path: str) -> tuple[dict, list, dict, dict, dict, dict, str]:
    """Round k's phases (each skipped when its files are complete): search, pairs, value model, train,
    evaluation. Returns (search, pairs, value, train, eval results, phase times, the policy afterwards)."""
    s = c.s
    rd = round_dir(c.run_dir, k)
    rd.path.mkdir(parents=True, exist_ok=True)
    problems = round_problems(c.pool, s, k)
    written = []

    def begin(phase: str) -> dict:
        """A phase of round k does work: the round's config and the phase's fingerprint first."""
        if not written:
            write_text_atomic(rd.config, c.config_text)
            written.append(True)
        fps = fingerprint.round_fingerprints(c.flat, c.run_dir, k, problems, c.eval_tasks)
        if phase != "eval":
            fingerprint.record(rd.path, phase, fps[phase])
        return fps[phase]

    times = {}
    t0 = time.time()
    if rd.policy_complete():
        search = read_json(rd.search_done) if rd.search_done.is_file() else {}
    else:
        if not rd.search_done.is_file():
            begin("search")
        search = search_phase(s, rd, k, problems, policy_path, c.engine, c.task, c.formatter, c.params)
    times["search"] = time.time() - t0
    t0 = time.time()
    if rd.trees.is_file() and not rd.pairs.is_file():
        begin("pairs")
    pairs = pairs_phase(s, rd, k, c.formatter) if rd.trees.is_file() else []
    times["pairs"] = time.time() - t0
    t0 = time.time()
    if s.value and s.value.enabled and rd.trees.is_file() and not value_complete(rd.value):
        begin("value")
    value = value_phase(s, rd, k, policy_path, c.engine, c.formatter) if rd.trees.is_file() else {}
    times["value"] = time.time() - t0
    t0 = time.time()
    if not rd.policy_complete():
        begin("train")
    train = train_phase(s, rd, k, pairs, policy_path, c.initial_path, c.engine)
    times["train"] = time.time() - t0
    policy_path = train.get("policy", policy_path) if not train.get("skipped") else policy_path
    t0 = time.time()
    done = read_json(rd.eval) if rd.eval.is_file() else {}
    eval_fps = begin("eval") if any(name not in done for name in c.eval_tasks) else None
    results = eval_phase(s, rd.eval, policy_path, c.engine, c.eval_tasks, c.formatter_for, c.params,
                         eval_seed(s.run.seed), eval_fps) if c.eval_tasks else {}
    times["eval"] = time.time() - t0
    return search, pairs, value, train, results, times, policy_path


def _rounds(s: Settings, run_dir: Path, tracker: Tracker, engine: Engine, task, pool: list, config_text: str,
            flat: dict) -> dict:
    initial_path = resolve_model_path(s.model)
    tokenizer = load_tokenizer(initial_path)  # the tokenizer never changes across rounds
    c = RoundContext(s=s, run_dir=run_dir, engine=engine, task=task, pool=pool, config_text=config_text, flat=flat,
                     formatter=PromptFormatter(tokenizer, task, s.prompt),
                     formatter_for=lambda t: PromptFormatter(tokenizer, t, s.prompt), eval_tasks=_eval_tasks(s),
                     params=s.model.params or count_parameters(initial_path), initial_path=initial_path)

    history: list[dict] = []
    cumulative_flops = 0.0
    if s.run.evaluate_initial and c.eval_tasks:
        t0 = time.time()
        results = eval_phase(s, run_dir / "initial" / "eval.json", initial_path, engine, c.eval_tasks,
                             c.formatter_for, c.params, eval_seed(s.run.seed),
                             fingerprint.eval_fingerprints(flat, c.eval_tasks, "initial"))
        tracker.log({**eval_metrics(results), "time/eval_s": time.time() - t0}, step=0)
        history.append({"round": "initial", "eval": results})

    policy_path = initial_path
    for k in range(s.run.rounds):
        search, pairs, value, train, results, times, policy_path = _round(c, k, policy_path)
        rd = round_dir(run_dir, k)
        compute = round_compute(search, train, results, c.params, value)
        cumulative_flops += compute["total_flops"]
        if not (rd.compute.is_file() and read_json(rd.compute) == compute):  # a resumed run leaves it alone
            write_json_atomic(rd.compute, compute)
        stats = pair_stats(pairs)
        tracker.log(round_metrics(search, stats, value, train, results, compute, cumulative_flops, times),
                    step=k + 1)  # a round already in metrics.jsonl is not logged again
        history.append({"round": k, "search": search, "pairs": stats, "value": value, "train": train, "eval": results,
                        "flops": compute["total_flops"], "cumulative_flops": cumulative_flops})
    report = write_report(run_dir, history)
    print(report)
    return {"run_dir": str(run_dir), "history": history, "policy": policy_path}


@hydra.main(version_base=None, config_path="conf", config_name="iterate")
def main(cfg: DictConfig) -> None:
    quiet_console()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    main()
