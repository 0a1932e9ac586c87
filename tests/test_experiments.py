"""The experiment presets (conf/experiment/*.yaml) and their analysis (experiments/analyze.py): every
preset and every job of its sweep composes, with a unique run name; the analysis' pure parts on
hand-computed cases; the whole analysis on fabricated run directories and (slow) on real smoke runs."""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import ROOT, job_settings
from harness.seeds import engine_config
from mcts.pairs import PairsConfig, extract_pairs, read_pairs
from mcts.sampling import outcome_pairs
from mcts.tree import ROOT as ROOT_ID
from mcts.tree import Tree, dumps_tree
from mcts.types import Problem
from types import SimpleNamespace

import harness.stats as harness_stats

CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _analysis_namespace() -> SimpleNamespace:
    """Every public name of the analysis package's modules in one namespace (`an.<name>`)."""
    import analysis
    from analysis import answers, groups, load, pairs, plots, stats, summary, tables

    names = {}
    for module in (harness_stats, answers, groups, load, pairs, plots, stats, summary, tables):
        names.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    names["analyze"] = analysis.analyze
    return SimpleNamespace(**names)


an = _analysis_namespace()


# --- the presets ---------------------------------------------------------------------------------------


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The override lists of the jobs `python iterate.py -m experiment=<name>` launches (Hydra's basic
    sweeper: the preset's hydra.sweeper.params, cartesian product)."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="iterate", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return batch


def composed(overrides: list[str]):
    return job_settings("iterate", overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_preset_header_names_its_command(experiment):
    lines = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert any(
        line.startswith("#") and f"experiment={experiment}" in line and "python" in line for line in lines[1:12]
    ), f"{experiment}.yaml: its command is not in the comment at the top"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_sweep_job_composes_with_a_unique_run_name(experiment):
    jobs = sweep_jobs(experiment)
    assert jobs, "no job"
    for job in jobs:
        OverridesParser.create().parse_overrides(job)  # each job's overrides are valid override strings
    settings = [composed([f"experiment={experiment}", *job]) for job in jobs]
    names = [s.run.name for s in settings]
    assert len(set(names)) == len(names), f"run names collide: {names}"
    assert all(s.run.dir.endswith(s.run.name) for s in settings)
    engine_seeds = {}  # run.seed -> the engine seeds its jobs get (harness/seeds.py derives them from run.seed)
    for s in settings:
        engine_seeds.setdefault(s.run.seed, set()).add(engine_config(s).seed)
    assert all(len(seeds) == 1 for seeds in engine_seeds.values()), "jobs of one run.seed must share the engine seed"
    assert len(set.union(*engine_seeds.values())) == len(engine_seeds), "each run.seed must get its own engine seed"


def test_sweep_sizes_and_settings():
    assert len(sweep_jobs("source_compare")) == 4
    sources = {(s.pairs.source, s.run.seed, s.train.conservative, s.run.rounds)
               for s in (composed(["experiment=source_compare", *j]) for j in sweep_jobs("source_compare"))}
    assert sources == {(src, seed, False, 2) for src in ("mcts", "sampling") for seed in (0, 1)}
    search = [composed(["experiment=search_compute", *j]) for j in sweep_jobs("search_compute")]
    assert {(s.search.simulations, s.search.breadth) for s in search} == set(itertools.product((4, 8, 16), (2, 3)))
    losses = [composed(["experiment=loss_variants", *j]) for j in sweep_jobs("loss_variants")]
    assert [s.train.loss_type for s in losses] == [("sigmoid",), ("ipo",), ("nca_pair",), ("sigmoid", "bco_pair")]
    assert len({s.run.seed for s in losses}) == 1 and len({s.backend.seed for s in losses}) == 1  # same search
    cdpo = composed(["experiment=loss_variants", "train.loss_type=[sigmoid]", "train.conservative=true"])
    assert cdpo.run.name not in {s.run.name for s in losses}
    # every run copies round 0 from the sweep's first job (plain DPO), which searches itself
    assert {s.run.search_from for s in [*losses, cdpo]} == {losses[0].run.dir}
    assert composed(["experiment=train_vs_infer"]).run.rounds == 3


def test_command_line_seeds_replace_the_swept_ones():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="iterate", overrides=["experiment=source_compare"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + ["run.seed=5"]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    assert sorted(batch) == sorted([["pairs.source=mcts", "run.seed=5"], ["pairs.source=sampling", "run.seed=5"]])


# --- pure parts of the analysis -------------------------------------------------------------------------


def quality_tree() -> Tree:
    """root -> A (-> A1 correct, A2 wrong), B wrong terminal, C (-> C1 wrong), D (same text as C; -> D1
    correct). Ids: A1 3, A2 4, C 5, C1 6, D 7, D1 8."""
    t = Tree(Problem("p1", "What is 2 + 3?", "5"))
    a = t.add_child(ROOT_ID, text="x = 2 + 3", visits=3, value_sum=1.0)
    t.add_child(ROOT_ID, text="x = 2 * 3", terminal=True, outcome=-1.0, visits=1, value_sum=-1.0)
    t.add_child(a.id, text="The answer is 5.", terminal=True, outcome=1.0, visits=1, value_sum=1.0)
    t.add_child(a.id, text="The answer is 6.", terminal=True, outcome=-1.0, visits=1, value_sum=-1.0)
    c = t.add_child(ROOT_ID, text="x = 2 - 3", visits=2, value_sum=-0.5)
    t.add_child(c.id, text="The answer is -1.", terminal=True, outcome=-1.0, visits=1, value_sum=-1.0)
    d = t.add_child(ROOT_ID, text="x = 2 - 3", visits=2, value_sum=0.0)
    t.add_child(d.id, text="The answer is 5.", terminal=True, outcome=1.0, visits=1, value_sum=1.0)
    t.root.visits = 8
    return t


def test_correct_nodes():
    assert an.correct_nodes(quality_tree()) == {0, 1, 3, 7, 8}


def test_pair_quality_on_known_pairs():
    tree = quality_tree()
    extracted = extract_pairs(
        tree, config=PairsConfig(margin=0.0, verified=False, full=False), format_prompt=lambda p, s: "Q", separator="\n"
    )
    # root: chosen A (q 1/3) vs rejected B (q -1); A: A1 vs A2; C and D have one child each.
    assert [(p["node_id"], p["chosen"], p["rejected"]) for p in extracted] == [
        (1, "The answer is 5.", "The answer is 6."), (0, "x = 2 + 3\n", "x = 2 * 3")]
    assert an.pair_quality([tree], extracted) == an.PairQuality(2, 0, 2, 2, 2)
    c, d = tree.nodes[5], tree.nodes[7]
    manual = [
        # reversed preference: chosen C (no correct answer below), rejected A (one below): both wrong
        {"problem_id": "p1", "node_id": 0, "chosen": "x = 2 - 3\n", "rejected": "x = 2 + 3\n",
         "chosen_q": c.q, "rejected_q": tree.nodes[1].q, "chosen_visits": 2, "rejected_visits": 3},
        # the same text as C, but the Q recorded is D's: D (correct below) vs B (wrong terminal): both right
        {"problem_id": "p1", "node_id": 0, "chosen": "x = 2 - 3\n", "rejected": "x = 2 * 3",
         "chosen_q": d.q, "rejected_q": -1.0, "chosen_visits": 2, "rejected_visits": 1},
        {"problem_id": "elsewhere", "node_id": 0, "chosen": "a", "rejected": "b"},
    ]
    q = an.pair_quality([tree], extracted + manual)
    assert q == an.PairQuality(pairs=4, unmatched=1, chosen_good=3, rejected_good=3, both_good=3)
    assert q.chosen_share == 0.75 and q.rejected_share == 0.75 and q.both_share == 0.75
    # Node ids in the record win over text matching (C's Q recorded, but chosen_id names D).
    by_id = {**manual[0], "chosen_id": 7, "rejected_id": 2}
    assert an.pair_quality([tree], [by_id]) == an.PairQuality(1, 0, 1, 1, 1)
    assert an.pair_quality([tree], [{**by_id, "chosen_id": 3}]).chosen_good == 0  # 3 is no child of 0: by text, C


def test_pair_quality_of_sampling_pairs_is_perfect_by_construction():
    t = Tree(Problem("p2", "q", "5"))
    for text, outcome in [("so 5", 1.0), ("so 6", -1.0), ("so 7", -1.0)]:
        t.add_child(ROOT_ID, text=text, terminal=True, outcome=outcome, visits=1, value_sum=outcome)
    pairs = outcome_pairs(t, format_prompt=lambda p, s: "Q")
    assert len(pairs) == 2 and an.pair_quality([t], pairs) == an.PairQuality(2, 0, 2, 2, 2)


def test_q_ranked_pairs_measure_the_search_values():
    tree = quality_tree()  # values agree with the outcomes: A (q 1/3) over B (q -1), A1 over A2
    pairs = an.q_ranked_pairs([tree], {"pairs.margin": 0.2})
    assert sorted((p["node_id"], p["chosen_id"], p["rejected_id"]) for p in pairs) == [(0, 1, 2), (1, 3, 4)]
    assert an.pair_quality([tree], pairs) == an.PairQuality(2, 0, 2, 2, 2)
    # A noisy value: C (only a wrong answer below) valued highest -> the root pair's chosen step is bad.
    tree.nodes[5].value_sum = 1.8
    pairs = an.q_ranked_pairs([tree], {"pairs.margin": 0.2})
    assert an.pair_quality([tree], pairs) == an.PairQuality(2, 0, 1, 2, 1)
    # Both nodes have a child on a correct path (A and D at the root; A1 under A): both pairs informed.
    # The root's chance: 2 of its 4 children (A, D) lie on one; A's: 1 of 2. The root pair chose C.
    check = an.ranking_check([tree], pairs)
    assert check == an.RankingCheck(pairs=2, informed=2, informed_chosen_good=1, informed_random=0.5 + 0.5)
    assert check.informed_chosen_share == 0.5 and check.informed_random_share == 0.5
    wrong_only = Tree(Problem("p3", "q", "5"))
    w = wrong_only.add_child(ROOT_ID, text="a", visits=2, value_sum=1.0)
    wrong_only.add_child(ROOT_ID, text="b", terminal=True, outcome=-1.0, visits=1, value_sum=-1.0)
    wrong_only.add_child(w.id, text="The answer is 4.", terminal=True, outcome=-1.0, visits=1, value_sum=-1.0)
    wrong_only.root.visits = 3
    ranked = an.q_ranked_pairs([wrong_only], {})
    assert len(ranked) == 1 and an.ranking_check([wrong_only], ranked) == an.RankingCheck(1, 0, 0, 0.0)
    assert an.q_ranked_pairs([tree], {"pairs.margin": 3.0}) == []  # the run's margin applies


def test_bands():
    b = an.mean_band([0.2, 0.4])  # sd = 0.1414, half = t(1) * sd / sqrt(2) = 12.706 * 0.1
    assert math.isclose(b.mean, 0.3) and math.isclose(b.high - b.mean, 1.2706, rel_tol=1e-4) and b.method == "t"
    b3 = an.mean_band([1.0, 2.0, 3.0])  # sd 1, half = 4.303 / sqrt(3)
    assert math.isclose(b3.low, 2 - 4.303 / math.sqrt(3)) and b3.n == 3
    one = an.accuracy_band([an.EvalPoint("t", 0.5, (0.3, 0.7), 10, 5, 1.0)])
    assert (one.low, one.high, one.method) == (0.3, 0.7, "wilson")
    two = an.accuracy_band([an.EvalPoint("t", a, (0, 1), 10, 5, 1.0) for a in (0.1, 0.9)])
    assert (two.low, two.high) == (0.0, 1.0)  # clipped
    assert an.mean_band([]) is None


def test_grouping_drops_seeds_names_and_paths():
    def run(seed, lr, name):
        cfg = {"run.seed": seed, "backend.seed": seed, "run.name": name, "run.dir": f"runs/{name}",
               "train.learning_rate": lr, "search.simulations": 4, "tracking.group": name}
        return an.Run(path=Path(name), kind="iterate", config=cfg)

    groups = an.group_runs([run(0, 1e-5, "a"), run(1, 1e-5, "b"), run(0, 1e-6, "c")])
    assert [(g.label, len(g.runs), g.seeds) for g in groups] == [
        ("train.learning_rate=1e-05", 2, [0, 1]), ("train.learning_rate=1e-06", 1, [0])]
    # a new option left null groups with runs from before it existed; set, it is a group of its own
    new = [an.Run(path=Path(f"n{v}"), kind="iterate", config={**run(2, 1e-5, f"n{v}").config, "pairs.max_depth": v})
           for v in (None, 0)]
    groups = an.group_runs([run(0, 1e-5, "a"), run(1, 1e-5, "b"), *new])
    assert [(g.label, g.seeds) for g in groups] == [("pairs.max_depth=None", [0, 1, 2]), ("pairs.max_depth=0", [2])]
    old_only = an.group_runs([run(0, 1e-5, "a"), new[1]])  # no run of the first group has the key
    assert [(g.label, g.seeds) for g in old_only] == [("all runs", [0]), ("pairs.max_depth=0", [2])]
    assert an.differing_keys([{"a": 1, "b": [1]}, {"a": 1, "b": [1, 2]}, {"a": 1}]) == ["b"]
    assert an.short_value("model.path", "runs/x/round_2/policy") == "x/round_2"
    assert an.short_value("prompt.step_separator", "\n") == '"\\n"'
    assert an.canonical({"margin": 0}) == an.canonical({"margin": 0.0}) != an.canonical({"margin": False})
    # a key missing from a config that has its group: a run from before the key existed (null)
    assert an.differing_keys([{"s.a": 1, "s.new": False}, {"s.a": 1}]) == ["s.new"]
    assert an.differing_keys([{"s.a": 1, "s.new": False}, {"t.b": 1}]) == ["s.a", "s.new", "t.b"]  # fallback: presence
    # idle keys (present in the whole config, dropped from the group config) are not null
    assert an.differing_keys([{"s.a": 1, "p.x": 1}, {"p.x": 2}], [{"s.a": 1, "p.x": 1}, {"s.a": 9, "p.x": 2}]) == [
        "p.x"
    ]


def test_idle_keys_of_the_sampling_source():
    sampling = {"run.rounds": 1, "pairs.source": "sampling", "pairs.samples": 8, "pairs.margin": 0.2,
                "pairs.max_pairs_per_tree": 2, "search.simulations": 16}
    assert [k for k in sampling if an.idle_key(sampling, k)] == ["pairs.margin", "search.simulations"]
    mcts = {**sampling, "pairs.source": "mcts"}
    assert [k for k in mcts if an.idle_key(mcts, k)] == ["pairs.samples"]


def test_paired_difference_counts_the_same_problems():
    base = {"p1": True, "p2": False, "p3": False, "p4": True}
    other = {"p1": True, "p2": True, "p3": False, "p4": False, "p5": True}  # p5: base never answered it
    d = an.paired_difference([(base, other)])
    assert d["problems"] == 4 and d["diff"] == 0.0 and (d["other_only"], d["base_only"]) == (1, 1)
    assert d["per_seed"] == (0.0,) and d["low"] < 0 < d["high"]
    # two seeds: a problem's difference is averaged over them; the interval is a t-interval over problems
    better = {p: True for p in base}
    d = an.paired_difference([(base, better), (base, better)])
    assert d["diff"] == 0.5 and d["per_seed"] == (0.5, 0.5) and d["other_only"] == 4
    values = [0, 1, 1, 0]  # per problem
    half = an.t_quantile(3) * statistics.stdev(values) / 2
    assert math.isclose(d["low"], 0.5 - half) and math.isclose(d["high"], 0.5 + half)
    assert an.paired_difference([({"a": True}, {"b": True})]) is None


def test_eval_records_must_name_problem_and_outcome(tmp_path):
    path = tmp_path / "eval.json"
    write_json(path, {"t": eval_entry("t", 1, records=[{"id": "a", "correct": True}, {"id": "b", "correct": False}])})
    assert an.read_evals(path)["t"].outcomes == {"a": True, "b": False}
    write_json(path, {"t": eval_entry("t", 1, records=[{"id": "a", "correct": "yes"}])})
    with pytest.raises(an.AnalysisError, match="record 0"):
        an.read_evals(path)


# --- the analysis on fabricated run directories --------------------------------------------------------


PARAMS_FLOPS = {"search": 100.0, "train": 50.0, "eval": 10.0}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def eval_entry(task: str, correct: int, n: int = 10, flops: float = 10.0, mode: str = "greedy", **extra) -> dict:
    """An eval.json entry; its records: the first `correct` of problems q0..q<n-1> answered right."""
    p = correct / n
    records = [{"id": f"q{i}", "correct": i < correct} for i in range(n)]
    return {
        "task": task,
        "mode": mode,
        "n": n,
        "correct": correct,
        "accuracy": p,
        "ci95": [max(0, p - 0.2), min(1, p + 0.2)],
        "compute": {"flops": flops, "generated_tokens": 100 * n + 10 * correct},
        "records": records,
        **extra,
    }


def fake_run(path: Path, *, seed: int, rounds: int = 2, written: int | None = None, correct=(2, 4, 6),
             loss_type=("sigmoid",), simulations: int = 4, source: str = "mcts") -> Path:
    """An iterate run directory as iterate.py writes it (the files the analysis reads)."""
    config = {
        "run": {"name": path.name, "dir": str(path), "rounds": rounds, "seed": seed},
        "backend": {"seed": seed},
        "train": {"loss_type": list(loss_type)},
        "search": {"simulations": simulations},
        "eval_tasks": {"arith_test": {"name": "arith_test"}},
        "pairs": {"source": source},
    }
    (path).mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (path / "metrics.jsonl").write_text("")
    write_json(path / "initial" / "eval.json", {"arith_test": eval_entry("arith_test", correct[0])})
    tree = quality_tree()
    pairs = extract_pairs(
        tree, config=PairsConfig(margin=0.0, verified=False, full=False), format_prompt=lambda p, s: "Q", separator="\n"
    )
    for k in range(rounds if written is None else written):
        rd = path / f"round_{k}"
        write_json(rd / "eval.json", {"arith_test": eval_entry("arith_test", correct[k + 1])})
        write_json(
            rd / "compute.json",
            {
                "search": {"flops": PARAMS_FLOPS["search"]},
                "train": {"flops": PARAMS_FLOPS["train"]},
                "eval": {"arith_test": {"flops": PARAMS_FLOPS["eval"]}},
                "total_flops": sum(PARAMS_FLOPS.values()),
            },
        )
        write_json(rd / "search.json", {"trees": 1, "solved": 1, "nodes": 9, "compute": {"generated_tokens": 300}})
        write_json(
            rd / "train.json",
            {
                "final_loss": 0.6 - 0.1 * k - 0.01 * seed,
                "reward_margin": 0.1,
                "reward_accuracy": 0.5,
                "steps": 2,
                "pairs": 2,
                "tokens": 40,
                "loss_history": [0.69, 0.6],
                "margin_history": [0.0, 0.1 + 0.05 * seed],
                "accuracy_history": [0.5, 0.75],
                "chosen_history": [0.0, 0.05],
                "rejected_history": [0.0, -0.05 - 0.05 * seed],
                "mean_smoothing": 0.0,
            },
        )
        (rd / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        (rd / "trees.jsonl").write_text(dumps_tree(tree) + "\n")
        (rd / "policy").mkdir()
    return path


def fake_eval_dir(path: Path, model_path: str | None, *, k: int, correct: int) -> Path:
    write_json(path / "eval.json", {**eval_entry("arith_test", correct, mode="sampling", k=k, flops=10.0 * k),
                                    "model": model_path or "/cache/smollm2"})
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(json.dumps({
        "model": {"name": "smollm2-135m", "path": model_path}, "backend": {"seed": 0},
        "eval": {"mode": "sampling", "k": k}, "task": {"name": "arith_test"},
        "out_dir": "runs/eval/${task.name}-${eval.mode}"}))
    return path


def test_cumulative_flops_of_a_run(tmp_path):
    run = an.load_iterate_run(fake_run(tmp_path / "r", seed=0))
    assert [p.position for p in run.points] == [0, 1, 2]
    assert an.point_flops(run) == [0.0, 160.0, 320.0]  # total_flops of each round, summed
    assert an.training_flops_at(run) == {0: 0.0, 1: 150.0, 2: 300.0}  # search + train only
    assert run.points[1].quality == an.PairQuality(2, 0, 2, 2, 2)


def test_analysis_on_fabricated_runs(tmp_path, caplog):
    runs = tmp_path / "runs"
    fake_run(runs / "dpo-s0", seed=0)
    fake_run(runs / "dpo-s1", seed=1, correct=(2, 6, 8))
    fake_run(runs / "ipo-s0", seed=0, loss_type=("ipo",), correct=(2, 5, 6))
    fake_run(runs / "broken", seed=2, written=1)  # round_1 missing: skipped
    evals = tmp_path / "eval"
    fake_eval_dir(evals / "base-k4", None, k=4, correct=5)
    fake_eval_dir(evals / "trained-k4", str(runs / "dpo-s0" / "round_1" / "policy"), k=4, correct=7)
    out = tmp_path / "results" / "x"
    with caplog.at_level(logging.WARNING, logger="analyze"):
        summary = an.analyze([str(runs / "*"), str(evals)], out)
    assert any("broken" in r.message and "round_1" in r.message for r in caplog.records)
    groups = {g["label"]: g for g in summary["groups"]}
    assert set(groups) == {
        "train.loss_type=sigmoid",
        "train.loss_type=ipo",
        "model.path=base",
        "model.path=dpo-s0/round_1",
    }
    dpo = groups["train.loss_type=sigmoid"]
    assert dpo["seeds"] == [0, 1] and len(dpo["runs"]) == 2
    r0 = dpo["points"][1]["accuracy"]["arith_test"]  # 0.4 and 0.6 -> mean 0.5, t-band
    assert math.isclose(r0["mean"], 0.5) and r0["method"] == "t" and r0["low"] < 0.5 < r0["high"]
    assert dpo["points"][2]["cumulative_flops"]["mean"] == 320.0
    assert dpo["points"][1]["chosen_on_correct_path"]["mean"] == 1.0
    assert dpo["points"][1]["q_ranked_pairs_per_tree"]["mean"] == 2.0  # quality_tree's two Q-ranked pairs
    assert dpo["points"][1]["q_ranked_chosen_good"]["mean"] == 1.0
    assert groups["train.loss_type=ipo"]["points"][1]["accuracy"]["arith_test"]["method"] == "wilson"
    trained = groups["model.path=dpo-s0/round_1"]["evaluation"]
    assert trained["train_flops"]["mean"] == 300.0 and trained["inference_flops"]["mean"] == 40.0
    assert groups["model.path=base"]["evaluation"]["train_flops"]["mean"] == 0.0
    assert summary["checks"]["pairs_per_round"]["round 0"] == {"runs": 3, "distinct_pair_sets": 1}
    for suffix in ("_rounds.png", "_loss.png", "_rewards.png", "_loss_summary.png", "_compare.png", ".md", ".json"):
        assert Path(f"{out}{suffix}").is_file(), suffix
    md = Path(f"{out}.md").read_text()
    assert "train.loss_type=ipo" in md and "3 runs trained on the same pairs" in md
    assert "## Q-ranked pairs from the same trees" in md
    # answers: 100 tokens per problem + 10 per right answer over 10 problems; the fake pairs' shape
    assert [p["answer_tokens"]["arith_test"]["mean"] for p in dpo["points"]] == [102.0, 105.0, 107.0]
    shape = an.pair_shape(read_pairs(runs / "dpo-s0" / "round_0" / "pairs.jsonl"))
    assert dpo["points"][1]["pair_depth"]["mean"] == shape.mean_depth
    assert "## Pairs and answers" in md and "| 102.0 [102.0, 102.0] |" in md
    # paired: ipo (seed 0 only) against sigmoid's seed 0 on the same problems: 5 vs 4, then 6 vs 6 right
    paired = [d for d in summary["paired"] if d["task"] == "arith_test"]
    assert [(d["base"], d["other"], d["point"], list(d["seeds"]), d["diff"], d["other_only"]) for d in paired] == [
        ("train.loss_type=sigmoid", "train.loss_type=ipo", "round 0", [0], 0.1, 1),
        ("train.loss_type=sigmoid", "train.loss_type=ipo", "round 1", [0], 0.0, 0)]
    assert "## Paired differences" in md and "+10.0 [" in md and "+0.0 [+0.0, +0.0]" in md
    assert json.loads(Path(f"{out}.json").read_text())["groups"][0]["label"]


def test_groups_labelled_by_run_names(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "wide-seed0", seed=0, simulations=8, rounds=1)
    fake_run(runs / "wide-seed1", seed=1, simulations=8, rounds=1)
    fake_run(runs / "narrow-seed0", seed=0, rounds=1)
    summary = an.analyze([str(runs)], tmp_path / "out", labels="names")
    assert sorted(g["label"] for g in summary["groups"]) == ["narrow", "wide"]
    assert {g["label"]: g["config_label"] for g in summary["groups"]}["wide"] == "search.simulations=8"
    assert summary["paired"][0]["base"] in ("narrow", "wide")
    md = (tmp_path / "out.md").read_text()
    assert "## Groups" in md and "| wide | search.simulations=8 | 2 |" in md
    assert "## Groups" not in an.markdown(an.analyze([str(runs)], tmp_path / "cfg"), [])  # config labels: no legend

    def group(*names):
        return an.Group(
            "iterate", {}, tuple(an.Run(Path(n), "iterate", {"run.name": n}) for n in names), {"k": len(names)}
        )

    named = an.name_labels(
        [
            group("exp/a-seed0", "exp/a-seed1"),
            group("exp/b_seed2"),
            group("exp/c-seed0", "exp/d-seed1"),
            group("exp/e"),
            group("exp/e-seed1"),
        ]
    )
    # the shared folder goes; runs whose names disagree, and two groups named alike, keep the config label
    assert [g.label for g in named] == ["a", "b", "k=2", "k=1", "k=1"]
    with pytest.raises(an.AnalysisError, match="--labels"):
        an.analyze([str(runs)], tmp_path / "x", labels="nicknames")


def test_run_on_answers():
    assert not an.runs_on("a = 2.\nThe answer is 2.")
    assert not an.runs_on("The answer is 2.\n\n  ")  # trailing blank lines are not more text
    assert an.runs_on("The answer is 2.\nThe answer is 3.")
    assert an.runs_on("the   answer is 2.\nSo 2 + 2 = 4.")  # matched as the extractor matches it
    assert not an.runs_on("I think it is 2.\nMaybe 3.")  # no answer line: nothing to run on after
    assert not an.runs_on("Final: 4.\nThen more.", prefix="The answer is") and an.runs_on(
        "Final: 4.\nThen more.", prefix="Final:"
    )
    records = [
        {"id": "a", "correct": True, "output": "The answer is 2."},
        {"id": "b", "correct": False, "output": "The answer is 2.\nThe answer is 5."},
        {"id": "c", "correct": False},
    ]
    assert an.count_run_on(records, "The answer is") == 1
    assert an.count_run_on([{"id": "a", "correct": True}], "The answer is") is None  # no outputs stored
    entry = eval_entry("arith_test", 1, n=2)
    entry["records"] = records[:2]
    point = an.eval_point("arith_test", entry, Path("eval.json"))
    assert point.run_on == 1 and point.run_on_share == 0.5


def test_accuracy_at_the_first_answer_line():
    assert an.first_answer("a = 2.\nThe answer is 2.\nb = 3.\nThe answer is 3.") == "a = 2.\nThe answer is 2."
    assert an.first_answer("The answer is 2.") == "The answer is 2."
    assert an.first_answer("no answer\nline") == "no answer\nline"
    records = [{"id": "a", "gold": "2", "correct": False, "output": "The answer is 2.\nThe answer is 5."},  # ran on
               {"id": "b", "gold": "5", "correct": True, "output": "The answer is 2.\nThe answer is 5."},
               {"id": "c", "gold": "1,000", "correct": True, "output": "So 1000.\nThe answer is $1000."},
               {"id": "d", "gold": "7", "correct": False, "output": "I give up."}]
    assert an.count_first_correct(records, "The answer is", "number") == 2  # a and c; b only at its last line
    assert an.count_first_correct(records[:1] + [{"id": "x", "correct": True}], "The answer is", "number") is None
    letters = [{"id": "q", "gold": "B", "correct": False, "output": "Answer: (b)\nAnswer: (C)"}]
    assert an.count_first_correct(letters, "Answer:", "letter") == 1
    entry = eval_entry("arith_test", 2, n=4)
    entry["records"] = records
    point = an.eval_point("arith_test", entry, Path("eval.json"))
    assert point.first_correct == 2 and point.first_accuracy == 0.5
    m = {"eval_tasks.m.name": "m", "eval_tasks.m.path": "m.jsonl"}
    assert an.eval_task({**m, "eval_tasks.m.kind": "math"}, "eval_tasks.m").answer_format == "latex"
    assert an.eval_task({**m, "eval_tasks.m.kind": "math", "eval_tasks.m.answer_format": "number"},
                        "eval_tasks.m").answer_format == "number"
    assert an.eval_task(m, "eval_tasks.m").answer_format == "number"


def test_pair_shape():
    pairs = [{"depth": 0, "chosen": "a = 1.\nb = 2.\nThe answer is 2.", "rejected": "The answer is 3."},
             {"depth": 2, "chosen": "The answer is 2.", "rejected": "c = 4.\n\nThe answer is 4.\n"}]
    shape = an.pair_shape(pairs)
    assert shape == an.PairShape(pairs=2, mean_depth=1.0, root_share=0.5, chosen_steps=2.0, rejected_steps=1.5)
    assert an.pair_shape(pairs, " ").chosen_steps == 6.0  # words: 8 and 4
    assert an.pair_shape([]) is None


def test_search_series_leave_out_the_sampling_source(tmp_path):
    runs = tmp_path / "runs"
    for sims in (4, 8):
        fake_run(runs / f"s{sims}", seed=0, simulations=sims, rounds=1)
    fake_run(runs / "sampled", seed=0, simulations=16, rounds=1, source="sampling")  # its search.* keys are idle
    groups = an.group_runs(an.load_runs([str(runs)]))
    summary = an.summarize(groups)
    assert sorted(g.label for g in groups) == ["pairs.source=mcts, search.simulations=4",
                                               "pairs.source=mcts, search.simulations=8", "pairs.source=sampling"]
    series = an.search_series(groups, summary)
    assert {label: [x for x, _ in pts] for label, pts in series.items()} == {"pairs.source=mcts": [4, 8]}


def test_search_plot_leaves_out_constant_panels(tmp_path):
    runs = tmp_path / "runs"
    for sims in (4, 8):
        fake_run(runs / f"s{sims}", seed=0, simulations=sims, rounds=1)
    out = tmp_path / "search"
    summary = an.analyze([str(runs)], out, kind="search")
    assert sorted(g["label"] for g in summary["groups"]) == ["search.simulations=4", "search.simulations=8"]
    # Equal trees in both runs: every panel is constant, so there is nothing to plot.
    assert not Path(f"{out}_search.png").exists()
    fake_run(runs / "s16", seed=0, simulations=16, rounds=1)
    (runs / "s16" / "round_0" / "pairs.jsonl").write_text("")  # no pairs: pairs per tree 0 differs
    an.analyze([str(runs)], out, kind="search")
    assert Path(f"{out}_search.png").stat().st_size > 0


def test_malformed_inputs_name_the_file(tmp_path):
    run = fake_run(tmp_path / "r", seed=0)
    (run / "round_1" / "eval.json").write_text("{not json")
    with pytest.raises(an.AnalysisError, match=r"round_1/eval.json:1"):
        an.load_runs([str(run)])
    (run / "round_1" / "eval.json").write_text(json.dumps({"arith_test": {"accuracy": 0.5}}))
    with pytest.raises(an.AnalysisError, match=r"round_1/eval.json.*arith_test"):
        an.load_runs([str(run)])
    with pytest.raises(an.AnalysisError, match="no run directory"):
        an.load_runs([str(tmp_path / "r" / "round_0" / "policy")])
    rd = run / "round_0"
    good_pair = (rd / "pairs.jsonl").read_text().splitlines()[0]
    (rd / "pairs.jsonl").write_text(good_pair + '\n{"prompt": "only"}\n')
    with pytest.raises(an.AnalysisError, match=r"round_0/pairs.jsonl:2: missing key"):
        an.read_round(run, 0)
    (rd / "pairs.jsonl").write_text(good_pair + "\n")
    (rd / "trees.jsonl").write_text("[oops\n" + (rd / "trees.jsonl").read_text())
    with pytest.raises(an.AnalysisError, match=r"round_0/trees.jsonl:1"):
        an.read_round(run, 0)


def test_cli_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "analyze.py"), str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "none" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the analysis on real smoke runs (slow: three runs of the tiny model, about a minute each) -----------


@pytest.fixture(scope="module")
def smoke_runs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke_runs")
    # c reuses a's round-0 search (run.search_from) although its own engine seed (that of b) would search
    # differently: it must train on a's pairs.
    variants = {"a": ["run.seed=0"], "b": ["run.seed=1", "backend.seed=1"],
                "c": ["run.seed=0", "backend.seed=1", "train.loss_type=[ipo]", f"run.search_from={base / 'a'}"]}
    for name, overrides in variants.items():
        proc = subprocess.run([sys.executable, "iterate.py", "experiment=smoke", f"run.dir={base / name}", *overrides],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return base


@pytest.mark.slow
def test_analysis_of_two_seeds_is_one_group(smoke_runs, tmp_path):
    out = tmp_path / "two"
    summary = an.analyze([str(smoke_runs / "a"), str(smoke_runs / "b")], out)
    (group,) = summary["groups"]
    assert group["seeds"] == [0, 1] and len(group["runs"]) == 2
    after = group["points"][1]
    assert set(after["accuracy"]) == {"arith_test", "mawps_singleop"}
    assert all(b["n"] == 2 and b["method"] == "t" for b in after["accuracy"].values())
    assert after["cumulative_flops"]["mean"] > 0 and after["pairs"]["mean"] > 0
    assert (
        Path(f"{out}_rounds.png").stat().st_size > 0 and Path(f"{out}.md").is_file() and Path(f"{out}.json").is_file()
    )


@pytest.mark.slow
def test_analysis_of_a_loss_variant_and_the_seeds_reaching_the_search(smoke_runs, tmp_path):
    out = tmp_path / "three"
    summary = an.analyze([str(smoke_runs)], out)
    labels = sorted(g["label"] for g in summary["groups"])
    assert labels == ["train.loss_type=ipo", "train.loss_type=sigmoid,sft"]  # c against the default loss
    assert Path(f"{out}_loss.png").is_file() and Path(f"{out}_loss_summary.png").is_file()
    assert Path(f"{out}_rewards.png").is_file()  # train.json carries the reward curves
    digests = {name: an.load_iterate_run(smoke_runs / name).points[1].pairs_digest for name in "abc"}
    # Another backend.seed gives other trees (b); c copied a's round-0 search and pairs (run.search_from)
    # instead of searching with b's seed.
    assert digests["a"] == digests["c"] and digests["a"] != digests["b"]
    assert (smoke_runs / "c" / "round_0" / "trees.jsonl").read_bytes() == (
        smoke_runs / "a" / "round_0" / "trees.jsonl"
    ).read_bytes()
    assert (
        an.load_iterate_run(smoke_runs / "c").points[0].evals == an.load_iterate_run(smoke_runs / "a").points[0].evals
    )


# ---- experiments/compare_runs.py -------------------------------------------------------------------


def _fake_run(root: Path, *, seconds: float, answer: str = "4", weights: bytes = b"w") -> Path:
    (root / "round_0" / "policy").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "configs" / "0-stamp.yaml").write_text(f"started: {seconds}\n")
    calls = [{"ok": True, "seconds": seconds}]
    tree = {"problem_id": "p1", "nodes": [{"id": 0, "answer": answer, "tool_calls": calls}]}
    (root / "round_0" / "trees.jsonl").write_text(json.dumps(tree) + "\n")
    (root / "round_0" / "train.json").write_text(json.dumps({"final_loss": 0.5, "seconds": seconds}))
    (root / "round_0" / "fingerprints.json").write_text(json.dumps({"search": {"at": seconds}}))
    (root / "metrics.jsonl").write_text(json.dumps({"round": 1, "time/search_s": seconds, "eval/a": 0.2}) + "\n")
    (root / "round_0" / "policy" / "model.safetensors").write_bytes(weights)
    return root


def test_compare_runs_leaves_times_out_and_finds_the_first_difference(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import compare_runs
    finally:
        sys.path.pop(0)
    a = _fake_run(tmp_path / "a", seconds=1.0)
    same = compare_runs.compare(a, _fake_run(tmp_path / "b", seconds=9.0))
    assert same["same"] and len(same["files"]) == 4  # fingerprints and config history are not compared
    other = compare_runs.compare(a, _fake_run(tmp_path / "c", seconds=1.0, answer="5"))
    assert not other["same"]
    assert [r["difference"] for r in other["files"] if not r["same"]] == ["[0]/nodes[0]/answer"]
    weights = compare_runs.compare(a, _fake_run(tmp_path / "d", seconds=1.0, weights=b"v"))
    assert [r["file"] for r in weights["files"] if not r["same"]] == ["round_0/policy/model.safetensors"]
    out = tmp_path / "out" / "cmp"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare_runs.py"), str(a), str(tmp_path / "c"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].startswith("different: 1 of 4 files")
    assert "| round_0/trees.jsonl | no |" in out.with_suffix(".md").read_text()
