"""Unit tests of the harness: typed config, FLOP ledger, Wilson interval, run-directory helpers."""

import json
import math
import os
import stat
from dataclasses import dataclass

import pytest

from harness.compute import inference_flops, phase_record, training_flops, InferenceCost
from harness.config import ConfigError, build
from harness.evaluation import majority_vote, slice_problems, wilson_interval
from harness.rundir import publish_dir, remove_stale_temps, truncate_partial_line, write_json_atomic
from mcts.types import Problem


@dataclass(frozen=True)
class _Cfg:
    a: int = 1
    b: tuple[str, ...] = ()
    c: str | None = None


def test_build_converts_lists_and_rejects_unknown_keys():
    cfg = build(_Cfg, {"a": 3, "b": ["x", "y"]}, "grp")
    assert cfg == _Cfg(3, ("x", "y"), None)
    with pytest.raises(ConfigError, match=r"unknown config key grp\.aa.*grp has a, b, c"):
        build(_Cfg, {"aa": 3}, "grp")


def test_flops_hand_computed():
    # 100M params, 1000 prompt tokens of which 400 cached, 200 generated: 2 * 1e8 * (1000 - 400 + 200)
    cost = InferenceCost(prompt_tokens=1000, generated_tokens=200, cached_tokens=400)
    assert inference_flops(100_000_000, cost) == 2 * 1e8 * 800
    assert inference_flops(100_000_000, cost, count_cached=True) == 2 * 1e8 * 1200
    # training: 6N per token plus the reference model's 2N forward
    assert training_flops(10, 5) == (6 + 2) * 10 * 5
    assert training_flops(10, 5, reference_forward=False) == 6 * 10 * 5
    rec = phase_record(10, prompt_tokens=3, generated_tokens=2, cached_tokens=1, train_tokens=4)
    assert rec["flops"] == 2 * 10 * 4 + 8 * 10 * 4
    assert rec["flops_uncached"] == 2 * 10 * 5 + 8 * 10 * 4


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    # Wilson 95% interval for 8/10: (0.490, 0.943)
    assert math.isclose(low, 0.4902, abs_tol=1e-3) and math.isclose(high, 0.9433, abs_tol=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0 < high < 0.2


def test_majority_vote_uses_equality_function():
    same = lambda a, b: float(a) == float(b)  # noqa: E731
    assert majority_vote(["3", "3.0", "4", None, "4", "3"], same) == "3"
    assert majority_vote([None, None], same) is None


def test_slice_is_reproducible_and_seed_dependent():
    problems = [Problem(str(i), f"q{i}", str(i)) for i in range(50)]
    a = slice_problems(problems, 10, 0)
    assert a == slice_problems(problems, 10, 0)
    assert a != slice_problems(problems, 10, 1)
    assert slice_problems(problems, 5, None) == problems[:5]
    assert len(slice_problems(problems, None, 0)) == 50


def test_truncate_partial_line(tmp_path):
    path = tmp_path / "trees.jsonl"
    assert not truncate_partial_line(path)
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert truncate_partial_line(path)
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    write_json_atomic(tmp_path / "x.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": [1, 2]}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_publish_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "round_0" / "value"
    with publish_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".value.tmp-") and not out.exists()
        (tmp / "a.txt").write_text("first")
    mask = os.umask(0)
    os.umask(mask)
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # as mkdir makes it, not private like mkdtemp
    with publish_dir(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert [p.name for p in out.iterdir()] == ["b.txt"]  # the older folder is replaced, not merged
    with pytest.raises(RuntimeError, match="half-way"):
        with publish_dir(out) as tmp:
            (tmp / "c.txt").write_text("third")
            raise RuntimeError("half-way")
    assert [p.name for p in out.iterdir()] == ["b.txt"]  # a failed build leaves the old folder
    assert [p.name for p in out.parent.iterdir()] == ["value"]  # and no temporary behind
    (out.parent / ".value.tmp-crashed").mkdir()  # what a killed build leaves: the next run removes it
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".value.tmp-crashed"]


