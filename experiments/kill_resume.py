"""kill -9 at a random moment in each phase of a smoke run, then the same command: does the run still
come out whole? (issue 16, "Resume integrity"; docs/resume.md)

    python experiments/kill_resume.py                     # every phase, 3-7 minutes on 2 CPU cores
    python experiments/kill_resume.py --phases search train --seed 3 --keep /tmp/kr

Runs `python iterate.py experiment=smoke` with four problems searched one tree at a time with 16
simulations each (OVERRIDES: so that trees finish one after another, seconds apart, and a kill can
land between them):

1. Two uninterrupted runs of the same seed (the references), timing when each phase starts and ends
   (a phase starts when its fingerprint is written, harness/fingerprint.py; it ends with its output:
   search.json, pairs.jsonl, train.json, compute.json after the round's evaluation).
2. For each phase: the same command in a new session (its own process group), SIGKILLed as a group
   at a uniformly random moment inside the phase (from its start, 10-90% of the references'
   duration); the pairs phase takes milliseconds, so for it the killed process runs iterate.py with
   each extract_pairs call delayed (PAIRS_DELAY_S, a timing change only); retried up to 3 times if
   the phase ended before the kill. Then the plain command again, to completion.
3. Checks: no process of the killed group survives; the resumed run exits 0; trees.jsonl holds one
   tree per problem, no duplicate, none of those written before the kill lost or redone; pairs.jsonl
   has the sha256 of the reference run's; the final checkpoint is whole (renamed into place with
   train_result.json), loads with transformers, is the one train.json names, and no temporary or
   half-written checkpoint is left; metrics.jsonl has each round once; no process of the resumed run
   is left either.

Prints a table of every check and exits 1 if any failed. Whether the two references agree (same
seed, same pairs: the backend's sampling is reproducible) is a row of its own; the search row's pairs
check also needs the engine to honour per-request seeds (harness/seeds.py, policy/backends/hf.py), so
that a resumed search samples its remaining trees as an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = 4
OVERRIDES = ("experiment=smoke", f"run.problems_per_round={PROBLEMS}", f"task.n={PROBLEMS}", "search.batch_trees=1",
             "search.simulations=16")
PHASES = ("search", "pairs", "train", "eval")
PAIRS_DELAY_S = 1.0  # added before each tree's pair extraction in the killed pairs run (ours)
ATTEMPTS = 3
TIMEOUT_S = 900

SLOW_PAIRS = f"""
import runpy, sys, time
import mcts.pairs
_extract = mcts.pairs.extract_pairs
def _slow(*args, **kwargs):
    time.sleep({PAIRS_DELAY_S})
    return _extract(*args, **kwargs)
