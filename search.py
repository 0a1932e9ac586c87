"""Search a list of problems with a chosen backend and write the trees (and their HTML view).

    python search.py task=arith task.n=8 backend=hf search.simulations=16
    python search.py task=gsm8k eval.limit=20 model.path=/models/mistral-7b backend=vllm
    python search.py task=arith_test search.use_outcome=false    # inference-time: no gold anywhere

Writes <out_dir>/trees.jsonl (one tree per line, appended as trees finish; re-running resumes) and
<out_dir>/trees.html (open it in a browser). Problems: the task's, sliced by eval.limit / eval.seed.
Seeds as iterate.py's round 0 from the root seed 0 (search.py has no run group; harness/seeds.py): the
engine seed derive_seed(0, "engine", backend.seed), the search seed derive_seed(0, 0, "search").
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from harness.console import quiet_console
from harness.errors import exit_on_user_error
from harness.evaluation import slice_problems
from harness.rundir import truncate_partial_line
from harness.seeds import engine_config, root_seed, search_seed
from harness.settings import load_settings
from mcts.search import run_search
from mcts.tree import dumps_tree, read_trees
from mcts.viewer import write_html
from policy.backends import make_backend
from policy.models import load_tokenizer, resolve_model_path
from policy.prompts import PromptFormatter
from policy.step_policy import StepPolicy
from tasks import make_task

log = logging.getLogger("search")


def run(cfg: DictConfig) -> Path:
    s = load_settings(cfg)
    out_dir = Path(s.out_dir or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    trees_path = out_dir / "trees.jsonl"
    model_path = resolve_model_path(s.model)
    task = make_task(s.task, s.tool)
    problems = slice_problems(task.problems(), s.eval.limit, s.eval.seed)
    done = {t.problem.id for t in read_trees(trees_path)} if truncate_partial_line(trees_path) else set()
    todo = [p for p in problems if p.id not in done]
    if todo:
        backend = make_backend(engine_config(s), model_path)
        try:
            policy = StepPolicy(backend, PromptFormatter(load_tokenizer(model_path), task, s.prompt), s.generation,
                                eval_with_reference=s.search.eval_with_reference and s.search.use_outcome, tool=s.tool)
            with trees_path.open("a", encoding="utf-8") as out, \
                    tqdm(total=len(problems), initial=len(done), desc="search", unit="tree") as bar:
                for tree in run_search(todo, expander=policy, evaluator=policy, verifier=task, config=s.search,
                                       seed=search_seed(root_seed(s.run), 0)):
                    out.write(dumps_tree(tree) + "\n")
                    out.flush()
                    bar.update(1)
        finally:
            backend.close()
    trees = read_trees(trees_path)
    html_path = write_html(trees_path, out_dir / "trees.html")
    solved = sum(t.solved() for t in trees)
    print(f"{len(trees)} trees ({solved} with a correct terminal) -> {trees_path}; view: {html_path}")
    return trees_path


@hydra.main(version_base=None, config_path="conf", config_name="search_run")
def main(cfg: DictConfig) -> None:
    quiet_console()
    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    main()
