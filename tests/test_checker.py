"""Answer checking on real gold answers (GSM8K, MATH), adversarial inputs, time limits and threads."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks import checker
from tasks.checker import answers_equal, letters_equal, normalize_number
from tasks.loaders import load_gsm8k, load_math


@pytest.fixture(scope="module")
def gsm8k_golds(shared_data) -> list[str]:
    return [p.answer for p in load_gsm8k(shared_data / "gsm8k_test.jsonl")]


@pytest.fixture(scope="module")
def math_answers(shared_data) -> list[str]:
    """The distinct gold answers of MATH test (2043 of the 5000 problems' answers), sorted."""
    return sorted({p.answer for p in load_math(shared_data / "math_test.jsonl")})


def _with_commas(n: int) -> str:
    return f"{n:,}"


def test_gsm8k_golds_in_three_forms(gsm8k_golds):
    assert len(gsm8k_golds) == 1319
    for gold in gsm8k_golds:
        n = int(gold)  # every GSM8K test answer is an integer
        for form in (_with_commas(n), str(n), f"\\boxed{{{n}}}", f"\\boxed{{{_with_commas(n)}}}"):
            assert answers_equal(gold, form), (gold, form)
        for wrong in (str(n + 1), _with_commas(n + 1), f"\\boxed{{{n + 1}}}", str(n - 1)):
            assert not answers_equal(gold, wrong), (gold, wrong)


def test_math_answers_equal_themselves(math_answers):
    for a in math_answers:
        assert answers_equal(a, a)
        assert answers_equal(a, f"\\boxed{{{a}}}")


def test_math_answers_equal_themselves_in_math_verify(math_answers):
    # answers_equal(a, a) never reaches math-verify (equal strings are equal), so this sends the
    # answers to the worker directly. All 2043 distinct answers pass, measured in 10-17 s on 2 busy
    # cores; a seeded sample of 500 keeps the suite quick.
    sample = random.Random(3).sample(math_answers, 500)
    failed = [a for a in sample if not checker._verify(a, a, 5.0)]
    assert failed == []


def test_math_wrong_numbers_are_not_equal(math_answers):
    numbers = [(a, checker._parse_number(a)) for a in math_answers]
    numbers = [(a, n.value) for a, n in numbers if n is not None]
    assert len(numbers) > 500
    rng = random.Random(0)
    pairs = []
    while len(pairs) < 200:
        (a, va), (b, vb) = rng.sample(numbers, 2)
        if va != vb:
            pairs.append((a, b))
    assert [p for p in pairs if answers_equal(*p)] == []


def test_math_wrong_expressions_are_not_equal(math_answers):
    # Answers of two different problems, both not plain numbers: measured 0 equal in 300 seeded
    # pairs; a seeded 150 keep the test at a few seconds. A pair that is really equal (the same
    # value written differently) would show up here by name.
    others = [a for a in math_answers if normalize_number(a) is None]
    rng = random.Random(1)
    pairs = [tuple(rng.sample(others, 2)) for _ in range(150)]
    assert [p for p in pairs if answers_equal(*p)] == []


@pytest.mark.parametrize("gold, pred, equal", [
    ("1234", "1,234", True), ("1234", "\\boxed{1234}", True), ("1234", "$1,234", True), ("1234", "1234.", True),
    ("2", "2.0", True), ("0.5", "1/2", True), ("0.5", "\\frac{1}{2}", True), ("0.75", "\\dfrac34", True),
    ("-0.5", "-\\frac{1}{2}", True), ("-0.5", "\\frac{-1}{2}", True), ("18", "\\$18", True), ("18", "$18$", True),
    ("10000", "10{,}000", True), ("1000", "1\\,000", True),
    # percent: the sign is dropped, never x100 (docs/notes.md: no ToRA-style leniency)
    ("50", "50%", True), ("50", "50\\%", True), ("0.5", "50%", False), ("5", "500", False),
    # rounded gold values (MAWPS) against more precise predictions, and what is not rounding
    ("3.33333", "10/3", True), ("0.6666666667", "2/3", True), ("0.67", "2/3", True),
    ("0.72", "0.723", False), ("12.3", "12.31", False), ("17", "17.4", False), ("17", "16.6", False),
    ("1,234", "1234", True), ("12", "1,2", False), ("3", "4", False),
    # math-verify
    ("x+1", "1+x", True), ("\\frac{x+2}{7}", "\\frac{2+x}{7}", True), ("[0,\\infty)", "[0, \\infty)", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True), ("\\pi", "3", False), ("x^2", "x^3", False),
    # nothing
    ("5", None, False), ("5", "", False), ("5", "   ", False), ("", "", False), ("5", "\\boxed{}", False),
])
def test_answers_equal_cases(gold, pred, equal):
    assert answers_equal(gold, pred) is equal


def test_normalize_number():
    assert normalize_number("1,234") == "1234"
    assert normalize_number("\\frac{1}{2}") == "0.5"
    assert normalize_number("2/3") == "2/3"
    assert normalize_number("$5.00") == "5"
    assert normalize_number("50%") == "50"
    assert normalize_number("-0.125") == "-0.125"
    assert normalize_number("\\boxed{-7}") == "-7"
    for not_a_number in ("abc", "1e5", "x=5", "1/0", "", "1,23", None, 5):
        assert normalize_number(not_a_number) is None


def test_letters_equal():
    for pred in ("B", "(B)", "b", "B)", "B.", "[B]", " (b) ", "\\boxed{B}", "\\text{(B)}", "$B$"):
        assert letters_equal("B", pred), pred
        assert letters_equal("(B)", pred), pred
    for pred in ("C", "Bb", "AB", "", None, "(B", "The answer is B"):
        assert not letters_equal("B", pred), pred


def _adversarial(rng: random.Random) -> list[str]:
    fixed = [
        "10^10^10^10", "10^{10^{10}}", "9^{9^{9^9}}", "9^{9^{9^9}}-1", "(10^{100})!", "2^{2^{2^{2^{2^{2}}}}}",
        "9" * 5000, "9" * 999, "1" + "0" * 400, "\\frac{", "\\frac{1}{", "\\boxed{", "}}}}", "{" * 500,
        "{" * 300 + "1" + "}" * 300, "(" * 400 + ")" * 400, "\\sqrt{" * 100, "x" * 999, "\x00", "a\x00b",
        "\ud800", "é∑∫√π∞", "１２３", "½", "\u2212" + "5", "NaN", "inf", "-inf", "1e308", "1e99999", "0/0",
        "\\frac{1}{0}", "1/0", "$$", "$", "\\", "\\\\\\", "\\boxed{\\boxed{\\boxed{1}}}", "\\left(", "\\right)",
        "\\begin{pmatrix}" * 20, "&" * 100, "%" * 50, "," * 100, ".", "-", "+", "=", "x=", "\\text{", "\n\n\n",
    ]
    alphabet = "0123456789+-*/^_{}()[]\\$%.,= xyzabc\\frac\\sqrt\\boxed!|&'\"\t\n"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    return fixed + randoms


def test_adversarial_inputs_do_not_crash_or_hang():
    rng = random.Random(0)
    strings = _adversarial(rng)
    golds = ["5", "\\frac{1}{2}", "x+1"]
    timeout_s = 0.3  # about 20 of these calls hit the limit; each also restarts a worker (~0.5 s)
    started = time.monotonic()
    slowest = 0.0
    for s in strings:
        for gold, pred in ((rng.choice(golds), s), (s, s[::-1])):
            t0 = time.monotonic()
            assert isinstance(answers_equal(gold, pred, timeout_s=timeout_s), bool)
            slowest = max(slowest, time.monotonic() - t0)
        assert normalize_number(s) is None or isinstance(normalize_number(s), str)
        assert isinstance(letters_equal("A", s), bool)
    # A safety bound, not a benchmark: one call is the time limit plus, after a killed worker,
    # starting a new one (importing sympy, about 0.5 s here).
    assert slowest < timeout_s + 20
    assert time.monotonic() - started < 60


def test_a_hanging_comparison_is_cut_off_and_the_checker_recovers():
    # sympy computes 10^(10^10) with the GIL held: only killing the worker process stops it.
    started = time.monotonic()
    assert answers_equal("10^{10^{10}}", "7", timeout_s=0.5) is False
    assert time.monotonic() - started < 15
    assert answers_equal("x+1", "1+x")


def test_same_results_from_many_threads(math_answers):
    rng = random.Random(2)
    sample = rng.sample(math_answers, 60)
    pairs = [(a, a) for a in sample] + [(a, rng.choice(sample)) for a in sample]
    pairs += [("1234", "1,234"), ("0.5", "1/2"), ("x+1", "1+x"), ("7", "8")] * 5
    checker._verify.cache_clear()
    sequential = [answers_equal(g, p) for g, p in pairs]
    checker._verify.cache_clear()
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda gp: answers_equal(*gp), pairs))
    assert concurrent == sequential
    assert sum(sequential) >= 60 + 5