def test_accuracy_by_difficulty_from_generated_ids():
    from harness.evaluation import accuracy_by_difficulty
    from mcts.types import Problem

    problems = [Problem(f"arith-test-0-d{d}-0000{i}", "q", "1") for i, d in enumerate([1, 1, 2, 2, 2])]
    records = [{"correct": c} for c in (True, False, True, True, False)]
    out = accuracy_by_difficulty(problems, records)
    assert list(out) == ["1", "2"]
    assert (out["1"]["n"], out["1"]["correct"], out["1"]["accuracy"]) == (2, 1, 0.5)
    assert (out["2"]["n"], out["2"]["correct"]) == (3, 2)
    assert accuracy_by_difficulty([Problem("gsm8k-1", "q", "1")], [{"correct": True}]) == {}


def test_report_lists_flipped_problems(tmp_path):
    from harness.report import flipped_examples, write_report

    def ev(correct):
        records = [dict(id=f"p{i}", question=f"q{i}", gold="1", prediction="1" if c else "2", correct=c,
                        output=f"step\nThe answer is {'1' if c else '2'}.") for i, c in enumerate(correct)]
        n, k = len(correct), sum(correct)
        return {"t": dict(accuracy=k / n, ci95=[0.0, 1.0], n=n, correct=k, records=records)}

    history = [{"round": "initial", "eval": ev([False, False, True])},
               {"round": 0, "eval": ev([True, False, False])}]
    text = flipped_examples(history)
    assert "t: 1 problems newly solved, 1 newly failed" in text
    assert "[p0] q0" in text and "before: step / The answer is 2." in text and "after:  step / The answer is 1." in text
    report = write_report(tmp_path, history, command="python iterate.py run.name=x")
    assert "Per problem" in report and (tmp_path / "accuracy.png").is_file()
    assert "Written by `python iterate.py run.name=x` on " in report  # the generator writes its provenance
    assert (tmp_path / "summary.md").read_text() == report


def test_copy_round0_search(tmp_path):
    from harness.rundir import copy_round0_search

    src, dst = tmp_path / "src", tmp_path / "dst"
    with pytest.raises(ValueError, match="no config.yaml"):
        copy_round0_search(src, dst, must_match={})
    src.mkdir()
    (src / "config.yaml").write_text("task:\n  name: arith\n  n: 10\nrun:\n  problems_per_round: 4\n")
    (src / "round_0").mkdir()
    (src / "round_0" / "trees.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"not finished \(round_0/search.json, round_0/pairs.jsonl missing\)"):
        copy_round0_search(src, dst, must_match={})
    (src / "round_0" / "search.json").write_text("{}")
    (src / "round_0" / "pairs.jsonl").write_text("")
    (src / "initial").mkdir()
    (src / "initial" / "eval.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"run.problems_per_round: 4 there, 8 here"):
        copy_round0_search(src, dst, must_match={"task": {"name": "arith", "n": 10}, "run.problems_per_round": 8})
    (dst / "round_0").mkdir(parents=True)
    (dst / "round_0" / "pairs.jsonl").write_text("mine\n")  # present: left alone
    copied = copy_round0_search(src, dst, must_match={"task": {"name": "arith", "n": 10}, "run.problems_per_round": 4})
    assert copied == ["initial/eval.json", "round_0/trees.jsonl", "round_0/search.json"]
    assert (dst / "round_0" / "pairs.jsonl").read_text() == "mine\n"
    assert (dst / "initial" / "eval.json").read_text() == '{"a": 1}'
    assert copy_round0_search(src, dst, must_match={}) == []  # everything there: nothing copied
    assert copy_round0_search(tmp_path / "new", tmp_path / "new", must_match={}) == []  # itself: it searches


def test_the_summary_gives_the_paired_difference_and_says_whether_it_is_significant():
    from harness.report import changes

    def evaluation(correct):
        records = [{"id": f"p{i}", "correct": c} for i, c in enumerate(correct)]
        n = len(records)
        return {"accuracy": sum(correct) / n, "n": n, "ci95": [0.0, 1.0], "records": records}

    before = [False] * 60 + [True] * 40
    gained = [True] * 100
    text = changes([{"round": "initial", "eval": {"t": evaluation(before)}},
                    {"round": 0, "eval": {"t": evaluation(gained)}}])
    assert "paired on the same 100: +60.0 [" in text and "significant gain" in text
    same = changes([{"round": "initial", "eval": {"t": evaluation(before)}},
                    {"round": 0, "eval": {"t": evaluation(before[1:] + before[:1])}}])
    assert "within the noise" in same
