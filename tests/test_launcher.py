"""launcher=ray (issue 19, harness/launcher.py): sharding, the merge of evaluation parts, the config rules,
the one-line error without ray, and, with ray installed, the smoke round as a user runs it: the same
problems and pairs as launcher=local, a resumed search that skips the trees on disk, a worker killed
mid-search, and experiments/bench_launcher.py at a tiny size."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, job_settings
from experiments import bench_launcher as bench
from harness.config import ConfigError
from harness.evaluation import EvalConfig, evaluate_problems, merge_results
from harness.launcher import LauncherConfig, pick_worker, shard, worker_cores
from mcts.search import SearchConfig
from mcts.tree import read_trees
from policy.backends.base import Completion, Sample
from policy.step_policy import GenerationConfig
from tasks import TaskConfig, make_task


def test_shard_is_round_robin_and_covers_every_item_once():
    items = list(range(7))
    parts = shard(items, 3)
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for p in parts for x in p) == items
    assert shard([1], 3) == [[1], [], []]


def test_worker_cores_are_disjoint_slices():
    assert worker_cores([3, 1, 0, 2], 2, 2) == [(0, 1), (2, 3)]
    assert worker_cores([0, 1], 2, 1) == [(0,), (1,)]
    with pytest.raises(ConfigError, match="needs 4 cores; this machine gives 2"):
        worker_cores([0, 1], 2, 2)


def test_pick_worker_takes_the_least_busy_live_one():
    assert pick_worker([0, 2], {0: 2, 2: 1}) == 2
    assert pick_worker([1, 2], {}) == 1


def guess(prompt: str, rng: random.Random) -> str:
    """An answer to a generated arithmetic question: its first two numbers combined by a random operation."""
    a, b = (int(x) for x in re.findall(r"\d+", prompt)[:2])
    return str(rng.choice([a + b, a - b, a * b, a // max(b, 1)]))


class SeededBackend:
    """Answers drawn from each prompt's own seed: a problem's outputs do not depend on its batch."""

    name = "seeded"

    def sample(self, prompts, settings):
        out = []
        for prompt, seed in zip(prompts, settings.seeds):
            rng = random.Random(seed)
            samples = tuple(Sample(text=f"The answer is {guess(prompt, rng)}", num_tokens=rng.randint(3, 8),
                                   logprob=-1.0, finish_reason="stop") for _ in range(settings.n))
            out.append(Completion(samples, prompt_tokens=len(prompt.split()), cached_tokens=1))
        return out


class QuestionFormatter:
    def solution_prompt(self, problem, steps):
        return problem.question + "".join(steps)


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_merged_shards_equal_one_evaluation(mode):
    task = make_task(TaskConfig(name="arith_test", kind="arith", n=11, split="test"))
    problems = task.problems()
    kwargs = dict(backend=SeededBackend(), formatter=QuestionFormatter(), gen=GenerationConfig(),
                  cfg=EvalConfig(mode=mode, k=4, batch_size=3), search=SearchConfig(), params=1000, seed=7)
    whole = evaluate_problems(task, problems, **kwargs)
    parts = [evaluate_problems(task, part, **kwargs) for part in shard(problems, 3)]
    assert merge_results(parts[::-1], problems, params=1000) == whole
    assert whole["by_difficulty"] and 0 < whole["correct"] < whole["n"]  # the merge had something to recount
    with pytest.raises(ValueError, match="not the 11 problems"):
        merge_results(parts[:2], problems, params=1000)


def test_launcher_config_rules():
    s = job_settings("iterate", ["launcher=ray"])
    assert s.launcher == LauncherConfig(name="ray", workers=2, gpus_per_worker=0, cpus_per_worker=1, address="",
                                        max_restarts=1, restart_timeout_s=300)
    assert job_settings("iterate", []).launcher.name == "local"
    with pytest.raises(ConfigError, match="launcher.gpus_per_worker=2"):
        job_settings("iterate", ["launcher=ray", "launcher.gpus_per_worker=1", "backend.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="launcher.name='slurm'"):
        job_settings("iterate", ["launcher.name=slurm"])


def run_py(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_missing_ray_is_one_line(tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "ray.py").write_text("raise ImportError('No module named ray')\n")
    proc = run_py("iterate.py", "experiment=smoke", f"run.dir={tmp_path / 'run'}", "launcher=ray",
                  env={"PYTHONPATH": str(fake)})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "launcher=ray needs the ray package" in lines[0] and "launcher=local" in lines[0]
    assert not (tmp_path / "run" / "round_0").exists()


# --- with Ray, as a user runs it ---------------------------------------------------------------------

SMOKE = ["iterate.py", "experiment=smoke", "run.evaluate_initial=false"]
RAY = ["launcher=ray", "launcher.workers=2"]


def pair_keys(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "round_0" / "pairs.jsonl").read_text().splitlines()]
    return sorted((r["problem_id"], r["prompt"], r["chosen"], r["rejected"], round(r["gap"], 5)) for r in rows)


def tree_texts(run_dir: Path) -> dict[str, list]:
    return {t.problem.id: [(n.parent, n.text, n.terminal) for n in t.nodes]
            for t in read_trees(run_dir / "round_0" / "trees.jsonl")}


def without_timings(evals: dict) -> dict:
    """eval.json less the sandbox's wall times (they differ run to run with any launcher)."""
    return {name: {**r, "tool": {k: v for k, v in r.get("tool", {}).items() if "seconds" not in k}}
            for name, r in evals.items()}


