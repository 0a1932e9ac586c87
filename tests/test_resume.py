"""Resume integrity (issue 16, docs/resume.md): phase fingerprints stop a re-run whose settings changed
before any work, run.on_change=rerun redoes the affected phases, allowed changes go on, each round is
logged once, and a run killed with SIGKILL mid-search resumes without losing or duplicating a tree.

The whole loop (iterate.run) runs in this process on the smoke preset's config with the scripted
policy of tests/fakes.py in place of the model, the engine, the trainer and the evaluator, so a round
takes milliseconds; `python experiments/kill_resume.py` does the same on the real smoke preset."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import iterate
from harness import fingerprint, jobs, launcher
from harness.config import ConfigError
from harness.rundir import owned, round_config
from harness.tracking import Tracker, TrackingConfig, forget_steps
from mcts.tree import read_trees
from tests.fakes import FakePolicy, sum_problem

ROOT = Path(__file__).resolve().parent.parent


def compose(run_dir: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="iterate", overrides=["experiment=smoke", f"run.dir={run_dir}",
                                                                "model.params=1000", *overrides])


@dataclass
class FakeTask:
    """A task of sums ("2+3+4") that the scripted policy can solve; problems depend on name and seed."""

    name: str
    n: int
    seed: int

    def problems(self):
        rng = random.Random(f"{self.name}/{self.seed}")
        return [sum_problem([rng.randint(1, 9) for _ in range(3)], pid=f"{self.name}-{i}") for i in range(self.n)]

    def extract(self, text):
        return FakePolicy().extract(text)

    def is_correct(self, predicted, problem):
        return FakePolicy().is_correct(predicted, problem)


class FakeFormatter:
    def __init__(self, tokenizer, task, cfg):
        self.cfg = cfg

    def question_prompt(self, problem):
        return f"Q: {problem.question}\n"

    def solution_prompt(self, problem, steps):
        return self.question_prompt(problem) + "".join(s + "\n" for s in steps)


@dataclass(frozen=True)
class FakeTrainResult:
    final_loss: float = 0.5
    reward_margin: float = 0.1
    tokens: int = 100


class Calls:
    """What the fakes were asked to do (per test)."""

    def __init__(self):
        self.engines = self.searches = self.trains = 0
        self.evals: list[str] = []
        self.step_delay = 0.0


@pytest.fixture
def calls(monkeypatch, tmp_path):
    c = Calls()
    base = tmp_path / "base-model"
    base.mkdir()

    class Backend:
        def load(self, path):
            pass

        def close(self):
            pass

    def make_backend(cfg, path):
        c.engines += 1
        return Backend()

    class Policy(FakePolicy):
        tool_stats: dict = {}

        def expand(self, requests):
            time.sleep(c.step_delay)
            return super().expand(requests)

    def step_policy(*args, **kwargs):
        c.searches += 1
        return Policy()

    def train(pairs, *, policy_path, ref_path, out_dir, cfg):
        c.trains += 1
        tmp = Path(out_dir).with_name(".policy.tmp-fake")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps({"trained_from": policy_path}))
        os.replace(tmp, out_dir)
        return FakeTrainResult()

    def evaluate(task, problems, **kwargs):
        c.evals.append(task.name)
        return {"task": task.name, "mode": "greedy", "accuracy": 0.5, "correct": len(problems) // 2,
                "n": len(problems), "ci95": [0.1, 0.9], "compute": {"flops": 1.0, "generated_tokens": 10}}

    monkeypatch.setattr(iterate, "resolve_model_path", lambda cfg: str(base))
    monkeypatch.setattr(iterate, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(iterate, "PromptFormatter", FakeFormatter)
    monkeypatch.setattr(iterate, "make_task", lambda cfg, tool=None: FakeTask(cfg.name, cfg.n, cfg.seed))
    monkeypatch.setattr(launcher, "make_backend", make_backend)
    monkeypatch.setattr(jobs, "StepPolicy", step_policy)
    monkeypatch.setattr(iterate, "train_dpo_subprocess", train)
    monkeypatch.setattr(jobs, "evaluate_problems", evaluate)
    monkeypatch.setattr(iterate, "write_report", lambda run_dir, history: "")
    return c


def metric_rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_changed_search_key_stops_before_any_work(calls, tmp_path):
    run_dir = tmp_path / "demo"
    iterate.run(compose(run_dir))
    assert calls.searches == 1 and calls.trains == 1
    stored = json.loads((run_dir / "round_0" / "fingerprints.json").read_text())
    assert stored["search"]["search.simulations"] == 4 and set(stored["eval"]) == {"arith_test", "mawps_singleop"}
    before = (run_dir / "config.yaml").read_text()
    engines, evals = calls.engines, len(calls.evals)
    with pytest.raises(ConfigError) as err:
        iterate.run(compose(run_dir, "search.simulations=8"))
    line = str(err.value)
    assert "\n" not in line
    assert f"{run_dir / 'round_0'} was searched with search.simulations=4, now 8" in line
    assert "run.on_change=rerun" in line and "new run.name" in line
    assert (calls.searches, calls.engines, len(calls.evals)) == (1, engines, evals), "work began before the check"
    assert (run_dir / "config.yaml").read_text() == before, "a refused invocation rewrote config.yaml"
    assert len(list((run_dir / "configs").glob("*.yaml"))) == 1


def test_unchanged_rerun_logs_nothing_again_and_keeps_the_config_history(calls, tmp_path):
    run_dir = tmp_path / "demo"
    iterate.run(compose(run_dir))
    lines = (run_dir / "metrics.jsonl").read_text()
    assert metric_rounds(run_dir) == [0, 1]
    engines = calls.engines
    iterate.run(compose(run_dir, "tracking.project=elsewhere"))  # an ignored key
    assert (run_dir / "metrics.jsonl").read_text() == lines
    assert calls.searches == 1 and calls.trains == 1 and calls.engines == engines, "a finished run started an engine"
    history = sorted((run_dir / "configs").glob("*.yaml"))
    assert [p.name[:4] for p in history] == ["0001", "0002"]
    assert "elsewhere" in history[1].read_text() and (run_dir / "config.yaml").read_text() == history[1].read_text()
    # round 0 was made by the first invocation: its config is that one, not the latest
    assert round_config(run_dir, 0) == run_dir / "round_0" / "config.yaml"
    assert "elsewhere" not in round_config(run_dir, 0).read_text()
    assert round_config(run_dir, 5) == run_dir / "config.yaml"


def test_on_change_rerun_redoes_the_search_and_what_follows(calls, tmp_path):
    run_dir = tmp_path / "demo"
    iterate.run(compose(run_dir))
    initial = (run_dir / "initial" / "eval.json").stat().st_mtime_ns
    iterate.run(compose(run_dir, "search.simulations=8", "run.on_change=rerun"))
    assert calls.searches == 2 and calls.trains == 2
    trees = read_trees(run_dir / "round_0" / "trees.jsonl")
    assert len(trees) == 2 and all(t.meta["config"]["simulations"] == 8 for t in trees)
    stored = json.loads((run_dir / "round_0" / "fingerprints.json").read_text())
    assert stored["search"]["search.simulations"] == 8
    assert (run_dir / "initial" / "eval.json").stat().st_mtime_ns == initial, \
        "the initial eval does not depend on search"
    assert metric_rounds(run_dir) == [0, 1], "the redone round is logged once, the old line dropped"
    iterate.run(compose(run_dir, "search.simulations=8"))  # now it matches: nothing to do
    assert calls.searches == 2


def test_allowed_changes_go_on(calls, tmp_path):
    run_dir = tmp_path / "demo"
    iterate.run(compose(run_dir, "task.n=4"))
    # more rounds (task.n raised with them, which leaves round 0's problems as they were), a new
    # evaluation task and a larger eval batch decide nothing already done
    iterate.run(compose(run_dir, "task.n=6", "run.rounds=2", "eval.batch_size=7", "+task@eval_tasks.extra=arith_test",
                             "eval_tasks.extra.name=extra"))
    assert calls.searches == 2 and calls.trains == 2
    assert calls.evals.count("extra") == 3  # initial, round 0 (added) and round 1
    assert calls.evals.count("arith_test") == 3  # initial and round 0 once, round 1
    assert (sorted(json.loads((run_dir / "round_0" / "eval.json").read_text()))
            == ["arith_test", "extra", "mawps_singleop"])
    rounds = metric_rounds(run_dir)
    assert rounds == [0, 1, 0, 1, 2], rounds  # steps 0 and 1 again only for the new task's keys
    extra = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:4]
    assert all(set(m) == {"time", "round", "eval/extra/accuracy"} for m in extra)
    fps = json.loads((run_dir / "round_1" / "fingerprints.json").read_text())
    assert fps["train"]["checkpoint.start"] == "round_0/policy" and fps["train"]["checkpoint.reference"] == "initial"


def test_changed_evaluation_redoes_only_evaluations(calls, tmp_path):
    run_dir = tmp_path / "demo"
    iterate.run(compose(run_dir))
    trees = (run_dir / "round_0" / "trees.jsonl").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"initial was evaluated on arith_test with eval.limit=4, now 3"):
        iterate.run(compose(run_dir, "eval.limit=3"))
    iterate.run(compose(run_dir, "eval.limit=3", "run.on_change=rerun"))
    assert calls.searches == 1 and calls.trains == 1
    assert calls.evals.count("arith_test") == 4  # initial and round 0, twice each
    assert (run_dir / "round_0" / "trees.jsonl").stat().st_mtime_ns == trees
    assert all(r["n"] == 3 for r in json.loads((run_dir / "round_0" / "eval.json").read_text()).values())
    assert metric_rounds(run_dir) == [0, 1]


def test_an_old_run_without_fingerprints_warns_and_goes_on(calls, tmp_path, caplog):
    run_dir = tmp_path / "demo"
    iterate.run(compose(run_dir))
    for path in run_dir.rglob("fingerprints.json"):
        path.unlink()
    with caplog.at_level(logging.WARNING):
        iterate.run(compose(run_dir, "search.simulations=8"))
    warned = [r.getMessage() for r in caplog.records if "without a fingerprint" in r.getMessage()]
    assert len(warned) == 1 and "round_0 search" in warned[0]
    assert calls.searches == 1
    assert not (run_dir / "round_0" / "fingerprints.json").exists(), "an unchecked phase was certified"


def test_search_from_carries_the_fingerprints(calls, tmp_path):
    source, run_dir = tmp_path / "source", tmp_path / "copy"
    iterate.run(compose(source))
    iterate.run(compose(run_dir, f"run.search_from={source}", "run.seed=3", "train.beta=0.2"))
    assert calls.searches == 1 and calls.trains == 2  # round 0's search was copied, its training is this run's
    stored = json.loads((run_dir / "round_0" / "fingerprints.json").read_text())
    assert stored["copied"] == ["pairs", "search"] and stored["search"]["run.seed"] == 0
    assert stored["train"]["train.beta"] == 0.2
    iterate.run(compose(run_dir, f"run.search_from={source}", "run.seed=3", "train.beta=0.2"))  # resumes cleanly
    with pytest.raises(ConfigError, match=r"round_0 was trained with train.beta=0.2, now 0.3"):
        iterate.run(compose(run_dir, f"run.search_from={source}", "run.seed=3", "train.beta=0.3"))


def test_a_second_invocation_on_a_busy_run_dir_is_refused(calls, tmp_path):
    run_dir = tmp_path / "demo"
    with owned(run_dir):
        with pytest.raises(ConfigError, match="in use by another invocation"):
            iterate.run(compose(run_dir))
    assert calls.engines == 0


def test_killed_mid_search_resumes_without_losing_or_duplicating_trees(calls, tmp_path):
    """SIGKILL a forked copy of the loop after its second tree, leave what a crash can leave (half a
    trees line, a half-saved checkpoint folder, an atomic write's temporary), and resume."""
    run_dir = tmp_path / "killed"
    args = ("task.n=6", "run.problems_per_round=6", "search.batch_trees=1", "run.evaluate_initial=false")
    calls.step_delay = 0.02
    trees_file = run_dir / "round_0" / "trees.jsonl"
    pid = os.fork()
    if pid == 0:  # the child: run the loop until killed
        code = 1
        try:
            iterate.run(compose(run_dir, *args))
            code = 0
        finally:
            os._exit(code)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (trees_file.is_file() and trees_file.read_text().count("\n") >= 2):
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child ended before it could be killed"
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    finally:
        os.waitpid(pid, 0)
    kept = [t.problem.id for t in read_trees(trees_file)]
    assert 2 <= len(kept) < 6 and not (run_dir / "round_0" / "search.json").exists()
    with trees_file.open("a") as out:
        out.write('{"problem": {"id": "half-writ')
    (run_dir / "round_0" / ".policy.tmp-abc123").mkdir()
    (run_dir / "round_0" / ".policy.tmp-abc123" / "config.json").write_text("{}")
    (run_dir / "round_0" / ".search.json.xyz").write_text("{")
    calls.step_delay = 0.0
    iterate.run(compose(run_dir, *args))
    ids = [t.problem.id for t in read_trees(trees_file)]
    assert len(ids) == 6 and len(set(ids)) == 6 and ids[:len(kept)] == kept
    assert not [p for p in (run_dir / "round_0").iterdir() if p.name.startswith(".")], "a temporary survived"
    assert (run_dir / "round_0" / "policy" / "config.json").is_file() and calls.trains == 1
    assert metric_rounds(run_dir) == [1]


# --- units -----------------------------------------------------------------------------------------


def test_tracker_logs_each_step_once_and_gives_wandb_the_step(tmp_path):
    class Wandb:
        def __init__(self):
            self.calls = []

        def log(self, data, step=None):
            self.calls.append((data, step))

        def finish(self):
            pass

    off = TrackingConfig(wandb=False, mode="disabled")
    first = Tracker(tmp_path, off, run_name="t")
    first._wandb = fake = Wandb()
    first.log({"a": 1.0}, step=1)
    first.log({"a": 2.0}, step=1)
    assert fake.calls == [({"a": 1.0}, 1)]
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"time": 1, "rou')  # killed mid-line
    again = Tracker(tmp_path, off, run_name="t")
    again.log({"a": 3.0, "b": 1.0}, step=1)
    again.log({"a": 1.0}, step=2)
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], sorted(set(r) - {"time", "round"})) for r in rows] == [(1, ["a"]), (1, ["b"]), (2, ["a"])]
    assert forget_steps(tmp_path / "metrics.jsonl", lambda step: step >= 2) == 1
    assert [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 1]


