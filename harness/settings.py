"""The one conversion of a composed Hydra config into typed, validated settings (both entry points).

Every top-level key must be known; every group is built into its frozen dataclass (unknown keys are
errors naming the key); cross-field rules are checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from harness.config import ConfigError, build, to_container
from harness.evaluation import MODES, EvalConfig
from harness.launcher import LauncherConfig
from harness.tracking import TrackingConfig
from mcts.pairs import PairsConfig
from mcts.search import SearchConfig
from policy.backends import BackendConfig
from policy.dpo import TrainConfig
from policy.models import ModelConfig
from policy.prompts import PromptConfig
from policy.step_policy import GenerationConfig
from policy.value_model import ValueConfig
from tasks import TaskConfig
from tools.config import ToolConfig


@dataclass(frozen=True)
class RunConfig:
    """The `run` group (iterate.py).

    name: the run's name; the run directory is `dir`.
    dir: the run directory; re-running with the same directory resumes.
    rounds: rounds of search -> pairs -> train -> evaluate.
    problems_per_round: fresh training problems searched per round (on-policy).
    seed: the root of every seed (search, training, slicing).
    evaluate_initial: evaluate the starting policy once before round 0 (the baseline).
    search_from: a finished run directory whose initial evaluation and round-0 search and pairs this
        run copies before it starts (harness.rundir.copy_round0_search): runs given the same source
        train on the same pairs (loss_variants). Its model, task, search, pairs and problems per
        round must equal this run's.
    on_change: what a re-run does when a phase already on disk was started with other settings
        (harness/fingerprint.py, docs/resume.md): "error" stops before any work naming the keys;
        "rerun" deletes that phase's outputs and everything after them, and redoes them.
    """

    name: str = "demo"
    dir: str = "runs/demo"
    rounds: int = 2
    problems_per_round: int = 64
    seed: int = 0
    evaluate_initial: bool = True
    search_from: str | None = None
    on_change: str = "error"

    def __post_init__(self):
        if self.on_change not in ("error", "rerun"):
            raise ValueError(f"run.on_change={self.on_change!r}: expected error or rerun")


@dataclass(frozen=True)
class Settings:
    model: ModelConfig
    backend: BackendConfig
    prompt: PromptConfig
    generation: GenerationConfig
    search: SearchConfig
    eval: EvalConfig
    tool: ToolConfig = field(default_factory=ToolConfig)
    tracking: TrackingConfig | None = None
    task: TaskConfig | None = None
    eval_tasks: dict[str, TaskConfig] = field(default_factory=dict)
    pairs: PairsConfig | None = None
    train: TrainConfig | None = None
    value: ValueConfig | None = None
    launcher: LauncherConfig | None = None
    run: RunConfig | None = None
    out_dir: str | None = None


_GROUPS = {
    "model": ModelConfig, "backend": BackendConfig, "prompt": PromptConfig, "generation": GenerationConfig,
    "search": SearchConfig, "eval": EvalConfig, "tracking": TrackingConfig, "task": TaskConfig,
    "pairs": PairsConfig, "train": TrainConfig, "run": RunConfig, "tool": ToolConfig, "value": ValueConfig,
    "launcher": LauncherConfig,
}
_IGNORED = {"hydra", "experiment"}


def load_settings(cfg: Any) -> Settings:
    data: Mapping[str, Any] = to_container(cfg)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _IGNORED:
            continue
        if key in _GROUPS:
            kwargs[key] = build(_GROUPS[key], value, key)
        elif key == "eval_tasks":
            kwargs[key] = {name: build(TaskConfig, v, f"eval_tasks.{name}") for name, v in (value or {}).items()}
        elif key == "out_dir":
            kwargs[key] = value
        else:
            raise ConfigError(f"unknown top-level config key {key!r}: known are "
                              f"{', '.join(sorted([*_GROUPS, 'eval_tasks', 'out_dir']))}")
    missing = [g for g in ("model", "backend", "prompt", "generation", "search", "eval") if g not in kwargs]
    if missing:
        raise ConfigError(f"config is missing the group(s) {', '.join(missing)}")
    settings = Settings(**kwargs)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Cross-field rules."""
    if s.eval.mode not in MODES:
        raise ConfigError(f"eval.mode={s.eval.mode!r}: expected one of {', '.join(MODES)}")
    ranks = s.eval.mode == "best_of_n" or (s.eval.mode == "mcts" and s.search.value == "model")
    if ranks and not s.eval.value_model:
        raise ConfigError(f"eval.mode={s.eval.mode}" + (" with search.value=model" if s.eval.mode == "mcts" else "")
                          + " needs eval.value_model=<a trained value model folder, e.g. runs/<name>/round_0/value>")
    if s.eval.limit is not None and s.eval.limit <= 0:
        raise ConfigError(f"eval.limit={s.eval.limit}: must be positive or null")
    if s.launcher is not None and 0 < s.launcher.gpus_per_worker < s.backend.tensor_parallel_size:
        raise ConfigError(f"backend.tensor_parallel_size={s.backend.tensor_parallel_size} needs that many GPUs in "
                          f"each worker: set launcher.gpus_per_worker={s.backend.tensor_parallel_size}")
    if s.run is not None:
        if s.run.rounds < 0 or s.run.problems_per_round <= 0:
            raise ConfigError("run.rounds must be >= 0 and run.problems_per_round > 0")
        lacking = [g for g in ("task", "pairs", "train", "tracking") if getattr(s, g) is None]
        if lacking:
            raise ConfigError(f"iterate needs the {', '.join(lacking)} group(s)")
        if s.search.value == "model" and s.pairs.source != "sampling" and not (s.value and s.value.enabled):
            raise ConfigError("search.value=model searches with the value model each round trains: set "
                              "value.enabled=true (or search.value=self_eval|none)")
