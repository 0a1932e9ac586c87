"""Answer checking: is a predicted final answer equal to the gold one?

`answers_equal(gold, pred)` decides in two stages.

1. A fast path in pure Python for plain numbers, which is what arithmetic word problems (GSM8K,
   SVAMP, MAWPS, generated problems) produce. Both sides are unwrapped (surrounding whitespace,
   `$...$`, `\\(...\\)`, `\\boxed{...}`, `\\fbox{...}`) and, when both are numbers, compared exactly as
   rationals. A number may have a sign, a currency sign (`$`, `\\$`), thousands commas with groups
   of three ("1,234", also `1{,}234`), a decimal part, a trailing period ("17."), a trailing percent
   sign, or be a fraction ("3/4", `\\frac{3}{4}`, `\\dfrac34`). Hence "2.0" == "2", "0.5" == "1/2"
   == `\\frac{1}{2}`, "1,234" == "1234" == `\\boxed{1234}`, "$18" == "18".
   Decisions:
   - Percent: the sign is dropped, nothing more: "50%" == "50", but "50%" != "0.5". A x100 or /100
     leniency (ToRA's grader) would also make "500" == "5"; see docs/notes.md "Answer checking".
   - Rounded decimals: a decimal with at least 2 places matches a value stated at least 2 places more
     precisely (or a fraction with an infinite expansion) that rounds to it, because data sets store
     rounded values: MAWPS gives 10/3 as "3.33333" and 2/3 as "0.6666666667". So "3.33333" == "10/3"
     and "0.67" == "2/3", but "0.72" != "0.723", "12.3" != "12.31" and integers are never treated as
     rounded ("17" != "17.4").
   When both sides are numbers this decision is final.
2. Otherwise math-verify (`parse` then `verify(gold, pred)`, gold first) decides: LaTeX expressions,
   sets, intervals, equations, units. It runs in worker processes (tasks/_verify_worker.py) with a
   time limit per call; on timeout the worker is killed (a thread could not be: sympy's big-integer
   arithmetic holds the GIL) and the answer is "not equal" for that call only: it is logged at
   WARNING with both inputs and not cached, so a later call asks again. Inputs longer than
   MAX_VERIFY_CHARS get only the fast path. math-verify's answers are cached.
   A worker that cannot start (math-verify missing, a broken environment) is a `VerifierError`
   naming the worker, logged at WARNING with the inputs, raised by this and every later call that
   needs math-verify: never a silent "not equal".

Two equal strings (after unwrapping) are always equal. Everything here is thread-safe.
`letters_equal` compares multiple-choice letters ("B", "(B)", "b", "B)").
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

log = logging.getLogger(__name__)

MAX_VERIFY_CHARS = 1000  # longer answers get only the fast path (no model states such an answer)
MAX_NUMBER_CHARS = 200  # longer strings are not parsed as numbers (int() of 5000 digits is refused)
MAX_WORKERS = 2  # math-verify worker processes at most (callers beyond that wait for one)
WORKER_START_TIMEOUT_S = 120.0  # importing sympy in a fresh process; generous for a loaded machine
CACHE_SIZE = 65_536  # (gold, pred) pairs remembered; the search asks about the same answers often
_WORKER_SCRIPT = Path(__file__).with_name("_verify_worker.py")


# ---------------------------------------------------------------------------------------------
# Unwrapping and numbers


def braced_end(s: str, open_index: int) -> int | None:
    """Index of the brace closing the one at `open_index`, or None if unbalanced."""
    depth = 0
    for i in range(open_index, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


_BOX_START = re.compile(r"^\\(?:boxed|fbox)\s*\{")
MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def unwrap(s: str) -> str:
    """`s` without surrounding whitespace, math delimiters, \\boxed{}/\\fbox{} or braces (repeatedly)."""
    for _ in range(20):
        s = s.strip()
        before = s
        for left, right in MATH_DELIMITERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):len(s) - len(right)]
                break
        else:
            m = _BOX_START.match(s)
            start = m.end() - 1 if m else (0 if s.startswith("{") else None)
            if start is not None and braced_end(s, start) == len(s) - 1:
                s = s[start + 1:-1]
        if s == before:
            break
    return s


@dataclass(frozen=True)
class _Number:
    """An exact value and, for a decimal, how many places it was written with (None: exact form)."""

    value: Fraction
    places: int | None


_DECIMAL = re.compile(r"^(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")
_SLASH = re.compile(r"^(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)$")
_FRAC = re.compile(r"^\\[dt]?frac(?:\{(-?\d+)\}|(\d))(?:\{(-?\d+)\}|(\d))$")
_THIN_SPACES = re.compile(r"\\[,!;: ]|~")  # LaTeX spacing, as in 1\,000


def _parse_number(s: str) -> _Number | None:
    s = unwrap(s)
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    s = _THIN_SPACES.sub("", s.replace("{,}", ",").replace("\u2212", "-"))
    if s.endswith("\\%"):
        s = s[:-2]
    elif s.endswith("%"):
        s = s[:-1]
    sign = 1
    if s[:1] in ("-", "+"):
        sign, s = (-1 if s[0] == "-" else 1), s[1:].lstrip()
    for currency in ("\\$", "$"):
        if s.startswith(currency):
            s = s[len(currency):].lstrip()
            break
    if s.endswith(".") and s[:-1][-1:].isdigit():
        s = s[:-1]
    try:
        if any(c.isdigit() for c in s) and _DECIMAL.match(s):
            places = len(s.split(".")[1]) if "." in s else 0
            return _Number(sign * Fraction(s.replace(",", "")), places)
        m = _SLASH.match(s) or _FRAC.match(s)
        if m:
            parts = [p for p in m.groups() if p is not None]
            numerator, denominator = Fraction(parts[0]), Fraction(parts[1])
            if denominator != 0:
                return _Number(sign * numerator / denominator, None)
    except (ValueError, ZeroDivisionError):
        pass
    return None


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    places = _terminating_places(value)
    if places is None:
        return f"{value.numerator}/{value.denominator}"
    digits = abs(value.numerator) * 10**places // value.denominator
    text = str(digits).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + text[:-places] + "." + text[-places:]


def normalize_number(s: str | None) -> str | None:
    """The canonical form of a plain number ("1,234" -> "1234", "\\frac{1}{2}" -> "0.5", "2/3" -> "2/3",
    "$5.00" -> "5", "50%" -> "50"), or None if `s` is not one."""
    if not isinstance(s, str):
        return None
    number = _parse_number(s)
    return None if number is None else _format(number.value)


def _terminating_places(value: Fraction) -> int | None:
    """Decimal places of `value`'s finite expansion, or None if it does not terminate."""
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    return max(twos, fives) if d == 1 else None


