"""Evaluate one model on one task: greedy (pass@1), sampling (majority@k, pass@k) or MCTS at
inference time (self-evaluation only, no gold answer in any prompt).

    python evaluate.py task=mawps_singleop eval.mode=greedy eval.limit=150
    python evaluate.py task=gsm8k_test model=local model.path=/models/mistral-7b backend=vllm \\
        eval.mode=sampling eval.k=16

Writes <out_dir>/eval.json (accuracy, 95% Wilson interval, per-problem records, tokens and FLOPs)
and prints a one-line summary.

Seeds as in iterate.py's evaluations, from the root seed 0 (evaluate.py has no run group;
harness/seeds.py): the engine seed derive_seed(0, "engine", backend.seed), the evaluation seed
derive_seed(0, "eval"). So the same settings sample the same way here and in a run with run.seed=0;
backend.seed=k gives another sample.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness.console import quiet_console
from harness.errors import exit_on_user_error
from harness.evaluation import evaluate_problems, slice_problems, summary_line
from harness.rundir import write_json_atomic
from harness.seeds import engine_config, eval_seed, root_seed
from harness.settings import load_settings
from policy.backends import make_backend
from policy.models import count_parameters, load_tokenizer, resolve_model_path
from policy.prompts import PromptFormatter
from tasks import make_task

log = logging.getLogger("evaluate")


def run(cfg: DictConfig) -> dict:
    s = load_settings(cfg)
    out_dir = Path(s.out_dir or ".")
    model_path = resolve_model_path(s.model)
    params = s.model.params or count_parameters(model_path)
    task = make_task(s.task, s.tool)
    problems = slice_problems(task.problems(), s.eval.limit, s.eval.seed)
    formatter = PromptFormatter(load_tokenizer(model_path), task, s.prompt)
    backend = make_backend(engine_config(s), model_path)
    try:
        result = evaluate_problems(task, problems, backend=backend, formatter=formatter, gen=s.generation,
                                   cfg=s.eval, search=s.search, params=params, seed=eval_seed(root_seed(s.run)),
                                   tool=s.tool)
    finally:
        backend.close()
    result["model"] = model_path
    write_json_atomic(out_dir / "eval.json", result)
    print(summary_line(result) + f"  -> {out_dir / 'eval.json'}")
    return result


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_console()
    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    main()
