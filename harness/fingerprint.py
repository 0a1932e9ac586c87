"""Phase fingerprints: the resolved config that decides each phase of a run, recorded when the phase
starts and checked on every re-run before any work (issue 16, "Resume integrity"; docs/resume.md).

A fingerprint is a flat dict of dotted config keys (and a few derived keys, `round.*` and
`checkpoint.*`) to resolved values. It is written to `<round_k or initial>/fingerprints.json` when a
phase starts, before its first output, so a phase that has any output on disk (even a half-finished
search) has the fingerprint of the config it was started with:

    {"search": {...}, "pairs": {...}, "train": {...}, "eval": {"<task>": {...}, ...},
     "copied": ["search", "pairs"]}     # phases copied by run.search_from (compared without run.seed)

On a re-run every started phase is compared with the current config (`check`); keys present on only
one side (a key added or removed by a newer version of the code) are not compared. A phase with output
but no fingerprint (a run directory from before fingerprints) is "unknown": warned about, never
failed, and never given the current fingerprint afterwards (that would certify a config nobody
checked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from harness.rundir import RoundDir, read_json, write_json_atomic

log = logging.getLogger(__name__)

PHASES = ("search", "pairs", "value", "train", "eval")
"""In the order they run; a changed phase invalidates itself and every later one."""

VERBS = {"search": "searched", "pairs": "paired", "value": "given a value model", "train": "trained",
         "eval": "evaluated"}

IGNORED = (
    "run.name", "run.dir",      # where the run lives, not what it does (ours)
    "run.rounds",               # more rounds extend a run; fewer stop earlier (ours)
    "run.evaluate_initial",     # whether the baseline row is made, not how (ours)
    "run.search_from",          # where round 0 came from; the copy carries its fingerprints (ours)
    "run.on_change",            # what to do about a change is not a change (ours)
    "out_dir",                  # evaluate.py only
    "backend",                  # the engine and how it runs (vLLM or transformers, devices, memory, seed):
                                # resuming a CPU run on a GPU engine is allowed; the trees on disk stand (ours)
    "tracking",                 # where metrics go (ours)
    "launcher",                 # one engine or Ray workers: where trees are searched, not how (harness/launcher.py)
    "eval.batch_size",          # problems per backend call: bounds memory, not results (harness/evaluation.py)
    "tool.sandbox.workers",     # programs run in parallel, not how each runs (tools/sandbox.py)
    "model.params",             # the FLOP ledger's parameter count only (policy/models.py)
    "task.n",                   # arith pool size: the round's problems are fingerprinted themselves (round.problems)
    "train.seed",               # replaced per round by a seed derived from run.seed (iterate.py)
    "train.logging_steps",      # how often the loss is logged (policy/dpo.py)
    "train.device",             # the hardware a run trains on (ours)
    "train.malloc_reuse",       # how the training process allocates memory, not what it computes (policy/dpo.py)
    "train.shared_prompt",      # one pass per pair's prompt: same log-probs up to rounding (policy/shared_prompt.py)
    "train.launcher",           # how training processes start; train.processes (the batch) is kept (policy/dpo.py)
    "train.accelerate_config",  # DDP, ZeRO-3 or FSDP: how ranks share the work, not the batch (policy/dpo.py)
)
"""Keys that decide nothing already done, so a re-run may change them: the one documented place
(docs/resume.md). An entry matches the key itself and every key below it."""

COPIED_IGNORED = ("run.seed",)
"""Keys not compared for a phase copied by `run.search_from`: copying another seed's search is the point."""

SEARCH_GROUPS = ("model", "task", "prompt", "generation", "search", "tool", "pairs.source", "pairs.samples",
                 "run.seed", "run.problems_per_round")
PAIRS_GROUPS = ("pairs",)
VALUE_GROUPS = ("value", "prompt", "run.seed")
TRAIN_GROUPS = ("train", "run.seed")
EVAL_GROUPS = ("eval", "model", "prompt", "generation", "tool", "run.seed")
"""What decides each phase (plus derived keys: round.problems, checkpoint.*). Evaluation adds its task's
`eval_tasks.<name>` and, in eval.mode=mcts, the search group."""


