"""One seed derivation for the project (harness/seeds.py), the entry points deriving alike, and
per-request seeds that act: the same seed grows the same trees on the transformers backend, another
seed other trees, and a prompt's samples do not depend on the prompts beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import job_settings
from harness import seeds
from harness.seeds import derive_seed, engine_config, eval_seed, search_seed

ROOT = Path(__file__).resolve().parent.parent


def test_derive_seed_is_stable_and_in_range():
    assert derive_seed(0, "p0", 0) == 31333713  # pinned: must not change between processes or versions
    values = {derive_seed(s, p, n) for s in range(3) for p in ("a", "b") for n in range(5)}
    assert len(values) == 30 and all(0 <= v < 2**seeds.SEED_BITS for v in values)
    assert derive_seed(1, "a") != derive_seed("1a") != derive_seed(1, "a", 0)


def test_every_caller_uses_the_shared_derivation():
    import iterate
    import mcts.sampling
    import mcts.search

    assert mcts.search.derive_seed is derive_seed and mcts.sampling.derive_seed is derive_seed
    assert iterate.derive_seed is derive_seed and iterate.engine_config is engine_config
    assert search_seed(3, 1) == derive_seed(3, 1, "search") and eval_seed(3) == derive_seed(3, "eval")


def test_evaluate_and_search_derive_the_engine_seed_as_iterate_with_run_seed_0():
    it = job_settings("iterate", ["run.seed=0", "backend.seed=5"])
    for name in ("evaluate", "search_run"):
        other = job_settings(name, ["backend.seed=5"])
        assert other.run is None and engine_config(other).seed == engine_config(it).seed
    assert engine_config(job_settings("iterate", ["run.seed=1", "backend.seed=5"])).seed != engine_config(it).seed
    assert engine_config(job_settings("evaluate", ["backend.seed=6"])).seed != engine_config(it).seed


def test_presets_leave_the_engine_seed_to_the_derivation():
    for path in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        assert "seed" not in (data.get("backend") or {}), f"{path.name} sets backend.seed"


# ---- per-request seeds on the transformers backend ----------------------------------------------


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    from policy.backends import BackendConfig, make_backend

    backend = make_backend(BackendConfig(name="hf", max_batch_size=4), str(tiny_model_dir))
    yield backend
    backend.close()


def _texts(completions):
    return [[s.text for s in c.samples] for c in completions]


def test_a_prompts_samples_depend_on_its_seed_only(hf_backend):
    from policy.backends import SamplingSettings

    prompts = ["The cat sat on the", "Question: what is 2 + 2?\nAnswer:", "Once upon a time"]
    settings = SamplingSettings(n=3, max_tokens=8, temperature=1.0, seeds=(11, 12, 13))
    batched = _texts(hf_backend.sample(prompts, settings))
    assert _texts(hf_backend.sample(prompts, settings)) == batched  # same seeds, same samples
    alone = _texts(hf_backend.sample(prompts[1:2], SamplingSettings(n=3, max_tokens=8, temperature=1.0, seeds=(12,))))
    assert alone == batched[1:2]  # neither the other prompts nor max_batch_size (4 < 9 rows) change them
    other = _texts(hf_backend.sample(prompts, SamplingSettings(n=3, max_tokens=8, temperature=1.0, seeds=(21, 22, 23))))
    assert other != batched
    assert len({t for row in batched for t in row}) > 3  # a prompt's n samples differ from each other
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        hf_backend.sample(prompts, SamplingSettings(n=1, max_tokens=2, seeds=(1, 2)))


def test_sampling_at_a_tiny_temperature_is_greedy(hf_backend):
    from policy.backends import SamplingSettings

    prompts = ["The cat sat on the", "Once upon a time"]
    greedy = _texts(hf_backend.sample(prompts, SamplingSettings(n=1, max_tokens=8, temperature=0.0)))
    cold = _texts(hf_backend.sample(prompts, SamplingSettings(n=1, max_tokens=8, temperature=1e-5, seeds=(1, 2))))
    assert cold == greedy  # the seeded sampler, not generate's own, picks the tokens


def _trees(tiny_model_dir, seed: int) -> list[str]:
    from mcts.search import SearchConfig, run_search
    from mcts.tree import dumps_tree
    from policy.backends import BackendConfig, make_backend
    from policy.models import load_tokenizer
    from policy.prompts import PromptConfig, PromptFormatter
    from policy.step_policy import GenerationConfig, StepPolicy
    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="arith_test", kind="arith", split="test", n=3))
    backend = make_backend(BackendConfig(name="hf", seed=0), str(tiny_model_dir))  # a fresh engine each time
    try:
        policy = StepPolicy(backend, PromptFormatter(load_tokenizer(str(tiny_model_dir)), task, PromptConfig()),
                            GenerationConfig(step_max_tokens=8, solution_max_tokens=16), eval_with_reference=True)
        config = SearchConfig(simulations=3, batch_trees=3, breadth_root=2, breadth=2, max_depth=3)
        trees = run_search(task.problems(), expander=policy, evaluator=policy, verifier=task, config=config, seed=seed)
        return sorted(dumps_tree(t) for t in trees)
    finally:
        backend.close()


def test_same_seed_same_trees_another_seed_other_trees(tiny_model_dir):
    first = _trees(tiny_model_dir, seed=search_seed(0, 0))
    assert _trees(tiny_model_dir, seed=search_seed(0, 0)) == first
    assert _trees(tiny_model_dir, seed=search_seed(1, 0)) != first  # same engine seed: the request seeds act


def test_sampled_evaluation_does_not_depend_on_the_batch(hf_backend, tiny_model_dir):
    from harness.evaluation import EvalConfig, evaluate_problems
    from mcts.search import SearchConfig
    from policy.models import load_tokenizer
    from policy.prompts import PromptConfig, PromptFormatter
    from policy.step_policy import GenerationConfig
    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="arith_test", kind="arith", split="test", n=3))
    formatter = PromptFormatter(load_tokenizer(str(tiny_model_dir)), task, PromptConfig())

    class Capture:
        """The backend, keeping each prompt's sampled texts."""

        def __init__(self):
            self.texts = {}

        def sample(self, prompts, settings):
            completions = hf_backend.sample(prompts, settings)
            self.texts.update({p: [s.text for s in c.samples] for p, c in zip(prompts, completions)})
            return completions

        def __getattr__(self, name):
            return getattr(hf_backend, name)

    def outputs(batch_size: int, seed: int) -> dict:
        backend = Capture()
        evaluate_problems(task, task.problems(), backend=backend, formatter=formatter,
                          gen=GenerationConfig(solution_max_tokens=8), params=1, seed=seed,
                          cfg=EvalConfig(mode="sampling", k=2, batch_size=batch_size), search=SearchConfig())
        assert len(backend.texts) == 3
        return backend.texts

    one_by_one = outputs(1, eval_seed(0))
    assert outputs(3, eval_seed(0)) == one_by_one  # eval.batch_size bounds memory, not results
    assert outputs(3, eval_seed(1)) != one_by_one