def test_a_comparison_without_an_answer_is_not_cached(monkeypatch, caplog):
    replies = iter([None, True])  # a timeout (or a dead worker), then math-verify's answer
    monkeypatch.setattr(checker._POOL, "ask", lambda gold, pred, timeout_s: next(replies))
    checker._verify.cache_clear()
    with caplog.at_level("WARNING", logger="tasks.checker"):
        assert answers_equal("y^{3}+2", "2+y^{3}") is False
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "no answer" in record.getMessage() and "y^{3}+2" in record.getMessage() and "2+y^{3}" in record.getMessage()
    assert answers_equal("y^{3}+2", "2+y^{3}") is True  # asked again, not "not equal" from a cache
    assert answers_equal("y^{3}+2", "2+y^{3}") is True  # an answer is cached (the iterator is spent)


BLOCKED_IMPORT = ("import runpy, sys\nsys.modules['math_verify'] = None  # `import math_verify` fails\n"
                  "runpy.run_path({worker!r}, run_name='__main__')\n")


@pytest.mark.parametrize("script, why", [
    (BLOCKED_IMPORT, "importing math_verify failed: .*Error"),
    ("import sys\nsys.exit(3)\n", "it exited with code 3"),
])
def test_a_worker_that_cannot_start_is_an_error_naming_itself(monkeypatch, tmp_path, caplog, script, why):
    fake = tmp_path / "broken_worker.py"
    fake.write_text(script.format(worker=str(checker._WORKER_SCRIPT)))
    monkeypatch.setattr(checker, "_WORKER_SCRIPT", fake)
    monkeypatch.setattr(checker, "_POOL", checker._WorkerPool(1))
    checker._verify.cache_clear()
    with caplog.at_level("WARNING", logger="tasks.checker"):
        with pytest.raises(checker.VerifierError,
                           match=f"math-verify worker .*broken_worker.py.* did not start: {why}"):
            answers_equal("z+1", "1+z")
    assert any("z+1" in r.getMessage() and "1+z" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    with pytest.raises(checker.VerifierError, match="did not start"):  # every later call, not a silent False
        answers_equal("\\frac{z}{2}", "z/2")
    assert answers_equal("1/2", "0.5") and not answers_equal("3", "4")  # numbers never need the worker
    checker._verify.cache_clear()


def test_test_time_search_votes_group_answers_the_checker_calls_equal(monkeypatch):
    from harness import evaluation
    from harness.evaluation import EvalConfig, evaluate_problems
    from mcts.search import SearchConfig
    from mcts.tree import ROOT, Tree
    from mcts.types import Problem
    from policy.step_policy import GenerationConfig
    from tasks import TaskConfig, make_task

    problem = Problem("p", "q", "18")
    tree = Tree(problem=problem)
    tree.root.visits = 7
    for answer, visits in (("18", 2), ("18.0", 2), ("17", 3)):  # Q 0.5 each: vote weight 0.75 per visit
        tree.add_child(ROOT, terminal=True, answer=answer, visits=visits, value_sum=0.5 * visits)
    monkeypatch.setattr(evaluation, "run_search", lambda problems, **kwargs: iter([tree]))
    task = make_task(TaskConfig(name="arith_test", kind="arith", split="test", n=1))
    result = evaluate_problems(task, [problem], backend=None, formatter=None, gen=GenerationConfig(),
                               cfg=EvalConfig(mode="mcts"), search=SearchConfig(), params=1)
    (record,) = result["records"]
    assert record["prediction"] == "18" and record["correct"]  # 18 and 18.0 together (3.0) beat 17 (2.25)
