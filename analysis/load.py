"""Reading run directories: discovering them (an argument may be a run directory, a glob, or a folder
holding runs at any depth) and reading iterate.py runs (the initial policy and each round: eval,
compute, search, train, pairs and trees files) and evaluate.py outputs (eval.json + .hydra/config.yaml).
Files are read through the project's own readers (harness.rundir, mcts.pairs.read_pairs,
mcts.tree.read_trees) and answers graded with the run's own task (analysis.answers.eval_task).

Malformed inputs raise AnalysisError naming the file; a run with missing rounds is skipped with a
warning.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from analysis.answers import count_first_correct, count_run_on, eval_task
from analysis.groups import SEED_KEYS, idle_key, is_group_key
from analysis.pairs import (PairQuality, PairShape, RankingCheck, pair_quality, pair_shape, pairs_digest,
                            q_ranked_pairs, ranking_check)
from analysis.stats import cumulative
from harness.config import ConfigError
from harness.fingerprint import flatten
from harness.rundir import read_json, round_config, round_dir
from mcts.pairs import read_pairs
from mcts.tree import read_trees
from tasks.base import DataError
from tasks.task import AnswerTask

log = logging.getLogger("analyze")

INITIAL = "initial"


class AnalysisError(ValueError):
    """A missing or malformed input; the message names the file."""


@dataclass(frozen=True)
class EvalPoint:
    """One task's evaluation (one eval.json entry)."""

    task: str
    accuracy: float
    ci95: tuple[float, float]
    n: int
    correct: int
    flops: float
    mode: str = "greedy"
    k: int | None = None
    outcomes: Mapping[str, bool] = field(default_factory=dict, compare=False, repr=False)
    """problem id -> answered correctly (eval.json's records), for paired comparisons."""
    generated_tokens: int = 0
    """tokens the evaluated policy generated for the task (eval.json's compute)."""
    run_on: int | None = None
    """answers that go on after their first answer line (`runs_on`); None when records hold no outputs."""
    first_correct: int | None = None
    """answers right when graded at their first answer line (`first_answer`), as the search's terminal
    step ends; None when records hold no outputs or no gold."""

    @property
    def tokens_per_problem(self) -> float | None:
        return self.generated_tokens / self.n if self.n and self.generated_tokens else None

    @property
    def run_on_share(self) -> float | None:
        return self.run_on / self.n if self.n and self.run_on is not None else None

    @property
    def first_accuracy(self) -> float | None:
        return self.first_correct / self.n if self.n and self.first_correct is not None else None


@dataclass(frozen=True)
class TrainSummary:
    """The figures of train.json the analysis uses."""

    skipped: bool
    final_loss: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    mean_smoothing: float | None = None
    steps: int = 0
    pairs: int = 0
    loss_history: tuple[float, ...] = ()
    margin_history: tuple[float, ...] = ()
    accuracy_history: tuple[float, ...] = ()
    chosen_history: tuple[float, ...] = ()
    rejected_history: tuple[float, ...] = ()


# The reward curves of PREFIX_rewards.png: TrainSummary field, panel title.
REWARD_CURVES = (("margin_history", "reward margin (chosen - rejected)"), ("accuracy_history", "reward accuracy"),
                 ("chosen_history", "chosen reward"), ("rejected_history", "rejected reward"))


@dataclass(frozen=True)
class Point:
    """One evaluated policy of an iterate run: the initial one (position 0) or the one after round
    k (position k + 1), with what that round cost and produced."""

    position: int
    evals: Mapping[str, EvalPoint]
    search_flops: float = 0.0
    train_flops: float = 0.0
    total_flops: float = 0.0
    trees: int = 0
    search_generated_tokens: int = 0
    pairs: int | None = None
    pairs_digest: str | None = None
    quality: PairQuality | None = None
    q_ranked: PairQuality | None = None
    q_ranking: RankingCheck | None = None
    train: TrainSummary | None = None
    shape: PairShape | None = None

    @property
    def label(self) -> str:
        return INITIAL if self.position == 0 else f"round {self.position - 1}"