mcts.pairs.extract_pairs = _slow  # before iterate.py imports it
sys.argv = ["iterate.py", *sys.argv[1:]]
runpy.run_path("iterate.py", run_name="__main__")
"""


def command(run_dir: Path, *, slow_pairs: bool = False) -> list[str]:
    args = [*OVERRIDES, f"run.name=kill_resume-{run_dir.name}", f"run.dir={run_dir}"]
    return [sys.executable, "-c", SLOW_PAIRS, *args] if slow_pairs else [sys.executable, "iterate.py", *args]


# --- watching a run ----------------------------------------------------------------------------------


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def phase_state(run_dir: Path) -> dict[str, tuple[bool, bool]]:
    """{phase: (started, ended)} for round 0, from the files on disk."""
    r0 = run_dir / "round_0"
    fps = read_json(r0 / "fingerprints.json") or {}
    ends = {"search": r0 / "search.json", "pairs": r0 / "pairs.jsonl", "train": r0 / "train.json",
            "eval": r0 / "compute.json"}
    return {p: (p in fps, ends[p].is_file()) for p in PHASES}


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (the child was started as its leader)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in "ZX":
            out.append(int(p.name))
    return out


def wait_gone(sid: int, timeout: float = 15.0) -> list[int]:
    deadline = time.time() + timeout
    while (left := session_processes(sid)) and time.time() < deadline:
        time.sleep(0.1)
    return left


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def timed_run(run_dir: Path, log: Path) -> tuple[int, dict[str, list[float]], list[int]]:
    """Run to completion, sampling when each phase starts and ends; returns (exit code, {phase:
    [start, end]} in seconds from launch, processes of its session left afterwards)."""
    t0 = time.time()
    proc = start(command(run_dir), log)
    marks: dict[str, list[float]] = {}
    while proc.poll() is None and time.time() - t0 < TIMEOUT_S:
        for phase, (begun, ended) in phase_state(run_dir).items():
            m = marks.setdefault(phase, [None, None])
            if begun and m[0] is None:
                m[0] = time.time() - t0
            if ended and m[1] is None:
                m[1] = time.time() - t0
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    code = proc.wait()
    return code, marks, wait_gone(proc.pid)


# --- checks ------------------------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[tuple[str, str, bool, str]] = field(default_factory=list)

    def check(self, phase: str, what: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((phase, what, bool(ok), detail))
        return ok

    def table(self) -> str:
        w0 = max(len(r[0]) for r in self.rows)
        w1 = max(len(r[1]) for r in self.rows)
        lines = [f"{'phase':<{w0}}  {'check':<{w1}}  result  detail", "-" * (w0 + w1 + 24)]
        lines += [f"{p:<{w0}}  {c:<{w1}}  {'PASS' if ok else 'FAIL':<6}  {d}" for p, c, ok, d in self.rows]
        return "\n".join(lines)


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def tree_ids(path: Path) -> list[str]:
    if not path.is_file():
        return []
    ids = []
    for line in path.read_text().splitlines():
        try:
            ids.append(json.loads(line)["problem_id"])
        except (ValueError, KeyError, TypeError):
            pass  # a half-written last line: dropped on resume
    return ids


def checkpoint_problems(run_dir: Path) -> list[str]:
    """What is wrong with round 0's checkpoint (empty: it is whole and loads)."""
    r0 = run_dir / "round_0"
    policy = r0 / "policy"
    problems = []
    train = read_json(r0 / "train.json") or {}
    if Path(train.get("policy", "")).resolve() != policy.resolve():
        problems.append(f"train.json names {train.get('policy')!r}")
    if not (policy / "train_result.json").is_file():
        problems.append("no train_result.json (written last, before the rename)")
    leftovers = sorted(p.name for p in r0.iterdir() if p.name.startswith(".policy"))
    if leftovers:
        problems.append(f"left over: {', '.join(leftovers)}")
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        AutoModelForCausalLM.from_pretrained(policy)
    except Exception as exc:  # any failure to load is the finding
        problems.append(f"does not load: {type(exc).__name__}: {str(exc)[:120]}")
    return problems


