"""Cost of the sandbox for model-written programs (tools/sandbox.py), per call and in throughput.

    python experiments/bench_sandbox.py        # 100 calls per figure: experiments/results/bench_sandbox.json
    python experiments/bench_sandbox.py --calls 30 --out /tmp/bench_sandbox.json

Figures (wall seconds, this machine's isolation as isolation_report gives it, default SandboxConfig):
- bare interpreter: `python -I -c pass` (with site) and `python -I -S -c pass` (the sandbox's flags),
  started by subprocess.run with an empty environment: the floor under any fresh-process sandbox;
- run_program of a trivial program (`print(12 + 5)`), one call at a time: mean, median and p95;
- the same with each piece of isolation left out in turn (what each costs), one call at a time;
- run_programs of `--calls` trivial programs at workers=1 and workers=2: programs per second;
- run_program of a program that imports sympy (what a ToRA program that uses it pays on top).
Each figure has its CPU time per call too (this process and its waited-for children: launcher, init,
program), which a shared machine inflates less than wall time; the load average before and after is
recorded with the figures. Kernel work outside those processes (a network namespace's teardown runs in
a kernel worker) is in neither.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parent.parent
if str(ROOT_DIR) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT_DIR))

from tools import sandbox  # noqa: E402
from tools.sandbox import SandboxConfig, isolation_report, run_program, run_programs  # noqa: E402

DEFAULT_OUT = ROOT_DIR / "experiments" / "results" / "bench_sandbox.json"
TRIVIAL = "print(12 + 5)"


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for descendants (a call's launcher, init, program)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def summary(seconds: list[float], cpu: float) -> dict:
    """Wall time per call, and CPU time per call (what a busy machine does not inflate)."""
    s = sorted(seconds)
    p95 = s[min(len(s) - 1, int(0.95 * len(s)))]
    return {"calls": len(s), "mean_ms": round(1000 * statistics.mean(s), 2),
            "median_ms": round(1000 * s[len(s) // 2], 2), "p95_ms": round(1000 * p95, 2),
            "cpu_ms_per_call": round(1000 * cpu / len(s), 2)}


def bare(args: list[str], calls: int) -> dict:
    times, cpu = [], cpu_seconds()
    for _ in range(calls):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env={}, check=True)
        times.append(time.perf_counter() - start)
    return summary(times, cpu_seconds() - cpu)


def serial(code: str, cfg: SandboxConfig, calls: int, features: set[str] | None = None) -> dict:
    machine = sandbox._machine(cfg)
    times, cpu = [], cpu_seconds()
    for _ in range(calls):
        start = time.perf_counter()
        if features is None:
            result = run_program(code, cfg)
        else:
            result = sandbox._execute(code, cfg, machine, features)[0]
        times.append(time.perf_counter() - start)
        assert result.ok, result
    return summary(times, cpu_seconds() - cpu)


def throughput(cfg: SandboxConfig, calls: int, workers: int) -> dict:
    cfg = SandboxConfig(**{**cfg.__dict__, "workers": workers})
    start, cpu = time.perf_counter(), cpu_seconds()
    results = run_programs([TRIVIAL] * calls, cfg)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert all(r.ok for r in results)
    return {"workers": workers, "programs": calls, "wall_s": round(wall, 3), "programs_per_s": round(calls / wall, 1),
            "ms_per_program": round(1000 * wall / calls, 2), "cpu_ms_per_program": round(1000 * cpu / calls, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cfg = SandboxConfig()
    load_before = os.getloadavg()
    report = isolation_report(cfg)  # probes once, outside the timed regions
    run_program(TRIVIAL, cfg)  # warm-up
    features = set(sandbox._machine(cfg).features)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python experiments/bench_sandbox.py" + (" " + " ".join(argv) if argv else ""),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_before": [round(x, 2) for x in load_before]},
        "isolation": {"features": sorted(features), "warnings": report["warnings"]},
        "bare_python_I_ms": bare(["-I", "-c", "pass"], args.calls),
        "bare_python_I_S_ms": bare(["-I", "-S", "-c", "pass"], args.calls),
        "run_program_serial": serial(TRIVIAL, cfg, args.calls),
        "without_each_piece": {f"-{name}": serial(TRIVIAL, cfg, max(20, args.calls // 3), features - drop)
                               for name, drop in (("cgroup", {"cgroup"}), ("net", {"net"}), ("pid", {"pid", "proc"}),
                                                  ("mnt", {"mnt", "proc"}), ("all", features))
                               if drop & features},
        "run_programs": [throughput(cfg, args.calls, workers) for workers in (1, 2)],
    }
    if importlib.util.find_spec("sympy") is not None:
        result["run_program_import_sympy"] = serial("import sympy\nprint(sympy.sqrt(8))", cfg, 10)
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
