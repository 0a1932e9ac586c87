"""experiments/bench_search.py at a small size on the tiny model: the accounting of its modes (same
budget, consistent token and call counts, scaling, ratios; the value comparison), not its speed."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ROOT, vllm_available
from fakes import FakePolicy, sum_problem
from mcts.search import SearchConfig, run_search
from mcts.types import ExpandRequest
from policy.backends import BackendConfig
from policy.prompts import PromptConfig
from policy.step_policy import GenerationConfig

TREES, SIMULATIONS = (1, 2), 2
SEQUENTIAL_TREES = 1
# A tiny random model almost never writes a newline; a space separator (half of all BPE tokens start with
# one) makes its samples end at step boundaries, so trees grow past the root.
PROMPT = PromptConfig(step_separator=" ")
SEARCH = SearchConfig(max_depth=2, breadth_root=2, breadth=2)
GENERATION = GenerationConfig(step_max_tokens=4, solution_max_tokens=6)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "experiments" / "bench_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def setup_for(model_dir: Path, backend: BackendConfig):
    from tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="arith_test", kind="arith", split="test", n=max(TREES) + bench.WARMUP_TREES,
                                difficulties=(1, 2)))
    return bench.Setup(model_path=str(model_dir), backend=backend, task=task, problems=tuple(task.problems()),
                       search=SEARCH, generation=GENERATION, prompt=PROMPT)


@pytest.fixture(scope="module")
def hf_result(tiny_model_dir):
    setup = setup_for(tiny_model_dir, BackendConfig(name="hf", dtype="float32", max_batch_size=64))
    points = [bench.Point(t, SIMULATIONS) for t in TREES]
    runs, engines = bench.run_benchmark(setup, points, sequential_trees=SEQUENTIAL_TREES)
    assert set(engines) == {bench.BATCHED, bench.SEQUENTIAL}
    meta = dict(bench.setup_meta(setup, points), base_trees=max(TREES), base_simulations=SIMULATIONS)
    return runs, bench.report(runs, meta=meta, engines=engines)


def by(runs, mode, trees):
    return next(r for r in runs if r.mode == mode and r.trees == trees)


def check_search_accounting(r) -> None:
    """What a search run reports agrees with itself and with the engine's own counts."""
    assert r.trees <= r.simulations_run <= r.trees * r.simulations  # the same budget; resolved trees stop early
    assert r.tree_prompt_tokens == r.prompt_tokens == r.expand_prompt_tokens + r.eval_prompt_tokens
    assert r.cached_tokens == r.expand_cached_tokens + r.eval_cached_tokens <= r.prompt_tokens
    # the engine's generated tokens = the trees' sampled tokens (+ the one token a vLLM self-evaluation generates)
    assert r.engine_generated_tokens in (r.generated_tokens, r.generated_tokens + r.evaluations)
    assert r.generated_tokens >= r.samples > 0
    # every tree expands its root once (breadth_root samples), later expansions sample `breadth`
    roots = r.trees * SEARCH.breadth_root
    assert roots <= r.samples <= roots + SEARCH.breadth * (r.expansions - r.trees)
    assert r.trees <= r.expansions <= r.simulations_run
    assert 0 < r.evaluations <= r.samples  # one per new child (duplicate samples merge)
    assert r.seconds > 0 and r.peak_rss_mb >= r.rss_before_mb > 0 and 0 < r.peak_own_rss_mb <= r.peak_rss_mb


def test_three_modes_grow_trees_with_the_same_budget_and_consistent_counts(hf_result):
    runs, _ = hf_result
    assert sorted((r.mode, r.trees) for r in runs) == sorted((m, t) for m in bench.MODES for t in TREES)
    for trees in TREES:
        batched, sequential, raw = (by(runs, m, trees) for m in bench.MODES)
        assert batched.simulations == sequential.simulations == raw.simulations == SIMULATIONS
        check_search_accounting(batched)
        assert batched.engine_calls < sequential.engine_calls
        # batched: one expand and one evaluate per wave, every tree in lockstep
        assert len(batched.calls) <= 2 * SIMULATIONS
        assert sum(c.samples for c in batched.calls) == batched.samples
        assert sum(c.generated_tokens for c in batched.calls) == batched.generated_tokens
        # raw: about as many sequences and tokens as the batched search sampled, in one call
        assert raw.engine_calls == 1 and raw.expansions == raw.evaluations == 0
        assert abs(raw.samples - batched.samples) <= trees / 2 + 1
        max_tokens = max(1, round(batched.generated_tokens / raw.samples))
        assert 0 < raw.generated_tokens <= raw.samples * max_tokens


