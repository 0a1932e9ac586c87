"""End to end, as a user runs it: `python iterate.py experiment=smoke` (one round on the CPU with the
tiny model), killed mid-search and resumed, and the one-line errors a new user meets."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcts.tree import read_trees

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run_py(script: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_smoke_round_end_to_end(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "smoke"
    proc = run_py("iterate.py", "experiment=smoke", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = run_dir / "round_0"
    trees = read_trees(r0 / "trees.jsonl")
    assert len(trees) == 2 and len({t.problem.id for t in trees}) == 2
    assert all(len(t.nodes) > 1 for t in trees)
    pairs = [json.loads(line) for line in (r0 / "pairs.jsonl").read_text().splitlines()]
    assert pairs, "margin 0 on a random model's trees still yields pairs"
    assert {"prompt", "chosen", "rejected", "chosen_visits", "rejected_visits", "round"} <= set(pairs[0])
    assert (r0 / "policy" / "config.json").is_file()
    train = json.loads((r0 / "train.json").read_text())
    assert math.isfinite(train["final_loss"])  # neither NaN nor inf
    evals = json.loads((r0 / "eval.json").read_text())
    assert set(evals) == {"arith_test", "mawps_singleop"}
    assert all(r["n"] == 4 for r in evals.values())
    assert (run_dir / "initial" / "eval.json").is_file()
    compute = json.loads((r0 / "compute.json").read_text())
    assert compute["total_flops"] > 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("pairs/count" in m for m in metrics)
    assert (run_dir / "accuracy.png").is_file() and (run_dir / "summary.md").is_file()
    assert "round" in proc.stdout

    # The transfer check: the starting model and the final policy on another task, paired.
    out = tmp_path / "transfer"
    moved = run_py("experiments/transfer.py", str(run_dir), "--tasks", "arith_test,mawps_addsub", "--limit", "3",
                   "--out", str(out))
    assert moved.returncode == 0, moved.stderr[-3000:]
    for point in ("initial", "round_0"):
        done = json.loads((run_dir / "transfer" / point / "eval.json").read_text())
        assert set(done) == {"arith_test", "mawps_addsub"} and all(r["n"] == 3 for r in done.values())
    assert "| mawps_addsub | smoke (round_0) | 3 |" in moved.stdout and out.with_suffix(".md").is_file()

    # Re-running a finished run redoes nothing.
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json")}
    again = run_py("iterate.py", "experiment=smoke", f"run.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    for path, mtime in before.items():
        if path.name not in ("metrics.jsonl",):
            assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten on resume"


def test_killed_mid_search_resumes_without_losing_or_duplicating_trees(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["iterate.py", "experiment=smoke", f"run.dir={run_dir}", "run.problems_per_round=6", "task.n=6",
            "search.batch_trees=1", "search.simulations=8", "run.evaluate_initial=false"]
    trees_file = run_dir / "round_0" / "trees.jsonl"
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if trees_file.is_file() and trees_file.read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"finished or failed before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "round_0" / "search.json").exists(), "killed after the search finished"
    kept = [t.problem.id for t in read_trees(trees_file)]
    assert 2 <= len(kept) < 6
    # A crash while appending leaves half a line: it is dropped with a warning, nothing else is lost.
    with trees_file.open("a") as out:
        out.write('{"problem": {"id": "half-writ')
    resumed = run_py(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = [t.problem.id for t in read_trees(trees_file)]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert ids[:len(kept)] == kept, "trees found before the kill were redone"
    assert (run_dir / "round_0" / "policy" / "config.json").is_file()


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_wrong_model_path_is_one_line(tmp_path):
    line = one_error_line(run_py("evaluate.py", "model=local", f"model.path={tmp_path / 'nope'}", "backend=hf",
                                 "eval.limit=2"))
    assert "nope" in line


def test_config_key_typo_is_one_line(tmp_path):
    line = one_error_line(run_py("iterate.py", "experiment=smoke", f"run.dir={tmp_path}",
                                 "+search.simulatons=3"))
    assert "simulatons" in line


def test_search_from_a_missing_run_is_one_line(tmp_path):
    line = one_error_line(run_py("iterate.py", "experiment=smoke", f"run.dir={tmp_path / 'run'}",
                                 f"run.search_from={tmp_path / 'elsewhere'}"))
    assert "run.search_from" in line and "elsewhere" in line and "no config.yaml" in line


def test_vllm_missing_is_one_line(tiny_model_dir, tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "vllm.py").write_text("raise ImportError('No module named vllm')\n")
    proc = run_py("evaluate.py", "model=tiny-random", "backend=vllm", "eval.limit=2",
                  f"out_dir={tmp_path / 'out'}", env={"PYTHONPATH": str(fake)})
    line = one_error_line(proc)
    assert "vllm" in line and "backend=hf" in line


def test_malformed_data_file_names_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "What is 1 + 1?", "target": 2}\n{"input": broken\n')
    proc = run_py("evaluate.py", "model=tiny-random", "backend=hf", "task=mawps_singleop", f"task.path={bad}",
                  f"out_dir={tmp_path / 'out'}")
    line = one_error_line(proc)
    assert "bad.jsonl:2" in line


def test_value_model_round_trip(tiny_model_dir, tmp_path):
    """Issue 18 as a user runs it: round 0 trains a value model from its trees, round 1's search is
    guided by it (no self-evaluation), and the files say so."""
    run_dir = tmp_path / "value"
    proc = run_py("iterate.py", "experiment=smoke", f"run.dir={run_dir}", "run.rounds=2", "value.enabled=true",
                  "search.value=model", "value.train.epochs=1", "value.train.max_length=96", "eval.limit=2", "task.n=4",
                  "run.evaluate_initial=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = run_dir / "round_0", run_dir / "round_1"
    rows = [json.loads(line) for line in (r0 / "value.jsonl").read_text().splitlines()]
    assert rows and {r["kind"] for r in rows} <= {"example", "pair"}
    assert all(r["target"] == 0.0 for r in rows if r["kind"] == "example")  # the random model solves nothing
    result = json.loads((r0 / "value" / "value_result.json").read_text())
    assert result["examples"] == sum(r["kind"] == "example" for r in rows) and result["tokens"] > 0
    assert (r0 / "value" / "config.json").is_file()
    # round 0: no value model yet (value.before_model=none): only terminals carry a score, none from an evaluator
    for tree in read_trees(r0 / "trees.jsonl"):
        assert tree.meta["config"]["value"] == "none"
        assert all(n.self_eval is None for n in tree.nodes)
    search1 = json.loads((r1 / "search.json").read_text())
    assert search1["value_model"] == str(r0 / "value")
    trees1 = read_trees(r1 / "trees.jsonl")
    assert all(t.meta["config"]["value"] == "model" for t in trees1)
    scored = [n.self_eval for t in trees1 for n in t.nodes[1:]]
    assert scored and all(s is not None and 0.0 <= s <= 1.0 for s in scored)
    compute = json.loads((r0 / "compute.json").read_text())
    assert compute["value"]["flops"] > 0
    assert compute["total_flops"] >= compute["value"]["flops"] + compute["train"]["flops"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("value/examples") == result["examples"] for m in metrics)
    assert "round 0 value:" in proc.stdout + proc.stderr

    # Resume: the same command redoes nothing; with round 1 gone it searches round 1 again with the
    # value model on disk, to the same trees.
    trained = (r0 / "value" / "value_result.json").stat().st_mtime_ns
    before = (r1 / "trees.jsonl").read_bytes()
    again = run_py("iterate.py", *proc.args[2:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert (r0 / "value" / "value_result.json").stat().st_mtime_ns == trained
    import shutil

    shutil.rmtree(r1)
    resumed = run_py("iterate.py", *proc.args[2:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (r0 / "value" / "value_result.json").stat().st_mtime_ns == trained
    assert (r1 / "trees.jsonl").read_bytes() == before
