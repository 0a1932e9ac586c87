"""Tasks: loaders on the real data files and on broken ones, the arithmetic generator, answer
extraction, and every conf/task/*.yaml through the typed config."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from harness.config import ConfigError, build
from mcts.types import Problem
from tasks import DataError, TaskConfig, make_task
from tasks.arith import difficulty_of, generate
from tasks.checker import normalize_number
from tasks.loaders import (load_gsm8k, load_jsonl, load_math, load_mawps, load_multiple_choice, load_svamp)
from tasks.task import AnswerTask

# Rows per file. ../shared/data/README.md gives 561/394/599/507 for the MAWPS files: those files
# lack a final newline, so `wc -l` counts one line fewer than there are problems.
REAL_FILES = {
    "gsm8k_train.jsonl": ("gsm8k", 7473), "gsm8k_test.jsonl": ("gsm8k", 1319), "math_test.jsonl": ("math", 5000),
    "svamp_test.jsonl": ("svamp", 1000), "mawps_singleop.jsonl": ("mawps", 562),
    "mawps_addsub.jsonl": ("mawps", 395), "mawps_multiarith.jsonl": ("mawps", 600),
    "mawps_singleeq.jsonl": ("mawps", 508),
}
TASK_CONFS = sorted((ROOT / "conf" / "task").glob("*.yaml"))
NEEDS_PATH = {"jsonl", "multiple_choice"}


def _task(kind: str, path: Path, **kw) -> AnswerTask:
    return make_task(TaskConfig(name=kind, kind=kind, path=str(path), **kw))


# ------------------------------------------------------------------------------------------------
# Real files


@pytest.mark.parametrize("file", sorted(REAL_FILES))
def test_loader_on_real_file(shared_data, file):
    kind, rows = REAL_FILES[file]
    task = _task(kind, shared_data / file)
    problems = task.problems()
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows
    assert all(p.question.strip() and p.answer.strip() for p in problems)
    if kind != "math":
        assert all(normalize_number(p.answer) is not None for p in problems)
    with_solution = [p for p in problems if p.solution is not None]
    assert len(with_solution) == (0 if kind == "mawps" else rows)
    for p in with_solution:  # the reference solution states the gold answer in the task's format
        assert task.is_correct(task.extract(p.solution), p), (p.id, p.solution[-200:])


def test_loader_details(shared_data):
    gsm = load_gsm8k(shared_data / "gsm8k_train.jsonl", name="g")
    assert gsm[0].id == "g-1" and gsm[0].answer == "72"
    assert gsm[0].solution == ("Natalia sold 48/2 = 24 clips in May.\n"
                               "Natalia sold 48+24 = 72 clips altogether in April and May.\nThe answer is 72.")
    assert all("<<" not in p.solution and "####" not in p.solution for p in gsm)
    assert any(p.answer == "1600" for p in gsm)  # "#### 1,600" in the file
    math = load_math(shared_data / "math_test.jsonl")
    assert math[0].answer == "2"
    assert sum("\\frac" in p.answer for p in math) > 100
    svamp = load_svamp(shared_data / "svamp_test.jsonl")
    assert svamp[0].answer == "145"
    assert svamp[0].question.endswith("organized into 93 groups How big is each group of bananas?")
    assert svamp[0].solution == "290 / 2 = 145.\nThe answer is 145."
    singleop = load_mawps(shared_data / "mawps_singleop.jsonl")
    assert singleop[0].answer == "14" and "3.33333" in {p.answer for p in singleop}


def test_relative_paths_start_at_the_project_root(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = make_task(TaskConfig(name="g", kind="gsm8k", path="../shared/data/gsm8k_test.jsonl"))
    assert len(task.problems()) == 1319


# ------------------------------------------------------------------------------------------------
# Broken files

GOOD_ROWS = {
    "gsm8k": {"question": "q?", "answer": "1 + 1 = 2\n#### 2"},
    "math": {"problem": "q?", "solution": "So $\\boxed{\\frac{1}{2}}$."},
    "svamp": {"Body": "b.", "Question": "q?", "Answer": 2.0, "Equation": "( 1.0 + 1.0 )"},
    "mawps": {"input": "q?", "target": 2.0},
    "jsonl": {"question": "q?", "answer": "2"},
    "multiple_choice": {"question": "q?", "choices": ["x", "y"], "answer": "B"},
}
MISSING = {"gsm8k": "answer", "math": "solution", "svamp": "Answer", "mawps": "target", "jsonl": "question",
           "multiple_choice": "choices"}
BAD_GOLD = {"gsm8k": {"answer": "no marker"}, "math": {"solution": "no box"}, "svamp": {"Answer": "many"},
            "mawps": {"target": [1]}, "jsonl": {"answer": "two"}, "multiple_choice": {"answer": "C"}}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _load(kind: str, path: Path):
    return _task(kind, path).problems()


@pytest.mark.parametrize("kind", sorted(GOOD_ROWS))
def test_broken_files_name_file_and_line(kind, tmp_path):
    good = json.dumps(GOOD_ROWS[kind])
    ok = _write(tmp_path / "ok.jsonl", [good, "", good])  # blank lines are skipped
    assert [p.id for p in _load(kind, ok)] == [f"{kind}-1", f"{kind}-3"]

    bad_json = _write(tmp_path / "bad.jsonl", [good, good, '{"question": "q?",'])
    with pytest.raises(DataError, match=re.escape(f"{bad_json}:3: not a JSON line")):
        _load(kind, bad_json)

    missing = _write(tmp_path / "missing.jsonl",
                     [good, json.dumps({k: v for k, v in GOOD_ROWS[kind].items() if k != MISSING[kind]})])
    with pytest.raises(DataError, match=re.escape(f"{missing}:2: missing field '{MISSING[kind]}'")):
        _load(kind, missing)

    bad_gold = _write(tmp_path / "gold.jsonl", [good, good, good, json.dumps({**GOOD_ROWS[kind], **BAD_GOLD[kind]})])
    with pytest.raises(DataError, match=re.escape(f"{bad_gold}:4: cannot parse the gold answer")):
        _load(kind, bad_gold)

    not_object = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{not_object}:1: expected a JSON object")):
        _load(kind, not_object)

    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=re.escape(f"{empty}: no problems (empty file)")):
        _load(kind, empty)

    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
        _load(kind, tmp_path / "nope.jsonl")


def test_generic_jsonl_fields(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"id": "a", "q": "1+1?", "gold": 2, "sol": "1+1=2"}),
                                         json.dumps({"id": "b", "q": "x?", "gold": "\\frac{1}{2}", "sol": "s"})])
    problems = load_jsonl(path, name="mine", question_field="q", answer_field="gold", solution_field="sol",
                          id_field="id")
    assert problems == [Problem("mine-a", "1+1?", "2", "1+1=2"), Problem("mine-b", "x?", "\\frac{1}{2}", "s")]
    dup = _write(tmp_path / "dup.jsonl", [json.dumps({"id": 1, "q": "a", "gold": 1})] * 2)
    with pytest.raises(DataError, match=re.escape(f"{dup}:2: duplicate id '1'")):
        load_jsonl(dup, question_field="q", answer_field="gold", id_field="id")


def test_multiple_choice_rendering(tmp_path):
    path = _write(tmp_path / "mc.jsonl", [
        json.dumps({"question": "Which is red?", "choices": ["sky", "blood", "grass"], "answer": "(B)"}),
        json.dumps({"question": "Pick one.", "choices": {"a": "one", "b": "two"}, "answer": "a"}),
    ])
    p1, p2 = load_multiple_choice(path, name="mc")
    assert p1 == Problem("mc-1", "Which is red?\n(A) sky\n(B) blood\n(C) grass", "B")
    assert p2.question == "Pick one.\n(A) one\n(B) two" and p2.answer == "A"
    task = _task("multiple_choice", path)
    assert task.is_correct(task.extract("Blood is red.\nThe answer is (B)."), p1)
    assert not task.is_correct(task.extract("The answer is (A)."), p1)


# ------------------------------------------------------------------------------------------------
# Generated arithmetic

_EQUATION = re.compile(r"(\d+) ([-+x/]) (\d+) = (\d+)\.$")


def test_generator_is_deterministic():
    a = generate(300, split="train", seed=0)
    assert a == generate(300, split="train", seed=0)
    assert a[:50] == generate(50, split="train", seed=0)  # problem i does not depend on n
    b = generate(300, split="train", seed=1)
    assert sum(x.question == y.question for x, y in zip(a, b)) < 5
    assert len({p.question for p in a}) == len(a)


def test_generator_is_the_same_in_another_process():
    import subprocess
    import sys

    code = ("from tasks.arith import generate; import json; "
            "print(json.dumps([p.question for p in generate(20, split='test', seed=7)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert json.loads(out.stdout) == [p.question for p in generate(20, split="test", seed=7)]


@pytest.mark.parametrize("difficulties", [(1,), (1, 2, 3, 4)])
def test_train_dev_and_test_never_share_a_question(difficulties):
    train = {p.question for p in generate(2000, split="train", difficulties=difficulties, seed=0)}
    dev = {p.question for p in generate(300, split="dev", difficulties=difficulties, seed=0)}
    test = {p.question for p in generate(2000, split="test", difficulties=difficulties, seed=0)}
    other_seed = {p.question for p in generate(2000, split="test", difficulties=difficulties, seed=1)}
    assert len(train) == len(test) == 2000 and len(dev) == 300
    assert not train & test and not train & other_seed and not dev & train and not dev & test


def test_generated_problems_are_sound():
    task = make_task(TaskConfig(kind="arith", split="test", n=400, difficulties=(1, 2, 3, 4)))
    problems = task.problems()
    assert Counter(difficulty_of(p) for p in problems) == {1: 100, 2: 100, 3: 100, 4: 100}
    ops = Counter()
    for p in problems:
        lines = p.solution.splitlines()
        assert lines[-1] == f"The answer is {p.answer}."
        equations = [_EQUATION.search(line) for line in lines[:-1] if " = " in line]
        assert len(equations) == difficulty_of(p), p.solution  # difficulty = number of operations
        value = None
        for m in equations:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert value is None or a == value, p.solution  # each step uses the previous result
            assert c == {"+": a + b, "-": a - b, "x": a * b, "/": a // b}[op] and (op != "/" or a % b == 0)
            assert 1 <= c <= 300
            ops[op] += 1
            value = c
        assert str(value) == p.answer
        assert task.is_correct(task.extract(p.solution), p)
        assert not task.is_correct(str(int(p.answer) + 1), p)
        assert re.fullmatch(r"arith-test-0-d[1-4]-\d{5}", p.id)
    assert min(ops.values()) > 50, ops  # every operation occurs


def test_generator_arguments():
    assert difficulty_of(Problem("gsm8k-3", "q", "1")) is None
    assert generate(0, split="test") == []
    for bad in (dict(split="valid"), dict(difficulties=(5,)), dict(difficulties=())):
        with pytest.raises(ValueError):
            generate(3, **bad)
    custom = generate(3, split="train", answer_prefix="Answer:")
    assert all(p.solution.endswith(f"Answer: {p.answer}.") for p in custom)


# ------------------------------------------------------------------------------------------------
# Extraction, prompts, configs


@pytest.mark.parametrize("fmt, text, expected", [
    ("number", "The answer is 17.", "17"),
    ("number", "the answer is $1,234.50", "1234.50"),
    ("number", "The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("number", "The answer is: **42**", "42"),
    ("number", "The answer is 12 apples.", "12"),
    ("number", "THE ANSWER IS -3", "-3"),
    ("number", "The answer is 3/4.", "3/4"),
    ("number", "The answer is 50%.", "50%"),
    ("number", "The answer is \\$5.", "5"),
    ("number", "The answer is 7.\nWait, the answer is 8.", "8"),
    ("number", "The answer is not clear. The answer is 9.", "9"),
    ("number", "So 3 + 4 = 7.", None),
    ("number", "The answer is", None),
    ("number", "The answer is eight.", None),
    ("number", "", None),
    ("latex", "The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("latex", "The answer is $x^2+1$.", "x^2+1"),
    ("latex", "The answer is (1, 2).", "(1, 2)"),
    ("latex", "Thus $\\boxed{\\{1,2\\}}$", "\\{1,2\\}"),
    ("latex", "The answer is 5. Checking gives \\boxed{6}.", "6"),
    ("latex", "The answer is \\boxed{", None),
    ("letter", "The answer is (B).", "B"),
    ("letter", "the answer is c", "C"),
    ("letter", "The answer is Berlin.", None),
    ("letter", "The answer is a guess.", None),
    ("letter", "So the answer is d", "D"),
    ("letter", "The answer is [A], surely.", "A"),
])
def test_extract(fmt, text, expected):
    task = AnswerTask(name="t", load=list, answer_format=fmt)
    assert task.extract(text) == expected


def test_answer_prefix_is_configurable():
    task = make_task(TaskConfig(kind="arith", n=2, answer_prefix="Final answer:"))
    assert task.extract("Final answer: 12") == "12"
    assert task.extract("The answer is 12") is None
    assert 'End with a line "Final answer: N."' in task.instruction
    assert task.few_shot[0].solution.endswith("Final answer: 18.")


def test_user_message_and_few_shot():
    task = make_task(TaskConfig(kind="arith", n=2, few_shot=2))
    p = task.problems()[0]
    assert task.user_message(p) == task.instruction + "\n\n" + p.question
    assert len(task.few_shot) == 2
    generated = {q.question for q in generate(2000, split="train", difficulties=(1, 2, 3, 4))}
    for kind in ("arith", "math", "multiple_choice"):
        cfg = TaskConfig(kind=kind, path=None if kind == "arith" else "x.jsonl", few_shot=2)
        shots = make_task(cfg).few_shot
        fmt_task = make_task(cfg)
        for shot in shots:
            assert shot.question not in generated
            assert fmt_task.extract(shot.solution) is not None
    assert make_task(TaskConfig(kind="arith", instruction="")).user_message(p) == p.question
    with pytest.raises(ValueError, match="few_shot=9"):
        make_task(TaskConfig(kind="arith", few_shot=9))


def test_problems_are_cached():
    calls = []
    task = AnswerTask(name="t", load=lambda: calls.append(1) or [Problem("t-1", "q", "1")])
    assert task.problems() == task.problems()
    assert calls == [1]
    assert not task.is_correct(None, task.problems()[0])


@pytest.mark.parametrize("conf", TASK_CONFS, ids=lambda p: p.stem)
def test_every_task_yaml_builds(conf, shared_data):
    cfg = build(TaskConfig, OmegaConf.load(conf), f"task[{conf.stem}]")
    assert cfg.name == conf.stem
    assert isinstance(cfg.difficulties, tuple)
    if cfg.kind in NEEDS_PATH:
        assert cfg.path is None
        with pytest.raises(DataError, match=f"task.path is required for kind {cfg.kind}"):
            make_task(cfg)
        return
    task = make_task(cfg)
    problems = task.problems()
    id_start = f"arith-{cfg.split}-" if cfg.kind == "arith" else f"{cfg.name}-"
    assert problems and all(p.id.startswith(id_start) for p in problems)
    assert task.user_message(problems[0]).endswith(problems[0].question)


def test_bad_task_configs():
    with pytest.raises(ConfigError, match="expected one of arith, gsm8k, math"):
        build(TaskConfig, {"kind": "gsm9k"}, "task")
    with pytest.raises(ConfigError, match="unknown config key task.nn"):
        build(TaskConfig, {"nn": 3}, "task")
    with pytest.raises(ConfigError, match="difficulties"):
        build(TaskConfig, {"difficulties": [0, 5]}, "task")
    with pytest.raises(ConfigError, match="split"):
        build(TaskConfig, {"split": "valid"}, "task")
    assert build(TaskConfig, {"difficulties": [1, 3]}, "task").difficulties == (1, 3)


def test_one_jsonl_reader_names_file_and_line(tmp_path):
    """mcts/jsonl.py: the reader every format goes through; a half-written last line is dropped only
    when the caller allows it (trees, metrics), never in the middle of a file."""
    from mcts.jsonl import read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3', encoding="utf-8")
    assert read_jsonl(path, partial_last=True) == [{"a": 1}, {"a": 2}]
    with pytest.raises(DataError, match=re.escape(f"{path}:4: not a JSON line")):
        read_jsonl(path, error=DataError)
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not a JSON line")):
        read_jsonl(path, partial_last=True)
    path.write_text('[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: expected a JSON object, got list")):
        read_jsonl(path)