def test_sequential_makes_one_request_per_call_and_is_scaled_from_a_subset(hf_result):
    runs, _ = hf_result
    measured = by(runs, bench.SEQUENTIAL, SEQUENTIAL_TREES)
    assert measured.measured_trees == SEQUENTIAL_TREES and measured.scale == 1.0
    check_search_accounting(measured)
    # one call per sampled candidate and per self-evaluation: the reference implementation's pattern
    assert measured.engine_calls == measured.samples + measured.evaluations
    assert measured.calls == ()
    big = by(runs, bench.SEQUENTIAL, max(TREES))
    factor = max(TREES) / SEQUENTIAL_TREES
    assert big.measured_trees == SEQUENTIAL_TREES and big.scale == factor
    assert big.measured_seconds == measured.measured_seconds
    for key in bench.EXTENSIVE:
        assert getattr(big, key) == pytest.approx(getattr(measured, key) * factor)


def test_report_ratios_and_json(hf_result, tmp_path):
    runs, result = hf_result
    assert [(q["trees"], q["simulations"]) for q in result["ratios"]] == [(t, SIMULATIONS) for t in TREES]
    for q in result["ratios"]:
        b, s = by(runs, bench.BATCHED, q["trees"]), by(runs, bench.SEQUENTIAL, q["trees"])
        assert q["speedup"] == pytest.approx(s.seconds / b.seconds)
        assert q["speedup_per_token"] == pytest.approx((b.generated_tokens / b.seconds)
                                                       / (s.generated_tokens / s.seconds))
        raw = by(runs, bench.RAW, q["trees"])
        assert q["overhead"] == pytest.approx(b.seconds * raw.generated_tokens / (raw.seconds * b.generated_tokens))
        assert all(math.isfinite(q[k]) and q[k] > 0 for k in ("speedup", "speedup_per_token", "overhead"))
    assert set(result["growth"]["by_trees"]) == {str(t) for t in TREES}
    text = json.dumps(result)  # strict JSON: no NaN
    assert "NaN" not in text and "speedup" in text and "overhead" in text
    assert f"sequential measured on {SEQUENTIAL_TREES} trees, scaled" in result["table"]
    assert bench.plot(result, tmp_path / "b.png", base_trees=max(TREES), base_simulations=SIMULATIONS).stat().st_size
    # --report-only: the same report from the written JSON
    path = tmp_path / "bench.json"
    path.write_text(text)
    again = bench.main(["--report-only", str(path), "--out", str(tmp_path / "again.json")])
    assert again["ratios"] == result["ratios"] and again["table"] == result["table"]


def test_one_at_a_time_splits_every_call():
    policy = FakePolicy()
    problems = [sum_problem([1, 2, 3], pid=f"p{i}") for i in range(2)]
    config = SearchConfig(simulations=4, batch_trees=1, breadth_root=3, breadth=2, max_depth=3)
    timed = bench.Timed(bench.OneAtATime(policy))
    trees = list(run_search(problems, expander=timed, evaluator=timed, verifier=policy, config=config))
    assert set(policy.expand_calls) == {1} and set(policy.evaluate_calls) == {1}
    assert all(r.n == 1 for r in policy.expand_log)
    assert len(policy.expand_calls) == timed.samples >= len(problems) * config.breadth_root
    assert len(policy.evaluate_calls) == sum(t.compute["evaluations"] for t in trees)
    assert len(timed.calls) == sum(t.compute["expansions"] for t in trees) + sum(
        c.kind == "evaluate" for c in timed.calls)
    merged = bench.OneAtATime(policy).expand([ExpandRequest(problems[0], (), n=3, seed=1)])[0]
    assert len(merged.samples) == 3 and merged.prompt_tokens == 3 * 10


def test_plan():
    star = bench.make_plan((8, 32), (4, 8), base_trees=32, base_simulations=8, full_grid=False)
    assert star == [bench.Point(32, 4), bench.Point(8, 8), bench.Point(32, 8)]
    assert len(bench.make_plan((8, 32), (4, 8), base_trees=32, base_simulations=8, full_grid=True)) == 4


@pytest.mark.slow  # an engine start: 20-70 s on 2 busy cores
@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_vllm_batched_and_raw_accounting(tiny_model_dir):
    backend = BackendConfig(name="vllm", dtype="float32", max_model_len=512, gpu_memory_utilization=0.1)
    setup = setup_for(tiny_model_dir, backend)
    points = [bench.Point(max(TREES), SIMULATIONS)]
    runs, engines = bench.run_benchmark(setup, points, modes=(bench.BATCHED, bench.RAW))
    assert engines[bench.BATCHED]["kv_cache_tokens"] > 0
    batched, raw = by(runs, bench.BATCHED, max(TREES)), by(runs, bench.RAW, max(TREES))
    check_search_accounting(batched)
    assert 0 < batched.cached_tokens < batched.prompt_tokens  # the prefix cache serves shared prompt heads
    assert raw.generated_tokens > 0