@dataclass(frozen=True)
class Conflict:
    """A started phase whose fingerprint differs from the current config at `key`."""

    where: str          # "round_0" or "initial"
    phase: str
    key: str
    then: Any
    now: Any
    task: str | None = None  # eval: the evaluation task


# --- building fingerprints -------------------------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists and scalars are values (JSON-normalised)."""
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.loads(json.dumps(data, default=str))} if prefix else {}


def _under(key: str, entries: Iterable[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


def ignored(key: str) -> bool:
    return _under(key, IGNORED)


def select(flat: Mapping[str, Any], groups: Iterable[str]) -> dict[str, Any]:
    groups = tuple(groups)
    return {k: v for k, v in flat.items() if _under(k, groups) and not ignored(k)}


def problems_digest(problems: Iterable[Any]) -> str:
    """Which problems a round searches: their count and a digest of (id, question, answer)."""
    rows = [json.dumps([p.id, p.question, p.answer]) for p in problems]
    return f"{len(rows)} problems, sha256 {hashlib.sha256(chr(10).join(rows).encode()).hexdigest()[:16]}"


def start_label(run_dir: Path, k: int) -> str:
    """The checkpoint round k starts from, as the run directory records it: the policy of the last
    earlier round that trained (round_<j>/policy), or "initial"."""
    for j in range(k - 1, -1, -1):
        train = RoundDir(Path(run_dir) / f"round_{j}").train
        if train.is_file() and not read_json(train).get("skipped"):
            return f"round_{j}/policy"
    return "initial"


def round_fingerprints(flat: Mapping[str, Any], run_dir: Path, k: int, problems: Iterable[Any],
                       eval_tasks: Iterable[str]) -> dict[str, Any]:
    """The current fingerprint of every phase of round k (eval: one per evaluation task)."""
    start = start_label(run_dir, k)
    reference = "initial" if flat.get("train.reference") == "initial" else start
    trained = f"round_{k}/policy"
    train_file = RoundDir(Path(run_dir) / f"round_{k}").train
    if train_file.is_file() and read_json(train_file).get("skipped"):
        trained = start  # no pairs: the policy was carried over
    return {
        "search": {**select(flat, SEARCH_GROUPS), "round.problems": problems_digest(problems)},
        "pairs": select(flat, PAIRS_GROUPS),
        "value": {**select(flat, VALUE_GROUPS), "checkpoint.start": start},
        "train": {**select(flat, TRAIN_GROUPS), "checkpoint.start": start, "checkpoint.reference": reference},
        "eval": eval_fingerprints(flat, eval_tasks, trained),
    }


def eval_fingerprints(flat: Mapping[str, Any], eval_tasks: Iterable[str], evaluated: str) -> dict[str, dict]:
    groups = EVAL_GROUPS + (("search",) if flat.get("eval.mode") == "mcts" else ())
    common = {**select(flat, groups), "checkpoint.evaluated": evaluated}
    return {name: {**common, **select(flat, (f"eval_tasks.{name}",))} for name in eval_tasks}


# --- what is on disk -------------------------------------------------------------------------------


FILE = "fingerprints.json"


def read(path: Path) -> dict[str, Any]:
    """The fingerprints stored in a round (or initial/) folder; {} if none."""
    file = Path(path) / FILE
    return read_json(file) if file.is_file() else {}


def started(path: Path) -> dict[str, Any]:
    """The phases of a round (or initial/) folder that have output on disk: {phase: True} and, for
    eval, {"eval": [task, ...]} (the tasks in eval.json)."""
    rd = RoundDir(Path(path))
    out: dict[str, Any] = {}
    if rd.search_done.is_file() or (rd.trees.is_file() and rd.trees.stat().st_size > 0):
        out["search"] = True
    if rd.pairs.is_file():
        out["pairs"] = True
    if rd.value_data.is_file() or rd.value.exists():
        out["value"] = True
    if rd.train.is_file():
        out["train"] = True
    if rd.eval.is_file():
        out["eval"] = sorted(read_json(rd.eval))
    return out


def record(path: Path, phase: str, fingerprint: dict[str, Any]) -> None:
    """Store `fingerprint` for `phase` (eval: {task: fingerprint}, merged) as the phase starts. A phase
    that already has output but no fingerprint stays unknown (not certified after the fact)."""
    path = Path(path)
    stored = read(path)
    done = started(path)
    if phase == "eval":
        known = dict(stored.get("eval", {}))
        new = {t: fp for t, fp in fingerprint.items() if t in known or t not in done.get("eval", [])}
        if all(known.get(t) == fp for t, fp in new.items()):
            return
        stored["eval"] = {**known, **new}
    else:
        if stored.get(phase) == fingerprint or (phase in done and phase not in stored):
            return
        stored[phase] = fingerprint
    write_json_atomic(path / FILE, stored)


def diff(then: Mapping[str, Any], now: Mapping[str, Any], skip: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, stored, current) for every key on both sides whose values differ (ignored keys aside)."""
    skip = tuple(skip)
    return [(k, then[k], now[k]) for k in sorted(then) if k in now and then[k] != now[k]
            and not ignored(k) and not _under(k, skip)]


def check_folder(path: Path, where: str, expected: Mapping[str, Any]) -> tuple[list[Conflict], list[str]]:
    """Compare the started phases of one folder with `expected` (round_fingerprints' shape, or
    {"eval": ...} for initial/). Returns the conflicts and the phases with output but no fingerprint."""
    stored, done = read(path), started(path)
    copied = stored.get("copied", [])
    conflicts, unknown = [], []
    for phase in PHASES:
        if phase not in done or phase not in expected:
            continue
        skip = COPIED_IGNORED if phase in copied else ()
        if phase == "eval":
            for task in done["eval"]:
                if task not in expected["eval"]:
                    continue  # no longer evaluated: its result stays on disk, unused
                then = stored.get("eval", {}).get(task)
                if then is None:
                    unknown.append(f"eval/{task}")
                    continue
                changed = diff(then, expected["eval"][task], skip)
                conflicts += [Conflict(where, phase, k, a, b, task) for k, a, b in changed]
        elif phase not in stored:
            unknown.append(phase)
        else:
            conflicts += [Conflict(where, phase, k, a, b) for k, a, b in diff(stored[phase], expected[phase], skip)]
    return conflicts, unknown


# --- reporting and redoing -------------------------------------------------------------------------


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def message(run_dir: Path, conflicts: list[Conflict]) -> str:
    """One line: the earliest changed phase (search before pairs before train before eval; earlier
    rounds first), its keys with both values, and what to do."""
    conflicts = sorted(conflicts, key=lambda c: (PHASES.index(c.phase), -1 if c.where == "initial"
                                                 else int(c.where.split("_")[1])))
    first = conflicts[0]
    same = [c for c in conflicts if (c.where, c.phase, c.task) == (first.where, first.phase, first.task)]
    keys = "; ".join(f"{c.key}={_value(c.then)}, now {_value(c.now)}" for c in same)
    what = VERBS[first.phase] + (f" on {first.task}" if first.task else "")
    more = len({(c.where, c.phase, c.task) for c in conflicts}) - 1
    tail = f" (and {more} more changed phase{'s' if more > 1 else ''})" if more else ""
    return (f"{Path(run_dir) / first.where} was {what} with {keys}{tail}: use a new run.name, or "
            f"run.on_change=rerun to redo the affected phases")


@dataclass(frozen=True)
class Rerun:
    """What `run.on_change=rerun` removes so that the affected phases are redone.

    remove: files and folders deleted; eval_tasks: (folder, tasks) whose results are dropped from
    eval.json; phases: (folder, phases) whose fingerprints are dropped; steps: metrics.jsonl rounds
    ("round" values) forgotten; from_step: every round from this one on is forgotten too."""

    remove: tuple[Path, ...] = ()
    eval_tasks: tuple[tuple[Path, tuple[str, ...]], ...] = ()
    phases: tuple[tuple[Path, tuple[str, ...]], ...] = ()
    steps: frozenset[int] = frozenset()
    from_step: int | None = None

    def forgets(self, step: int) -> bool:
        return step in self.steps or (self.from_step is not None and step >= self.from_step)


DOWNSTREAM = {
    "search": ("trees.jsonl", "search.json", "pairs.jsonl", "value.jsonl", "value", "policy", "train.json", "eval.json",
               "compute.json", "config.yaml"),
    "pairs": ("pairs.jsonl", "value.jsonl", "value", "policy", "train.json", "eval.json", "compute.json"),
    "value": ("value.jsonl", "value", "policy", "train.json", "eval.json", "compute.json"),
    "train": ("policy", "train.json", "eval.json", "compute.json"),
}


def rerun_plan(run_dir: Path, conflicts: list[Conflict]) -> Rerun:
    """The outputs to delete: a changed search, pairs or train phase of round k takes that phase and
    every later one of round k, and all later rounds (they start from round k's checkpoint); a
    changed evaluation takes only that evaluation."""
    run_dir = Path(run_dir)
    rounds = sorted({int(c.where.split("_")[1]) for c in conflicts if c.where != "initial" and c.phase != "eval"})
    remove: list[Path] = []
    phases: list[tuple[Path, tuple[str, ...]]] = []
    from_step = None
    if rounds:
        k = rounds[0]
        first = min((c.phase for c in conflicts if c.where == f"round_{k}" and c.phase != "eval"), key=PHASES.index)
        rd = run_dir / f"round_{k}"
        remove += [rd / name for name in DOWNSTREAM[first]]
        phases.append((rd, PHASES[PHASES.index(first):]))
        remove += sorted((p for p in run_dir.glob("round_*") if p.is_dir() and _index(p) > k), key=_index)
        from_step = k + 1
    evals: dict[str, set[str]] = {}
    for c in conflicts:
        removed = from_step is not None and c.where != "initial" and _index(run_dir / c.where) + 1 >= from_step
        if c.phase == "eval" and not removed:  # an evaluation of a round redone anyway needs nothing more
            evals.setdefault(c.where, set()).add(c.task)
    steps = frozenset(0 if where == "initial" else _index(run_dir / where) + 1 for where in evals)
    eval_tasks = tuple((run_dir / w, tuple(sorted(t))) for w, t in sorted(evals.items()))
    return Rerun(remove=tuple(remove), eval_tasks=eval_tasks, phases=tuple(phases), steps=steps, from_step=from_step)


def _index(path: Path) -> int:
    return int(path.name.split("_")[1])


def apply_rerun(plan: Rerun) -> list[str]:
    """Delete what `plan` names; returns a description of each removal (for the log)."""
    done = []
    for path in plan.remove:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        done.append(str(path))
    for folder, phases in plan.phases:
        stored = read(folder)
        if any(p in stored for p in phases):
            kept = {k: v for k, v in stored.items() if k not in phases}
            if "copied" in kept:
                kept["copied"] = [p for p in kept["copied"] if p not in phases]
            write_json_atomic(folder / FILE, kept)
    for folder, tasks in plan.eval_tasks:
        rd = RoundDir(folder)
        if rd.eval.is_file():
            results = {t: r for t, r in read_json(rd.eval).items() if t not in tasks}
            if results:
                write_json_atomic(rd.eval, results)
            else:
                rd.eval.unlink()
        stored = read(folder)
        if "eval" in stored:
            stored["eval"] = {t: fp for t, fp in stored["eval"].items() if t not in tasks}
            write_json_atomic(folder / FILE, stored)
        done.append(f"{rd.eval} ({', '.join(tasks)})")
    return done