def kill_in(phase: str, run_dir: Path, duration: float, rng: random.Random, logs: Path) -> tuple[dict, list[int]]:
    """Start the command, SIGKILL its process group at a random moment inside `phase`; returns what
    happened and the processes of the group still alive afterwards."""
    proc = start(command(run_dir, slow_pairs=phase == "pairs"), logs / f"{run_dir.name}.killed.log")
    if phase == "pairs":
        duration = PAIRS_DELAY_S * PROBLEMS
    delay = rng.uniform(0.1, 0.9) * duration
    t0 = time.time()
    begun = None
    try:
        while proc.poll() is None and time.time() - t0 < TIMEOUT_S:
            started, ended = phase_state(run_dir)[phase]
            if started and begun is None:
                begun = time.time()
            if begun is not None and time.time() - begun >= delay:
                break
            time.sleep(0.005)
        state = phase_state(run_dir)[phase]
        trees = tree_ids(run_dir / "round_0" / "trees.jsonl")
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    left = wait_gone(proc.pid)
    ended = phase_state(run_dir)[phase][1]  # not ended by now: the kill came before the phase's output
    landed = alive and begun is not None and state[0] and not ended
    return {"landed": landed, "at": (time.time() - begun) if begun else None, "delay": delay,
            "trees_before": trees, "alive": alive}, left


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    if not Path("/proc").is_dir():
        print("error: needs Linux /proc (process groups are checked there)", file=sys.stderr)
        return 2
    base = args.keep or Path(tempfile.mkdtemp(prefix="kill_resume-"))
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    report = Report()
    t_all = time.time()
    try:
        refs = []
        for name in ("reference_a", "reference_b"):
            code, marks, left = timed_run(base / name, base / f"{name}.log")
            if not report.check("reference", f"{name} completes", code == 0 and not left,
                                f"exit {code}" + (f", left running: {left}" if left else "")):
                print(report.table())
                return 1
            refs.append(marks)
        ref_pairs = sha256(base / "reference_a" / "round_0" / "pairs.jsonl")
        same = ref_pairs == sha256(base / "reference_b" / "round_0" / "pairs.jsonl")
        report.check("reference", "two uninterrupted runs: same pairs", same,
                     f"sha256 {ref_pairs[:12]}" if same else "differ: the backend's sampling is not reproducible")
        ref_trees = tree_ids(base / "reference_a" / "round_0" / "trees.jsonl")
        durations = {p: min(m[p][1] - m[p][0] for m in refs) for p in PHASES}
        print("phase durations in the references (s): " + ", ".join(f"{p} {d:.1f}" for p, d in durations.items()),
              flush=True)

        for phase in args.phases:
            for attempt in range(1, ATTEMPTS + 1):
                run_dir = base / f"{phase}_{attempt}"
                killed, left = kill_in(phase, run_dir, durations[phase], rng, base)
                if killed["landed"] or attempt == ATTEMPTS:
                    break
                shutil.rmtree(run_dir, ignore_errors=True)
            at = f"{killed['at']:.2f} s into it" if killed["at"] is not None else "never started"
            report.check(phase, "SIGKILL landed inside the phase", killed["landed"], f"{at}, attempt {attempt}")
            report.check(phase, "no process of the killed group left", not left, f"left: {left}" if left else "")
            resumed_log = base / f"{run_dir.name}.resumed.log"
            with resumed_log.open("w") as out:
                resumed = subprocess.Popen(command(run_dir), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
                code = resumed.wait(timeout=TIMEOUT_S)
            after = wait_gone(resumed.pid)
            tail = resumed_log.read_text().strip().splitlines()[-1:] or [""]
            report.check(phase, "no process of the resumed run left", not after, f"left: {after}" if after else "")
            if not report.check(phase, "same command completes", code == 0,
                                f"exit {code}" + ("" if code == 0 else f": {tail[0][:100]}")):
                continue
            ids = tree_ids(run_dir / "round_0" / "trees.jsonl")
            before = killed["trees_before"]
            report.check(phase, "one tree per problem, none duplicated",
                         len(ids) == PROBLEMS and len(set(ids)) == PROBLEMS and set(ids) == set(ref_trees),
                         f"{len(ids)} trees, {len(set(ids))} distinct")
            report.check(phase, "trees found before the kill kept", ids[:len(before)] == before,
                         f"{len(before)} on disk at the kill")
            digest = sha256(run_dir / "round_0" / "pairs.jsonl")
            report.check(phase, "pairs.jsonl = the reference's (sha256)", digest == ref_pairs,
                         f"{(digest or 'missing')[:12]} vs {ref_pairs[:12]}")
            problems = checkpoint_problems(run_dir)
            report.check(phase, "checkpoint whole, loads, no temporary", not problems, "; ".join(problems))
            rounds = [json.loads(line).get("round") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            report.check(phase, "metrics.jsonl: each round once", sorted(rounds) == [0, 1], f"rounds {rounds}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(report.table())
    failed = [r for r in report.rows if not r[2]]
    print(f"\n{len(report.rows) - len(failed)}/{len(report.rows)} checks passed in {time.time() - t_all:.0f} s"
          + (f"; run directories kept in {base}" if args.keep else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
