"""The cost of sharding the search over Ray workers (launcher=ray, harness/launcher.py) against one local
engine with the same hardware, on the same problems, and a projection for N engines from the measured
per-engine rate.

    python experiments/bench_launcher.py                 # vLLM, SmolLM2-135M, 32 problems: 2 workers x 1 core vs 1 x 2
    python experiments/bench_launcher.py --problems 8 --simulations 4 model=tiny-random backend=hf   # a minute
    python experiments/bench_launcher.py --workers 8 --gpus-per-worker 1 model=local \
        model.path=/models/mistral-7b-sft backend.gpu_memory_utilization=0.85   # one GPU node

Trailing `key=value` words are Hydra overrides of iterate.py's config (model, backend, search, ...).
Both runs search the same problems with harness.jobs.search_shard, the function `python iterate.py`
runs; engine start and a warm-up are timed apart from the search. Local: one Engine in this process
(on the CPU: every core this process may use). Ray: `--workers` EngineWorker actors (`--cpus-per-worker`
cores each, pinned; or `--gpus-per-worker` GPUs). With vLLM on the CPU the engine seed alone seeds
sampling, so the two runs' trees differ: compare generated tokens per second, not seconds alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

ROOT_DIR = Path(__file__).resolve().parent.parent
if str(ROOT_DIR) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT_DIR))

from harness.jobs import search_shard  # noqa: E402
from harness.launcher import Engine, RayEngines  # noqa: E402
from policy.backends.base import SamplingSettings  # noqa: E402

PROJECTED_ENGINES = (1, 2, 4, 8, 16, 32)  # ours: engine counts the projection is printed for


@dataclass(frozen=True)
class Warm:
    """A warm-up output: the engine serving the checkpoint has generated once."""

    ids: tuple[str, ...]


def warm_up(backend, problems: Sequence) -> Iterator[Warm]:
    backend.sample(["Warm up:"], SamplingSettings(n=1, max_tokens=4))
    for p in problems:
        yield Warm((p.id,))


@dataclass(frozen=True)
class Measured:
    """One launcher's run: engine start (and warm-up) and search, in seconds; what the search made."""

    launcher: str
    engines: int
    start_s: float
    search_s: float
    trees: int
    generated_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.search_s if self.search_s else 0.0

    @property
    def trees_per_s(self) -> float:
        return self.trees / self.search_s if self.search_s else 0.0


def measure(engine, launcher: str, engines: int, job, problems: Sequence, path: str) -> Measured:
    t0 = time.perf_counter()
    for _ in engine.run(warm_up, problems[:engines], path):
        pass
    started = time.perf_counter()
    trees = [done.tree for done in engine.run(job, problems, path)]
    searched = time.perf_counter()
    return Measured(launcher=launcher, engines=engines, start_s=started - t0, search_s=searched - started,
                    trees=len(trees), generated_tokens=sum(t.compute.get("generated_tokens", 0) for t in trees))


def sharding(local: Measured, ray: Measured) -> dict[str, float]:
    """Ray's cost against the local engine on the same hardware: extra search time and the ratio of
    generated tokens per second (1.0: no cost); the measured rate of one Ray engine."""
    return {"extra_time": ray.search_s / local.search_s - 1.0,
            "throughput_ratio": ray.tokens_per_s / local.tokens_per_s if local.tokens_per_s else 0.0,
            "per_engine_tokens_per_s": ray.tokens_per_s / ray.engines}


def projection(per_engine_tokens_per_s: float, engines: Sequence[int] = PROJECTED_ENGINES) -> list[dict]:
    """Generated tokens per second for N engines, N x the measured per-engine rate: a projection that
    assumes enough problems for every engine's lockstep batch and nothing shared that saturates."""
    return [{"engines": n, "projected_tokens_per_s": n * per_engine_tokens_per_s} for n in engines]


def settings(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from harness.settings import load_settings

    with initialize_config_dir(config_dir=str(ROOT_DIR / "conf"), version_base=None):
        cfg = compose(config_name="iterate", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return load_settings(cfg)


def report(local: Measured, ray: Measured, meta: dict[str, Any]) -> dict:
    cost = sharding(local, ray)
    return {"meta": meta, "local": {**vars(local), "tokens_per_s": local.tokens_per_s},
            "ray": {**vars(ray), "tokens_per_s": ray.tokens_per_s}, "sharding": cost,
            "projection": projection(cost["per_engine_tokens_per_s"])}


def text(result: dict) -> str:
    m = result["meta"]
    rows = [f"bench_launcher: {m['problems']} problems, {m['model']} on {m['backend']}, "
            f"{m['simulations']} simulations, batch_trees {m['batch_trees']}",
            f"{'launcher':<8} {'engines':>7} {'start s':>8} {'search s':>9} {'trees':>6} {'gen tokens':>10} "
            f"{'tokens/s':>9}"]
    for key in ("local", "ray"):
        r = result[key]
        rows.append(f"{key:<8} {r['engines']:>7} {r['start_s']:>8.1f} {r['search_s']:>9.1f} {r['trees']:>6} "
                    f"{r['generated_tokens']:>10} {r['tokens_per_s']:>9.1f}")
    s = result["sharding"]
    rows.append(f"measured: sharding cost {100 * s['extra_time']:+.1f}% search time; Ray's tokens/s "
                f"{s['throughput_ratio']:.2f}x the local engine's; {s['per_engine_tokens_per_s']:.1f} tokens/s "
                "per Ray engine")
    rows.append("PROJECTION (not measured): N engines x the measured per-engine rate, assuming enough problems "
                "for every engine's batch and no shared bottleneck")
    rows += [f"  {p['engines']:>3} engines: {p['projected_tokens_per_s']:.0f} tokens/s" for p in result["projection"]]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=32, help="problems searched by each launcher (ours)")
    parser.add_argument("--simulations", type=int, default=None, help="search.simulations (default: the config's)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (the issue's two 1-core workers)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of iterate.py's config")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"search.simulations={args.simulations}"] if args.simulations else [])
    ray_overrides = ["launcher=ray", f"launcher.workers={args.workers}",
                     f"launcher.cpus_per_worker={args.cpus_per_worker}",
                     f"launcher.gpus_per_worker={args.gpus_per_worker}"]
    from policy.models import load_tokenizer, resolve_model_path
    from policy.prompts import PromptFormatter
    from tasks import make_task

    s, s_ray = settings(overrides), settings(overrides + ray_overrides)
    path = resolve_model_path(s.model)
    task = make_task(s.task, s.tool)
    problems = task.problems()[:args.problems]
    formatter = PromptFormatter(load_tokenizer(path), task, s.prompt)
    with tempfile.TemporaryDirectory() as tmp:
        job = partial(search_shard, s=s, run_dir=Path(tmp), k=0, task=task, formatter=formatter)
        engine = Engine(s)
        try:
            local = measure(engine, "local", 1, job, problems, path)
        finally:
            engine.close()
        engines = RayEngines(s_ray)
        try:
            ray = measure(engines, "ray", args.workers, job, problems, path)
        finally:
            engines.shutdown()
    meta = {"problems": len(problems), "model": s.model.name, "backend": s.backend.name,
            "simulations": s.search.simulations, "batch_trees": s.search.batch_trees, "workers": args.workers,
            "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker,
            "overrides": list(args.overrides)}
    result = report(local, ray, meta)
    print(text(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
