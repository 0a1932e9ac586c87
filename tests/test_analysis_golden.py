"""The analysis' outputs do not change: `python experiments/analyze.py` on fabricated run directories
writes PREFIX.md and PREFIX.json equal to the files in tests/data/analyze_golden/, which were written
by the analysis as it was before it became the `analysis` package (experiments/analyze.py at commit
8977ec2). Three sets of runs: loss variants with a run that is skipped and evaluate.py outputs
(every table but the groups legend; rounds, loss and compare plots), runs labelled by their names,
and runs whose evaluation records hold outputs (run-ons and answers at the first answer line,
with a letter task, a python-tool group and a Q-ranked margin).

The temporary folder is written as <tmp> in the stored files. After a deliberate change of the
outputs, regenerate them with

    ANALYZE_GOLDEN_UPDATE=1 .venv/bin/python -m pytest -q tests/test_analysis_golden.py

and review the diff of tests/data/analyze_golden/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from tests.test_experiments import eval_entry, fake_eval_dir, fake_run

GOLDEN = ROOT / "tests" / "data" / "analyze_golden"
UPDATE = os.environ.get("ANALYZE_GOLDEN_UPDATE") == "1"


def mixed_runs(base: Path) -> list[str]:
    """test_analysis_on_fabricated_runs' runs: two loss types (one with two seeds), an incomplete run,
    two evaluate.py outputs (the base model and a trained round's policy)."""
    runs, evals = base / "runs", base / "eval"
    fake_run(runs / "dpo-s0", seed=0)
    fake_run(runs / "dpo-s1", seed=1, correct=(2, 6, 8))
    fake_run(runs / "ipo-s0", seed=0, loss_type=("ipo",), correct=(2, 5, 6))
    fake_run(runs / "broken", seed=2, written=1)
    fake_eval_dir(evals / "base-k4", None, k=4, correct=5)
    fake_eval_dir(evals / "trained-k4", str(runs / "dpo-s0" / "round_1" / "policy"), k=4, correct=7)
    return [str(runs / "*"), str(evals)]


def named_runs(base: Path) -> list[str]:
    runs = base / "runs"
    fake_run(runs / "wide-seed0", seed=0, simulations=8, rounds=1)
    fake_run(runs / "wide-seed1", seed=1, simulations=8, rounds=1)
    fake_run(runs / "narrow-seed0", seed=0, rounds=1)
    return [str(runs), "--labels", "names"]


NUMBER_OUTPUTS = ["x = 2.\nThe answer is 2.",                              # stops at its answer line
                  "The answer is 3.\nThe answer is 2.",                     # runs on; right only at the last
                  "So 1000.\nThe answer is $1,000.\nAnd more.",             # runs on; right at the first
                  "I give up.",                                             # no answer line
                  "```python\nprint('The answer is 9')\n```\n```output\nThe answer is 9\n```\nThe answer is 5."]
NUMBER_GOLD = ["2", "2", "1000", "7", "5"]
LETTER_OUTPUTS = ["Answer: (b)\nAnswer: (C)", "Answer: A", "answer: d.\nmore"]
LETTER_GOLD = ["B", "C", "D"]


def with_outputs(entry: dict, outputs: list[str], gold: list[str], shift: int) -> dict:
    """`entry` with records holding outputs (rotated by `shift`) and gold answers."""
    n = len(outputs)
    for i, r in enumerate(entry["records"][:n]):
        r["output"], r["gold"] = outputs[(i + shift) % n], gold[(i + shift) % n]
    entry["records"] = entry["records"][:n]
    entry["n"] = n
    return entry


def answer_runs(base: Path) -> list[str]:
    """Two groups of two seeds: chain of thought with a number and a letter task (Q-ranked margin 1.5:
    one of quality_tree's two Q-ranked pairs), and python-tool steps with the number task."""
    runs = base / "runs"
    for group, tool, margin in (("cot", "none", 1.5), ("tool", "python", None)):
        for seed in (0, 1):
            path = fake_run(runs / f"{group}-s{seed}", seed=seed, rounds=1)
            config = json.loads((path / "config.yaml").read_text())
            config["tool"] = {"name": tool}
            if margin is not None:
                config["pairs"]["margin"] = margin
            tasks = {"arith_test": {"name": "arith_test"}}
            if tool == "none":
                tasks["mc"] = {"name": "mc", "kind": "multiple_choice", "path": "mc.jsonl", "answer_prefix": "Answer:"}
            config["eval_tasks"] = tasks
            (path / "config.yaml").write_text(json.dumps(config))
            for k, eval_path in enumerate([path / "initial" / "eval.json", path / "round_0" / "eval.json"]):
                shift = seed + k
                results = {
                    "arith_test": with_outputs(eval_entry("arith_test", 2 + k), NUMBER_OUTPUTS, NUMBER_GOLD, shift)
                }
                if "mc" in tasks:
                    results["mc"] = with_outputs(eval_entry("mc", 1 + seed), LETTER_OUTPUTS, LETTER_GOLD, shift)
                eval_path.write_text(json.dumps(results))
    return [str(runs)]


SCENARIOS = {"mixed": mixed_runs, "names": named_runs, "answers": answer_runs}


def normalized(text: str, tmp: Path) -> str:
    return text.replace(str(tmp), "<tmp>")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_outputs_equal_the_golden_files(name, tmp_path):
    args = SCENARIOS[name](tmp_path)
    out = tmp_path / "results" / name
    proc = subprocess.run([sys.executable, "experiments/analyze.py", *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    produced = {f"{name}.md": Path(f"{out}.md").read_text(), f"{name}.json": Path(f"{out}.json").read_text(),
                f"{name}.stdout": proc.stdout}
    for file, text in produced.items():
        text = normalized(text, tmp_path)
        if UPDATE:
            GOLDEN.mkdir(parents=True, exist_ok=True)
            (GOLDEN / file).write_text(text)
        assert text == (GOLDEN / file).read_text(), f"{file} differs from tests/data/analyze_golden/{file}"