def test_rerun_plan_cascades_downstream(tmp_path):
    for k in range(3):
        (tmp_path / f"round_{k}").mkdir()
    train = fingerprint.Conflict("round_1", "train", "train.beta", 0.1, 0.2)
    ev = fingerprint.Conflict("round_0", "eval", "eval.limit", 4, 3, task="t")
    plan = fingerprint.rerun_plan(tmp_path, [ev, train])
    assert tmp_path / "round_2" in plan.remove and tmp_path / "round_1" / "policy" in plan.remove
    assert tmp_path / "round_1" / "trees.jsonl" not in plan.remove and tmp_path / "round_0" not in plan.remove
    assert plan.eval_tasks == ((tmp_path / "round_0", ("t",)),)
    assert [s for s in range(5) if plan.forgets(s)] == [1, 2, 3, 4]
    assert fingerprint.message(tmp_path, [ev, train]).startswith(
        f"{tmp_path / 'round_1'} was trained with train.beta=0.1, now 0.2 (and 1 more")


def test_a_leftover_training_job_of_the_run_is_stopped(tmp_path):
    """A DPO child outlives a SIGKILLed parent; the next invocation on the run directory kills it
    (recognised by its job file there), and leaves other processes alone."""
    import subprocess
    import sys

    run_dir = tmp_path / "demo"
    (run_dir / "round_0").mkdir(parents=True)
    sleep = [sys.executable, "-c", "import time; time.sleep(120)", "policy.train_main"]
    orphan = subprocess.Popen([*sleep, str(run_dir / "round_0" / ".policy.job-abc.json")])
    other = subprocess.Popen([*sleep, str(tmp_path / "elsewhere" / "round_0" / ".policy.job-abc.json")])
    try:
        with owned(run_dir):
            pass
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for proc in (orphan, other):
            proc.kill()
            proc.wait()