@pytest.mark.slow
def test_ray_smoke_round_matches_local_and_resumes(tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    local, ray_run = tmp_path / "local", tmp_path / "ray"
    proc = run_py(*SMOKE, f"run.dir={local}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_py(*SMOKE, f"run.dir={ray_run}", *RAY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launcher=ray: 2 workers" in proc.stdout + proc.stderr
    ids = [t.problem.id for t in read_trees(ray_run / "round_0" / "trees.jsonl")]
    assert len(ids) == len(set(ids)) == 2
    # backend=hf seeds every request from (run.seed, round, problem id, node id): the same steps and pairs
    assert tree_texts(ray_run) == tree_texts(local)
    assert pair_keys(ray_run) == pair_keys(local) and pair_keys(local)
    evals = [json.loads((d / "round_0" / "eval.json").read_text()) for d in (local, ray_run)]
    assert without_timings(evals[1]) == without_timings(evals[0])

    # Resume with launcher=ray: a tree on disk (and half a line after it) is kept, the other searched.
    resumed = tmp_path / "resumed"
    (resumed / "round_0").mkdir(parents=True)
    first = (ray_run / "round_0" / "trees.jsonl").read_text().splitlines()[0]
    (resumed / "round_0" / "trees.jsonl").write_text(first + '\n{"problem_id": "half-wri')
    proc = run_py(*SMOKE, f"run.dir={resumed}", *RAY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 trees already on disk, searching the other 1" in proc.stdout + proc.stderr
    lines = (resumed / "round_0" / "trees.jsonl").read_text().splitlines()
    assert lines[0] == first and len(lines) == 2
    assert sorted(t.problem.id for t in read_trees(resumed / "round_0" / "trees.jsonl")) == sorted(ids)


def descendants(root: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        out += children
        frontier += children
    return out


def busy_workers(root: int) -> list[int]:
    """This run's Ray actors running a job (Ray titles them ray::EngineWorker.run)."""
    found = []
    for pid in descendants(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("ray::EngineWorker.run"):
            found.append(pid)
    return found


@pytest.mark.slow
def test_killed_worker_loses_only_its_unfinished_trees(tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    run_dir = tmp_path / "killed"
    trees_file = run_dir / "round_0" / "trees.jsonl"
    args = [*SMOKE, f"run.dir={run_dir}", *RAY, "run.problems_per_round=8", "task.n=8", "search.batch_trees=1",
            "search.simulations=12", "eval.limit=2"]
    log = tmp_path / "out.log"
    with log.open("w") as sink:  # a file, not a pipe: nothing blocks while the test watches
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and killed is None:
            if trees_file.is_file() and trees_file.read_text().count("\n") >= 1:
                workers = busy_workers(proc.pid)
                if workers:
                    killed = workers[0]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        assert killed is not None, "the search finished before a worker could be killed"
        assert not (run_dir / "round_0" / "search.json").exists(), "killed after the search finished"
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "died (" in out and "unfinished items go to worker" in out, out[-3000:]
    ids = [t.problem.id for t in read_trees(trees_file)]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert json.loads((run_dir / "round_0" / "search.json").read_text())["trees"] == 8
    assert (run_dir / "round_0" / "eval.json").is_file()


# --- experiments/bench_launcher.py -------------------------------------------------------------------


def test_bench_launcher_arithmetic():
    local = bench.Measured("local", 1, start_s=5.0, search_s=10.0, trees=8, generated_tokens=1000)
    ray = bench.Measured("ray", 2, start_s=20.0, search_s=11.0, trees=8, generated_tokens=990)
    cost = bench.sharding(local, ray)
    assert cost["extra_time"] == pytest.approx(0.1) and cost["throughput_ratio"] == pytest.approx(0.9)
    assert cost["per_engine_tokens_per_s"] == pytest.approx(45.0)
    assert bench.projection(45.0, (1, 8)) == [{"engines": 1, "projected_tokens_per_s": 45.0},
                                              {"engines": 8, "projected_tokens_per_s": 360.0}]


@pytest.mark.slow
def test_bench_launcher_runs_at_a_tiny_size(tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "bench.json"
    proc = run_py("experiments/bench_launcher.py", "--problems", "4", "--simulations", "2", "--out", str(out),
                  "model=tiny-random", "backend=hf", "tool=none", "generation.step_max_tokens=8",
                  "generation.solution_max_tokens=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["local"]["trees"] == result["ray"]["trees"] == 4
    assert result["local"]["engines"] == 1 and result["ray"]["engines"] == 2
    assert result["ray"]["generated_tokens"] > 0 and result["local"]["search_s"] > 0
    assert [p["engines"] for p in result["projection"]] == list(bench.PROJECTED_ENGINES)
    assert "PROJECTION (not measured)" in proc.stdout and "sharding cost" in proc.stdout
