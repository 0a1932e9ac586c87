"""Greedy (or sampling) accuracy of one model on several tasks with one engine: the baseline table of
docs/results/baseline.md.

    python experiments/baseline_table.py                       # the committed table (default model, vLLM)
    python experiments/baseline_table.py --limit 50 --tasks arith_test,mawps_singleop --tools none,python
    python experiments/baseline_table.py --set model.path=runs/demo/round_1/policy --set model=local --out /tmp/t

Each task is composed from conf/evaluate.yaml exactly as `python evaluate.py task=<name>` would be
(`--set key=value` adds Hydra overrides to every task), so a row here equals that command's result.
Generated arithmetic is evaluated over every difficulty (1-4) and broken down by difficulty. Each task
runs once per `--tools` option (conf/tool: none = chain of thought, python = ToRA-style programs), so
the table has one accuracy column per tool, plus the share of programs that ran.
Writes <out>.json (every eval.json without per-problem records) and <out>.md (the table), and prints
the table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parent.parent
if str(ROOT_DIR) not in sys.path:
    sys.path.insert(0, str(ROOT_DIR))

from hydra import compose, initialize_config_dir  # noqa: E402

from harness.errors import exit_on_user_error  # noqa: E402
from harness.evaluation import evaluate_problems, slice_problems, summary_line  # noqa: E402
from harness.rundir import write_json_atomic  # noqa: E402
from harness.settings import load_settings  # noqa: E402
from policy.backends import make_backend  # noqa: E402
from policy.models import count_parameters, load_tokenizer, resolve_model_path  # noqa: E402
from policy.prompts import PromptFormatter  # noqa: E402
from policy.tool_use import ran_share  # noqa: E402
from tasks import make_task  # noqa: E402

log = logging.getLogger("baseline_table")

# (task config, extra overrides): every difficulty of the generated test split, then the real files
# that are cheap on the CPU (GSM8K and MATH need long solutions: still run, with the same limit).
DEFAULT_TASKS = ("arith_test_all", "mawps_singleop", "mawps_addsub", "mawps_multiarith", "mawps_singleeq", "svamp",
                 "gsm8k_test", "math")
ALIASES = {"arith_test_all": ("arith_test", ["task.difficulties=[1,2,3,4]", "task.n=400"])}


def task_overrides(name: str) -> list[str]:
    task, extra = ALIASES.get(name, (name, []))
    return [f"task={task}", *extra]


def compose_settings(name: str, limit: int | None, sets: list[str], tool: str = "none"):
    overrides = [*task_overrides(name), f"eval.limit={'null' if limit is None else limit}", f"tool={tool}", *sets]
    with initialize_config_dir(config_dir=str(ROOT_DIR / "conf"), version_base=None):
        cfg = compose(config_name="evaluate", overrides=overrides)
    return load_settings(cfg)


def _cell(r: dict | None) -> str:
    if r is None:
        return "- | -"
    low, high = r["ci95"]
    return f"{100 * r['accuracy']:.1f}% | {100 * low:.1f}-{100 * high:.1f}"


def table_markdown(rows: list[dict]) -> str:
    """One line per task: mode, problems, accuracy and interval per tool, programs that ran, difficulties."""
    tools = list(dict.fromkeys(r.get("tool_name", "none") for r in rows))
    head = "| task | mode | problems | " + " | ".join(f"accuracy ({t}) | 95% CI" for t in tools)
    head += " | programs ran | by difficulty |"
    lines = [head, "|:---|:---|---:|" + "---:|:---|" * len(tools) + "---:|:---|"]
    by_task: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_task.setdefault(r["label"], {})[r.get("tool_name", "none")] = r
    for label, per_tool in by_task.items():
        first = next(iter(per_tool.values()))
        ran = [f"{100 * ran_share(r['tool']):.0f}% of {r['tool']['calls']}"
               for r in per_tool.values() if r.get("tool", {}).get("calls")]
        levels = "; ".join(f"{t}: " + ", ".join(f"d{k} {100 * g['accuracy']:.0f}%"
                                                for k, g in r["by_difficulty"].items())
                           for t, r in per_tool.items() if r.get("by_difficulty"))
        cells = " | ".join(_cell(per_tool.get(t)) for t in tools)
        lines.append(f"| {label} | {first['mode']} | {first['n']} | {cells} | {', '.join(ran) or '-'} | {levels} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task configs (conf/task) "
                    "or arith_test_all")
    ap.add_argument("--limit", type=int, default=200, help="problems per task (seeded slice; 0 = all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Hydra override for every task")
    ap.add_argument("--tools", default="none,python", help="comma-separated conf/tool options, one column each")
    ap.add_argument("--out", default=str(ROOT_DIR / "experiments" / "results" / "baseline_greedy"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit or None
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    with exit_on_user_error():
        settings = {(name, tool): compose_settings(name, limit if name not in ALIASES else None, args.set, tool)
                    for name in names for tool in tools}
        first = settings[(names[0], tools[0])]
        model_path = resolve_model_path(first.model)
        params = first.model.params or count_parameters(model_path)
        tokenizer = load_tokenizer(model_path)
        backend = make_backend(first.backend, model_path)
        rows = []
        try:
            for (name, tool), s in settings.items():
                task = make_task(s.task, s.tool)
                problems = slice_problems(task.problems(), s.eval.limit, s.eval.seed)
                t0 = time.time()
                result = evaluate_problems(task, problems, backend=backend,
                                           formatter=PromptFormatter(tokenizer, task, s.prompt), gen=s.generation,
                                           cfg=s.eval, search=s.search, params=params, seed=s.eval.seed or 0,
                                           tool=s.tool)
                result.pop("records")
                result.update(label=name, tool_name=tool, overrides=task_overrides(name) + [f"tool={tool}", *args.set],
                              seconds=time.time() - t0)
                log.info("%s (%.0f s)", summary_line(result), result["seconds"])
                rows.append(result)
        finally:
            backend.close()
    out = Path(args.out)
    meta = dict(model=model_path, backend=first.backend.name, limit=limit, sets=args.set, tools=tools,
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json_atomic(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    md = table_markdown(rows)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(md)
    print(f"-> {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