@dataclass(frozen=True)
class Run:
    """One run directory. kind: "iterate" (points: initial and one per round) or "evaluate"
    (evals: its one eval.json; train_flops: the evaluated model's training cost, None if unknown)."""

    path: Path
    kind: str
    config: Mapping[str, Any]
    points: tuple[Point, ...] = ()
    evals: tuple[EvalPoint, ...] = ()
    train_flops: float | None = 0.0

    @property
    def seed(self) -> tuple:
        return tuple(self.config.get(k) for k in SEED_KEYS)

    @property
    def group_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if is_group_key(k) and not idle_key(self.config, k)}


def read_json_file(path: Path) -> Any:
    """A JSON file through the project's reader (harness.rundir.read_json); its errors name the file."""
    try:
        return read_json(path)
    except FileNotFoundError:
        raise AnalysisError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise AnalysisError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def read_lines_file(path: Path, reader: Callable[[Path], list]) -> list:
    """A JSON-lines file through the project's own reader (mcts.pairs.read_pairs, mcts.tree.read_trees:
    their ValueErrors name the file and line)."""
    try:
        return reader(path)
    except (ValueError, KeyError, TypeError) as err:
        raise AnalysisError(str(err) if str(path) in str(err) else f"{path}: {err}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A Hydra config yaml as a flat dict (interpolations resolved where they can be)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise AnalysisError(f"{path}: missing") from None
    except Exception as err:  # yaml's errors name the line
        raise AnalysisError(f"{path}: not a valid config yaml ({err})") from None
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # e.g. ${hydra:...} outside Hydra: keep the raw strings
        data = OmegaConf.to_container(cfg, resolve=False)
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected a mapping")
    return {k: v for k, v in flatten(data).items() if v != {}}  # an empty group sets no key


def eval_point(name: str, data: Any, path: Path, task: AnswerTask | None = None) -> EvalPoint:
    """One eval.json result; `task`: the task it was graded with (`analysis.answers.eval_task`; None:
    the default task), which reads the records' answers at their first answer line."""
    task = task or eval_task({}, "task")
    prefix, answer_format, tool = task.answer_prefix, task.answer_format, task.style == "python"
    try:
        return EvalPoint(task=str(data.get("task", name)), accuracy=float(data["accuracy"]),
                         ci95=(float(data["ci95"][0]), float(data["ci95"][1])), n=int(data["n"]),
                         correct=int(data["correct"]), flops=float(data["compute"]["flops"]),
                         mode=str(data.get("mode", "greedy")), k=data.get("k"),
                         outcomes=record_outcomes(data.get("records") or [], f"{path}: entry {name!r}"),
                         generated_tokens=int(data["compute"].get("generated_tokens") or 0),
                         run_on=count_run_on(data.get("records"), prefix, tool),
                         first_correct=count_first_correct(data.get("records"), prefix, answer_format, tool))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise AnalysisError(f"{path}: entry {name!r} is not an evaluation result (missing or bad {err})") from None


def record_outcomes(records: Any, where: str) -> dict[str, bool]:
    """problem id -> correct, from eval.json records."""
    if not isinstance(records, list):
        raise AnalysisError(f"{where}: records is not a list")
    out = {}
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or "id" not in r or not isinstance(r.get("correct"), bool):
            raise AnalysisError(f"{where}: record {i} has no id or no true/false 'correct'")
        out[str(r["id"])] = r["correct"]
    return out


def read_evals(path: Path, config: Mapping[str, Any] | None = None) -> dict[str, EvalPoint]:
    """An iterate run's eval.json; `config` (flattened) gives each task's answer prefix and format."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected {{task: result}}")
    config = config or {}
    return {name: eval_point(name, r, path, graded_by(config, f"eval_tasks.{name}", path)) for name, r in data.items()}


def graded_by(config: Mapping[str, Any], key: str, path: Path) -> AnswerTask:
    """`analysis.answers.eval_task` of the results in `path`; a bad task config is an AnalysisError."""
    try:
        return eval_task(config, key)
    except (ConfigError, DataError, ValueError) as err:
        raise AnalysisError(f"{path}: the config of its task {key} is not valid ({err})") from None


def train_summary(data: Mapping[str, Any], path: Path) -> TrainSummary:
    if data.get("skipped"):
        return TrainSummary(skipped=True)
    try:
        return TrainSummary(skipped=False, final_loss=data.get("final_loss"), reward_margin=data.get("reward_margin"),
                            reward_accuracy=data.get("reward_accuracy"), mean_smoothing=data.get("mean_smoothing"),
                            steps=int(data.get("steps", 0)), pairs=int(data.get("pairs", 0)),
                            **{name: tuple(float(x) for x in data.get(name, ()))
                               for name in ("loss_history", *(n for n, _ in REWARD_CURVES))})
    except (TypeError, ValueError) as err:
        raise AnalysisError(f"{path}: malformed training result ({err})") from None


def phase_flops(compute: Mapping[str, Any], phase: str, path: Path) -> float:
    try:
        return float((compute.get(phase) or {}).get("flops", 0.0))
    except (TypeError, ValueError, AttributeError):
        raise AnalysisError(f"{path}: {phase}.flops is not a number") from None


def read_round(run_dir: Path, k: int, *, quality: bool = True, config: Mapping[str, Any] | None = None) -> Point:
    """Round k of a run (harness.rundir.round_dir's files), read with `config`, the flat config that
    produced it; `quality`: check the pairs against the trees (pair_quality, Q-ranked pairs)."""
    rd = round_dir(run_dir, k)
    config = config or {}
    compute = read_json_file(rd.compute)
    if not isinstance(compute, dict) or "total_flops" not in compute:
        raise AnalysisError(f"{rd.compute}: no total_flops")
    evals = read_evals(rd.eval, config) if rd.eval.is_file() else {}
    search = read_json_file(rd.search_done) if rd.search_done.is_file() else {}
    train = train_summary(read_json_file(rd.train), rd.train) if rd.train.is_file() else None
    pairs = read_lines_file(rd.pairs, read_pairs) if rd.pairs.is_file() else None
    q = q_ranked = q_ranking = None
    if quality and pairs is not None and rd.trees.is_file():
        trees = read_lines_file(rd.trees, read_trees)
        good: dict[str, set[int]] = {}  # each tree's correct nodes, computed once for the three checks
        q = pair_quality(trees, pairs, good)
        if config.get("pairs.source", "mcts") == "mcts":
            ranked = q_ranked_pairs(trees, config)
            q_ranked, q_ranking = pair_quality(trees, ranked, good), ranking_check(trees, ranked, good)
    return Point(
        position=k + 1,
        evals=evals,
        search_flops=phase_flops(compute, "search", rd.compute),
        train_flops=phase_flops(compute, "train", rd.compute),
        total_flops=float(compute["total_flops"]),
        trees=int(search.get("trees", 0)),
        search_generated_tokens=int((search.get("compute") or {}).get("generated_tokens", 0)),
        pairs=None if pairs is None else len(pairs),
        pairs_digest=None if pairs is None else pairs_digest(pairs),
        quality=q,
        q_ranked=q_ranked,
        q_ranking=q_ranking,
        train=train,
        shape=None if pairs is None else pair_shape(pairs, str(config.get("prompt.step_separator", "\n"))),
    )


def missing_round_files(run_dir: Path, rounds: int, needs_eval: bool) -> list[Path]:
    rounds_dirs = [round_dir(run_dir, k) for k in range(rounds)]
    return [
        p for rd in rounds_dirs for p in ((rd.compute, rd.eval) if needs_eval else (rd.compute,)) if not p.is_file()
    ]


def load_iterate_run(run_dir: Path, *, quality: bool = True) -> Run | None:
    """An iterate.py run directory, or None (with a warning) when a round is incomplete."""
    config = read_config_file(run_dir / "config.yaml")
    rounds = config.get("run.rounds")
    if not isinstance(rounds, int):
        raise AnalysisError(f"{run_dir / 'config.yaml'}: no run.rounds (not an iterate.py config)")
    needs_eval = any(k.startswith("eval_tasks.") for k in config)
    missing = missing_round_files(run_dir, rounds, needs_eval)
    if missing:
        log.warning("skipping %s: %s missing (run.rounds=%d; the run is incomplete)", run_dir,
                    ", ".join(str(p.relative_to(run_dir)) for p in missing[:3]) + (" ..." if len(missing) > 3 else ""),
                    rounds)
        return None
    points = []
    if (run_dir / INITIAL / "eval.json").is_file():
        points.append(Point(position=0, evals=read_evals(run_dir / INITIAL / "eval.json", config)))
    points.extend(read_round(run_dir, k, quality=quality, config=read_config_file(round_config(run_dir, k)))
                  for k in range(rounds))  # each round read with the config that produced it
    return Run(path=run_dir, kind="iterate", config=config, points=tuple(points))


def policy_training_flops(model_path: str | None) -> float | None:
    """Search + train FLOPs that produced a checkpoint at <run>/round_<k>/policy (rounds 0..k of its
    compute.json); 0 for a model that is no round's policy (the base model); None if unknown."""
    if not model_path:
        return 0.0
    p = Path(model_path)
    m = re.fullmatch(r"round_(\d+)", p.parent.name) if p.name == "policy" else None
    if m is None:
        return 0.0
    total = 0.0
    for j in range(int(m.group(1)) + 1):
        path = round_dir(p.parent.parent, j).compute
        if not path.is_file():
            log.warning("%s: missing, so the training FLOPs of %s are unknown", path, model_path)
            return None
        compute = read_json_file(path)
        total += phase_flops(compute, "search", path) + phase_flops(compute, "train", path)
    return total


def load_evaluate_run(out_dir: Path) -> Run:
    config = read_config_file(out_dir / ".hydra" / "config.yaml")
    data = read_json_file(out_dir / "eval.json")
    if not isinstance(data, dict):
        raise AnalysisError(f"{out_dir / 'eval.json'}: expected an evaluation result")
    point = eval_point(str(data.get("task", config.get("task.name", "task"))), data, out_dir / "eval.json",
                       graded_by(config, "task", out_dir / "eval.json"))
    return Run(path=out_dir, kind="evaluate", config=config, evals=(point,),
               train_flops=policy_training_flops(data.get("model") or config.get("model.path")))


def run_kind(path: Path) -> str | None:
    if (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or (path / INITIAL).is_dir()
                                              or any(path.glob("round_*"))):
        return "iterate"
    if (path / "eval.json").is_file() and (path / ".hydra" / "config.yaml").is_file():
        return "evaluate"
    return None


def discover(args: Sequence[str]) -> list[tuple[Path, str]]:
    """Run directories named by `args` (directories, globs, or folders holding runs at any depth)."""
    found: list[tuple[Path, str]] = []
    for arg in args:
        matches = sorted(glob.glob(arg)) or [arg]
        for m in map(Path, matches):
            if not m.is_dir():
                raise AnalysisError(f"{m}: not a directory")
            before = len(found)
            kind = run_kind(m)
            if kind:
                found.append((m, kind))
                continue
            for dirpath, dirnames, _ in os.walk(m):
                here = Path(dirpath)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "policy")
                kind = run_kind(here)
                if kind:
                    found.append((here, kind))
                    dirnames[:] = []
            if len(found) == before:
                raise AnalysisError(f"{m}: no run directory (config.yaml of iterate.py, or eval.json with "
                                    ".hydra/config.yaml of evaluate.py) there or below")
    unique = dict.fromkeys(found)
    return list(unique)


def load_runs(args: Sequence[str], *, quality: bool = True) -> list[Run]:
    runs = []
    for path, kind in discover(args):
        run = load_iterate_run(path, quality=quality) if kind == "iterate" else load_evaluate_run(path)
        if run is not None:
            runs.append(run)
    if not runs:
        raise AnalysisError("no complete run among " + " ".join(args))
    return runs


def point_flops(run: Run) -> list[float]:
    """Cumulative FLOPs at each point: 0 at the initial policy, then the running sum of each round's
    total_flops (search + train + eval, compute.json)."""
    rounds = [p.total_flops for p in run.points if p.position > 0]
    offset = [0.0] if run.points and run.points[0].position == 0 else []
    return offset + cumulative(rounds)


def training_flops_at(run: Run) -> dict[int, float]:
    """Cumulative search + train FLOPs that produced the policy at each position (0 at the initial)."""
    total, out = 0.0, {}
    for p in run.points:
        total += p.search_flops + p.train_flops
        out[p.position] = total
    return out