VALUE_MODES = (bench.BATCHED, bench.VALUE_MODEL, bench.NO_VALUE)


@pytest.fixture(scope="module")
def value_result(tiny_model_dir, tiny_value_dir):
    from policy.value_model import ValueConfig

    setup = replace(setup_for(tiny_model_dir, BackendConfig(name="hf", dtype="float32", max_batch_size=64)),
                    value_model=str(tiny_value_dir), value=ValueConfig(engine="hf", device="cpu", search_batch=4))
    point = bench.Point(max(TREES), SIMULATIONS)
    runs, engines = bench.run_benchmark(setup, [point], modes=VALUE_MODES)
    meta = dict(bench.setup_meta(setup, [point]), base_trees=point.trees, base_simulations=SIMULATIONS)
    return runs, engines, bench.report(runs, meta=meta, engines=engines)


def test_value_modes_search_at_the_same_budget_and_report_what_valuing_costs(value_result, tmp_path):
    runs, engines, result = value_result
    assert sorted(r.mode for r in runs) == sorted(VALUE_MODES)
    self_eval, model, none = (by(runs, m, max(TREES)) for m in VALUE_MODES)
    for r in (self_eval, model, none):
        assert r.simulations == SIMULATIONS and r.trees <= r.simulations_run <= r.trees * r.simulations
        assert r.value_calls == sum(c.kind == "evaluate" for c in r.calls)
        assert r.tree_prompt_tokens == r.expand_prompt_tokens + r.eval_prompt_tokens
    check_search_accounting(self_eval)
    assert self_eval.value_calls > 0 and self_eval.prompt_tokens == self_eval.tree_prompt_tokens
    # the value model answers the evaluate calls, not the engine: its tokens are the value calls' alone
    assert model.value_calls > 0 and model.evaluations > 0 and model.eval_prompt_tokens > 0
    assert model.prompt_tokens == model.expand_prompt_tokens and model.eval_cached_tokens == 0
    # one sample call per expand call here (breadth_root == breadth); a self-evaluation is one engine call more
    assert self_eval.engine_calls == sum(c.kind == "expand" for c in self_eval.calls) + self_eval.value_calls
    assert model.engine_calls == sum(c.kind == "expand" for c in model.calls)
    assert none.engine_calls == sum(c.kind == "expand" for c in none.calls)
    assert none.value_calls == none.evaluations == none.eval_prompt_tokens == none.evaluate_seconds == 0
    assert engines[bench.VALUE_MODEL]["served_by"] == "ValueModelEvaluator"
    assert engines[bench.VALUE_MODEL]["batch_size"] == 4
    costs = result["value"]
    assert [c["value"] for c in costs] == ["self_eval", "model", "none"]
    for c, r in zip(costs, (self_eval, model, none)):
        assert (c["seconds"], c["engine_calls"], c["value_calls"]) == (r.seconds, r.engine_calls, r.value_calls)
        assert (c["engine_prompt_tokens"], c["value_prompt_tokens"]) == (r.prompt_tokens, r.eval_prompt_tokens)
        assert c["value_share"] == pytest.approx(r.evaluate_seconds / r.seconds)
        assert c["vs_self_eval"] == pytest.approx(r.seconds / self_eval.seconds)
    assert 0 < costs[1]["value_share"] < 1 and costs[2]["value_share"] == 0
    assert "what values new children" in result["table"] and bench.VALUE_HEADER in result["table"]
    text = json.dumps(result)
    assert "NaN" not in text
    path = tmp_path / "bench.json"
    path.write_text(text)
    again = bench.main(["--report-only", str(path), "--out", str(tmp_path / "again.json")])
    assert again["value"] == costs and again["table"] == result["table"]


def test_value_model_mode_needs_a_trained_value_model(tiny_model_dir, tmp_path):
    setup = setup_for(tiny_model_dir, BackendConfig(name="hf", dtype="float32"))
    with pytest.raises(ValueError, match="needs --value-model"):  # before any engine starts
        bench.run_benchmark(replace(setup, value_model=str(tmp_path)), [bench.Point(1, 1)], modes=(bench.VALUE_MODEL,))
    with pytest.raises(SystemExit, match="needs --value-model"):
        bench.main(["--modes", "batched,value_model", "--out", str(tmp_path / "b.json")])
