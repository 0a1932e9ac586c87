"""Does a run's gain hold on wordings the project has never seen? Greedy accuracy of the starting model
and of each run's final policy on other tasks (SVAMP, the MAWPS files), with the paired difference
(same problems, before and after) and its 95% interval, per run and over the runs together.

    python experiments/transfer.py runs/demo-s0 runs/demo-s1 --out experiments/results/demo_transfer
    python experiments/transfer.py runs/demo --tasks svamp,mawps_addsub --limit 0     # every problem

Each run is evaluated with its own settings (config.yaml: model, prompt, generation, tool, evaluation
mode); only the tasks come from conf/task/<name>.yaml, and `--limit` problems of each (the same seeded
slice for every run and point, `eval.seed` of the run). The starting model is evaluated once per set of
runs that share it and its settings. Results go to <run>/transfer/<point>/eval.json (the eval.json
format, docs/formats.md; a task already there is not redone), and the table to <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parent.parent
if str(ROOT_DIR) not in sys.path:
    sys.path.insert(0, str(ROOT_DIR))

from omegaconf import OmegaConf  # noqa: E402

from harness.config import ConfigError, build  # noqa: E402
from harness.errors import exit_on_user_error  # noqa: E402
from harness.evaluation import slice_problems  # noqa: E402
from harness.rundir import write_json_atomic  # noqa: E402
from harness.seeds import eval_seed  # noqa: E402
from harness.settings import Settings, load_settings  # noqa: E402
from harness.stats import format_difference, outcomes, paired_difference  # noqa: E402
from iterate import Engine, eval_phase  # noqa: E402  (iterate.py's evaluation phase, resumable per task)
from policy.models import count_parameters, load_tokenizer, resolve_model_path  # noqa: E402
from policy.prompts import PromptFormatter  # noqa: E402
from tasks import TaskConfig, make_task  # noqa: E402

DEFAULT_TASKS = ("svamp", "mawps_addsub", "mawps_multiarith", "mawps_singleeq")  # wordings never trained or tuned on


def run_settings(run_dir: Path) -> Settings:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a run directory of iterate.py)")
    return load_settings(OmegaConf.load(path))


def task_config(name: str) -> TaskConfig:
    path = ROOT_DIR / "conf" / "task" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"--tasks: no task config {name!r} (conf/task/: {known})")
    return build(TaskConfig, OmegaConf.to_container(OmegaConf.load(path)), f"task {name}")


def final_policy(run_dir: Path, s: Settings) -> tuple[str, Path]:
    """(point name, checkpoint) of the last round that trained."""
    for k in reversed(range(s.run.rounds)):
        policy = run_dir / f"round_{k}" / "policy"
        if (policy / "config.json").is_file():
            return f"round_{k}", policy
    raise ConfigError(f"{run_dir}: no round has a trained policy yet (round_*/policy/config.json)")


def eval_key(s: Settings) -> str:
    """What decides the starting model's results: runs equal in it share one evaluation."""
    return json.dumps([asdict(x) for x in (s.model, s.prompt, s.generation, s.tool, s.eval, s.backend)],
                      sort_keys=True, default=str)  # greedy: no seed enters


def evaluate_point(s: Settings, model_path: str, out: Path, tasks: dict[str, TaskConfig], limit: int | None,
                   params: int) -> dict[str, dict]:
    """Greedy evaluation of `model_path` on every task not yet in `out`, through iterate.py's own
    evaluation phase (rewritten as each task finishes; one engine, started only if a task is left)."""
    s = replace(s, eval=replace(s.eval, mode="greedy"))
    tokenizer = load_tokenizer(model_path)
    eval_tasks = {}
    for name, tcfg in tasks.items():
        task = make_task(tcfg, s.tool)
        eval_tasks[name] = (task, slice_problems(task.problems(), limit, s.eval.seed))
    with contextlib.closing(Engine(s)) as engine:
        return eval_phase(s, out, model_path, engine, eval_tasks, lambda t: PromptFormatter(tokenizer, t, s.prompt),
                          params, eval_seed(s.run.seed))


def table(rows: list[dict]) -> str:
    head = "| task | run | problems | before | after | paired difference [95%] |"
    lines = [head, "|:---|:---|---:|---:|---:|:---|"]
    for r in rows:
        d = r["diff"]
        before = "-" if r["before"] is None else f"{100 * r['before']:.1f}%"
        after = "-" if r["after"] is None else f"{100 * r['after']:.1f}%"
        lines.append(f"| {r['task']} | {r['run']} | {d['problems']} | {before} | {after} | {format_difference(d)} |")
    return "\n".join(lines)


def transfer(run_dirs: list[Path], names: list[str], limit: int | None) -> list[dict]:
    tasks = {name: task_config(name) for name in names}
    runs = []
    for run_dir in run_dirs:
        s = run_settings(run_dir)
        runs.append((run_dir, s, *final_policy(run_dir, s)))
    initial: dict[str, dict] = {}  # eval_key -> results of the starting model
    rows = []
    pooled: dict[str, list] = {name: [] for name in names}
    for run_dir, s, point, policy in runs:
        model_path = resolve_model_path(s.model)
        params = s.model.params or count_parameters(model_path)
        key = eval_key(s)
        if key not in initial:
            initial[key] = evaluate_point(s, model_path, run_dir / "transfer" / "initial" / "eval.json", tasks, limit,
                                          params)
        else:  # the same starting model and settings: the same results, written for this run too
            write_json_atomic(run_dir / "transfer" / "initial" / "eval.json", initial[key])
        before = initial[key]
        after = evaluate_point(s, str(policy), run_dir / "transfer" / point / "eval.json", tasks, limit, params)
        for name in names:
            pair = (outcomes(before[name]), outcomes(after[name]))
            pooled[name].append(pair)
            rows.append({"task": name, "run": f"{run_dir.name} ({point})", "before": before[name]["accuracy"],
                         "after": after[name]["accuracy"], "diff": paired_difference([pair])})
    if len(runs) > 1:
        for name in names:
            rows.append({"task": name, "run": f"all {len(runs)} runs", "before": None, "after": None,
                         "diff": paired_difference(pooled[name])})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of iterate.py")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task configs (conf/task)")
    ap.add_argument("--limit", type=int, default=300, help="problems per task (seeded slice; 0 = all)")
    ap.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with exit_on_user_error():
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        rows = transfer(args.runs, names, args.limit or None)
    text = table(rows)
    print(text)
    if args.out:
        command = "python experiments/transfer.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(
            f"# Transfer: greedy accuracy before and after, on wordings never trained on\n\n"
            f"Generated by `{command}`; paired differences on the same problems (harness/stats.py).\n\n{text}\n")
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
