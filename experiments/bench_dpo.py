"""DPO optimizer steps with train.shared_prompt=false (TRL's plain path: each prompt run with each
side, the LM head over every position) and true (policy/shared_prompt.py: each pair one row, its
shared prefix once, the head only where the loss reads), at the default TrainConfig on one round's pairs.

    python experiments/bench_dpo.py                  # the newest runs/**/round_0/pairs.jsonl, 3 steps after 1 warm-up
    python experiments/bench_dpo.py --pairs-file runs/demo_dev/samp64-s1/round_0/pairs.jsonl --out
    python experiments/bench_dpo.py --steps 1 --pairs 8   # a quick check that it runs

Per path: seconds to build the trainer (load the policy, precompute the reference log-probs over the
pairs used), seconds per optimizer step (forward, backward, optimizer; the warm-up steps left out),
token positions per step (plain: the rows' unpadded tokens, prompt counted with each side; shared:
prefix + chosen rest + rejected rest per pair), and the logged loss of every step. Printed: the ratios
and the largest loss difference between the paths (the same batches in the same order: it should be
float rounding). `--out` writes the figures as JSON (default experiments/results/bench_dpo.json).
The process re-executes itself with the training process's malloc settings (TrainConfig.malloc_reuse).
This is a benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parent.parent
if str(ROOT_DIR) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT_DIR))

from harness.machine import machine_info  # noqa: E402
from policy.dpo import MALLOC_ENV, TrainConfig, build_trainer, encode_pairs  # noqa: E402
from policy.models import ModelConfig, load_tokenizer, resolve_model_path  # noqa: E402

DEFAULT_OUT = ROOT_DIR / "experiments" / "results" / "bench_dpo.json"


def newest_pairs_file() -> Path:
    found = sorted((ROOT_DIR / "runs").glob("**/round_0/pairs.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no runs/**/round_0/pairs.jsonl: pass --pairs-file")
    return found[-1]


def read_pairs(path: Path, limit: int) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    return pairs[:limit]


def step_clock():
    """A TrainerCallback that keeps the wall seconds of each optimizer step in `.seconds`."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepClock()


class _PositionCounter:
    """Wraps the training collator: per batch, the positions the plain and the packed path process."""

    def __init__(self, base):
        self.base = base
        self.plain: list[int] = []
        self.shared: list[int] = []

    def __call__(self, examples):
        from policy.shared_prompt import pack_pairs

        batch = self.base(examples)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        self.plain.append(int(batch["attention_mask"].sum()))
        self.shared.append(pack_pairs(batch["input_ids"], batch["attention_mask"], labels).positions)
        return batch


def bench(pairs: list[dict], *, model: str, cfg: TrainConfig, steps: int, warmup: int) -> dict:
    tokenizer = load_tokenizer(model)
    encoded = encode_pairs(pairs, tokenizer, cfg=cfg)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as scratch:
        start = time.perf_counter()
        trainer = build_trainer(encoded, policy_path=model, ref_path=model, tokenizer=tokenizer, cfg=cfg,
                                output_dir=scratch)
        build_s = time.perf_counter() - start
        trainer.args.max_steps = warmup + steps  # cycles over the pairs when they hold fewer batches
        clock = step_clock()
        trainer.add_callback(clock)
        counter = _PositionCounter(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
        losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
        used = trainer.shared_prompt
    del trainer
    gc.collect()
    timed = clock.seconds[warmup:]
    per_step = cfg.grad_accum  # batches per optimizer step
    plain = [sum(counter.plain[i * per_step:(i + 1) * per_step]) for i in range(warmup, warmup + steps)]
    shared = [sum(counter.shared[i * per_step:(i + 1) * per_step]) for i in range(warmup, warmup + steps)]
    return {"shared_prompt": cfg.shared_prompt, "packed": used, "build_seconds": round(build_s, 2),
            "step_seconds": [round(s, 2) for s in timed], "seconds_per_step": round(sum(timed) / len(timed), 2),
            "positions_per_step": round(sum(shared if used else plain) / steps, 1),
            "plain_positions_per_step": round(sum(plain) / steps, 1), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs-file", type=Path, default=None, help="default: the newest runs/**/round_0/pairs.jsonl")
    ap.add_argument("--pairs", type=int, default=None,
                    help="pairs to use (default: enough for warm-up + steps, at most the file's)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per path")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    ap.add_argument("--model", default=None, help="default: the default ModelConfig's model folder")
    ap.add_argument("--out", type=Path, nargs="?", const=DEFAULT_OUT, default=None,
                    help=f"write the figures as JSON (default path {DEFAULT_OUT.relative_to(ROOT_DIR)})")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")

    base = TrainConfig()
    if base.malloc_reuse and any(k not in os.environ for k in MALLOC_ENV):  # as the training process runs
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    pairs_file = args.pairs_file or newest_pairs_file()
    per_step = base.batch_size * base.grad_accum
    pairs = read_pairs(pairs_file, args.pairs or (args.warmup + args.steps) * per_step)
    model = args.model or resolve_model_path(ModelConfig())
    print(f"{len(pairs)} pairs from {pairs_file}, model {model}, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.steps} timed steps of {per_step} pairs per path", flush=True)

    results = {}
    for shared in (False, True):
        name = "shared" if shared else "plain"
        results[name] = bench(pairs, model=model, cfg=replace(base, shared_prompt=shared), steps=args.steps,
                              warmup=args.warmup)
        r = results[name]
        print(f"{name:6s}: {r['seconds_per_step']:7.2f} s/step {r['step_seconds']}, "
              f"{r['positions_per_step']:7.1f} token positions/step, trainer built (reference precompute) in "
              f"{r['build_seconds']:.1f} s, losses {[round(v, 6) for v in r['losses']]}", flush=True)
    plain, shared = results["plain"], results["shared"]
    diffs = [abs(a - b) for a, b in zip(plain["losses"], shared["losses"])]
    summary = {"speedup": round(plain["seconds_per_step"] / shared["seconds_per_step"], 3),
               "positions_ratio": round(plain["positions_per_step"] / shared["positions_per_step"], 3),
               "build_speedup": round(plain["build_seconds"] / shared["build_seconds"], 3),
               "first_step_loss_abs_diff": diffs[0] if diffs else None,
               "max_loss_abs_diff": max(diffs) if diffs else None}
    print(f"ratio : {summary['speedup']:.2f}x seconds per step (plain / shared), {summary['positions_ratio']:.2f}x "
          f"token positions, {summary['build_speedup']:.2f}x trainer build; loss |plain - shared|: first step "
          f"{summary['first_step_loss_abs_diff']:.2e}, max over steps {summary['max_loss_abs_diff']:.2e}")
    if args.out:
        record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                  "machine": machine_info(),
                  "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                  "load_average": os.getloadavg(), "pairs_file": str(pairs_file), "pairs": len(pairs), "model": model,
                  "steps": args.steps, "warmup": args.warmup, "config": asdict(base), **results, **summary}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