def _precision(n: _Number) -> float:
    if n.places is not None:
        return n.places
    places = _terminating_places(n.value)
    return float("inf") if places is None else places


def _numbers_equal(a: _Number, b: _Number) -> bool:
    if a.value == b.value:
        return True
    for rounded, precise in ((a, b), (b, a)):
        k = rounded.places
        if k is not None and k >= 2 and _precision(precise) >= k + 2:
            if abs(precise.value - rounded.value) <= Fraction(1, 2 * 10**k):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# math-verify in worker processes


class VerifierError(RuntimeError):
    """The math-verify worker cannot start: answers that need math-verify cannot be checked."""


class _WorkerError(Exception):
    pass


class _NoAnswer(Exception):
    """math-verify gave no answer (time limit, or its worker died): not cached, unlike an answer."""


class _Worker:
    """One math-verify process and its reply buffer; used by one thread at a time."""

    def __init__(self):
        script = _WORKER_SCRIPT
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True,
        )
        self._buffer = b""
        line = self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S)
        if line != "ready":
            why = self._start_failure(line)
            self.kill()
            raise _WorkerError(f"the math-verify worker ({script}) did not start: {why}")

    def _start_failure(self, line: str | None) -> str:
        """Why the worker did not say "ready": its error line, its exit code, or the time limit."""
        if line is not None:
            try:
                return str(json.loads(line)["error"])
            except (ValueError, KeyError, TypeError):
                return f"it wrote {line[:200]!r} instead of 'ready'"
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return f"no 'ready' within {WORKER_START_TIMEOUT_S:.0f} s"
        return f"it exited with code {code} before saying 'ready'"

    def _read_line(self, deadline: float) -> str | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65_536)
            if not chunk:  # the worker died
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("ascii", "replace")

    def ask(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """True/False, or None on timeout or a dead worker (then the worker is killed)."""
        try:
            self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode("ascii"))
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        if line is None:
            self.kill()
            return None
        try:
            reply = json.loads(line)
        except ValueError:
            self.kill()
            return None
        if "error" in reply:
            log.debug("math-verify failed (%s) on gold=%.80r pred=%.80r", reply["error"], gold, pred)
        return bool(reply["ok"])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class _WorkerPool:
    """Up to MAX_WORKERS idle-or-busy workers, started on demand; a forked child starts its own."""

    def __init__(self, size: int):
        self._size = size
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._idle: list[_Worker] = []
        self._slots = threading.BoundedSemaphore(self._size)
        self._failed: str | None = None

    def ask(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """math-verify's answer; None on timeout or a dead worker. Raises VerifierError when no worker
        can start (then, and for every later call of this process)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the inherited pipes belong to the parent
                self._reset()
            slots = self._slots
        with slots:
            with self._lock:
                if self._failed is not None:
                    raise VerifierError(self._failed)
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                try:
                    worker = _Worker()
                except (OSError, _WorkerError) as exc:
                    message = f"{exc} (is math-verify installed? tasks/checker.py needs it for non-numeric answers)"
                    with self._lock:
                        self._failed = message
                    log.warning("%s; comparing gold=%.80r pred=%.80r", message, gold, pred)
                    raise VerifierError(message) from None
            try:
                return worker.ask(gold, pred, timeout_s)
            finally:
                if worker.alive:
                    with self._lock:
                        self._idle.append(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._idle = self._idle, []
        for worker in workers:
            worker.kill()


_POOL = _WorkerPool(MAX_WORKERS)
atexit.register(_POOL.close)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _verify(gold: str, pred: str, timeout_s: float) -> bool:
    """math-verify's answer, cached; raises _NoAnswer (never cached: exceptions are not) or VerifierError."""
    result = _POOL.ask(gold, pred, timeout_s)
    if result is None:
        raise _NoAnswer
    return result


def _verify_once(gold: str, pred: str, timeout_s: float) -> bool:
    """`_verify`, with no answer counted as "not equal" for this call only (logged at WARNING)."""
    started = time.monotonic()
    try:
        return _verify(gold, pred, timeout_s)
    except _NoAnswer:
        log.warning("math-verify gave no answer within %.1f s (time limit %.1f s, or its worker died) on "
                    "gold=%.80r pred=%.80r: not equal this time, not cached", time.monotonic() - started,
                    timeout_s, gold, pred)
        return False


# ---------------------------------------------------------------------------------------------
# The API


def answers_equal(gold: str, pred: str | None, *, timeout_s: float = 2.0) -> bool:
    """Is the predicted answer `pred` equal to `gold`? See the module docstring for the rules.

    None, empty or non-string predictions are not equal; no input raises. math-verify gets at most
    `timeout_s` seconds per call (not counting a worker's start); without an answer in that time the
    call says "not equal" (not cached). Raises VerifierError when math-verify is needed and its
    worker cannot start."""
    if not isinstance(gold, str) or not isinstance(pred, str):
        return False
    g, p = unwrap(gold), unwrap(pred)
    if not g or not p:
        return False
    if g == p:
        return True
    gn, pn = _parse_number(g), _parse_number(p)
    if gn is not None and pn is not None:
        return _numbers_equal(gn, pn)
    if len(g) > MAX_VERIFY_CHARS or len(p) > MAX_VERIFY_CHARS:
        return False
    return _verify_once(g, p, float(timeout_s))


_TEXT = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\s*\{(.*)\}$", re.S)
_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])\)?)[.:]?$")


def choice_letter(s: str | None) -> str | None:
    """The choice letter in "B", "(B)", "b", "B)", "B.", "\\boxed{B}", "\\text{(B)}" (upper case), or None."""
    if not isinstance(s, str):
        return None
    s = unwrap(s)
    m = _TEXT.match(s)
    if m:
        s = unwrap(m.group(1))
    m = _LETTER.match(s)
    return next(g for g in m.groups() if g).upper() if m else None


def letters_equal(gold: str, pred: str | None) -> bool:
    """Do `gold` and `pred` name the same multiple-choice letter ("B" == "(B)" == "b" == "B)")?"""
    g, p = choice_letter(gold), choice_letter(pred)
    return g is not None and g == p
