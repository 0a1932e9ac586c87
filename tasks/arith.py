"""Generated arithmetic word problems: small whole numbers, 1 to 4 operations (+, -, x, /).

A problem follows one person's count of some objects through `difficulty` operations, in varied
wording ("buys 5 more", "gives 3 to Zara", "has 4 boxes. Each of the 4 boxes holds 6", "splits them
into 3 equal groups and keeps one group", "shares them equally among 3 friends"). Every
intermediate result is a whole number from 1 to MAX_VALUE, so a 135M-parameter model can do the
arithmetic. The reference solution has one line per step, one equation per operation, and ends
with "The answer is N.":

    Tom starts with 12 apples.
    He buys 5 more, so 12 + 5 = 17.
    He gives away 3, so 17 - 3 = 14.
    The answer is 14.

Determinism and splits: problem i of (split, seed) comes from a random.Random seeded with a SHA-256
digest of ("arith", split, seed, i, attempt), so it is the same in every process and independent of
n. A question belongs to the split chosen by a SHA-256 digest of its text (half test; of the rest, an
eighth dev, for choosing defaults, and the others train); generation resamples (attempt + 1) until the
question lands in its own split and is new within the list. So train, dev and test never share a
question, whatever the seeds and sizes. Problem ids carry the difficulty:
"arith-test-0-d2-00017" (see `difficulty_of`). Difficulties cycle over `difficulties`.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Sequence

from mcts.types import Problem

SPLITS = ("train", "dev", "test")
DEV_SHARE_BYTE = 32  # a question of the train half whose second hash byte is below this is dev: 32/256 = 1/8 (ours)
MAX_DIFFICULTY = 4
MAX_VALUE = 300  # largest intermediate result
# Operand ranges (inclusive), small enough for a 135M model's arithmetic.
START = (2, 50)  # the starting count
ADD_SUB = (2, 30)  # added or taken away
FACTOR = (2, 5)  # "k times as many"
DIVISOR = (2, 10)  # "k equal groups"; the quotient is at least 2
PRODUCT = ((2, 10), (2, 12))  # "a boxes of b"
START_PRODUCT_SHARE = 0.2  # problems that start with "a boxes of b" (the first multiplication)
MAX_ATTEMPTS = 10_000  # resampling bound per problem (a handful are needed in practice)

# Hand-written word lists. The built-in few-shot example (tasks/task.py) uses a name and an object
# that are not here, so no generated problem can repeat it.
_PEOPLE = (
    ("Tom", "he"), ("Anna", "she"), ("Liam", "he"), ("Mia", "she"), ("Noah", "he"), ("Emma", "she"),
    ("Leo", "he"), ("Sofia", "she"), ("Ben", "he"), ("Lucy", "she"), ("Omar", "he"), ("Zara", "she"),
    ("Jack", "he"), ("Nina", "she"), ("Ravi", "he"), ("Chloe", "she"), ("Hugo", "he"), ("Maya", "she"),
    ("Ivan", "he"), ("Ella", "she"),
)
_PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}
_OBJECTS = (
    "apples", "marbles", "stickers", "books", "cookies", "cards", "shells", "coins", "stamps", "balloons",
    "toy cars", "beads", "oranges", "candies", "blocks", "buttons", "flowers", "eggs", "ribbons", "pebbles",
)
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("pack", "packs"))

# (question sentence, solution clause); fields: {Name} {Friend} {he} {him} {his} {He} {obj} {k}
# {box} {boxes}. The solution line is "<clause>, so <a> <op> <b> = <c>."
_START = ("{Name} has {v} {obj}.", "{Name} starts with {v} {obj}.", "{Name} owns {v} {obj}.")
_START_LINE = "{Name} starts with {v} {obj}."
_START_PRODUCT = (
    ("{Name} has {a} {boxes}. Each of the {a} {boxes} holds {b} {obj}.", "{Name} has {a} {boxes} of {b}"),
    ("{Name} buys {a} {boxes} of {obj} with {b} {obj} in each {box}.", "{Name} buys {a} {boxes} of {b}"),
)
_ADD = (
    ("{He} buys {k} more {obj}.", "{He} buys {k} more"),
    ("{Friend} gives {him} {k} more {obj}.", "{Friend} gives {him} {k} more"),
    ("{He} finds {k} more {obj}.", "{He} finds {k} more"),
    ("{He} wins {k} {obj} in a game.", "{He} wins {k}"),
)
_SUB = (
    ("{He} gives away {k} {obj}.", "{He} gives away {k}"),
    ("{He} gives {k} {obj} to {Friend}.", "{He} gives {k} to {Friend}"),
    ("{He} loses {k} {obj}.", "{He} loses {k}"),
    ("{He} sells {k} {obj}.", "{He} sells {k}"),
)
_MUL = (
    ("{He} then gets enough {obj} to have {k} times as many as before.", "{He} now has {k} times as many"),
    ("The number of {obj} {he} has is then multiplied by {k}.", "The number is multiplied by {k}"),
)
_MUL_WORDS = {2: ("{He} doubles {his} {obj}.", "{He} doubles them"),
              3: ("{He} triples {his} {obj}.", "{He} triples them")}
_DIV = (
    ("{He} splits them into {k} equal groups and keeps one group.", "{He} keeps one of {k} equal groups"),
    ("{He} puts them equally into {k} {boxes} and keeps one {box}.", "{He} keeps one of {k} equal {boxes}"),
)
_SHARE = ("{He} shares them equally among {k} friends.", "{He} shares them among {k} friends")
_QUESTIONS = ("How many {obj} does {Name} have now?", "How many {obj} does {Name} have in the end?")
_SHARE_QUESTION = "How many {obj} does each friend get?"
_SYMBOL = {"+": "+", "-": "-", "*": "x", "/": "/"}

_ID = re.compile(r"^arith-(?:train|test)--?\d+-d(\d+)-\d+$")


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()


def split_of(question: str) -> str:
    """The split a question text belongs to (fixed by a hash of the text): half the questions are test;
    of the other half, one in eight is dev (for choosing defaults) and the rest train."""
    digest = _digest("arith-split", question)
    if digest[0] % 2:
        return "test"
    return "dev" if digest[1] < DEV_SHARE_BYTE else "train"


def difficulty_of(problem: Problem) -> int | None:
    """The number of operations of a generated problem (from its id), or None for other problems."""
    m = _ID.match(problem.id)
    return int(m.group(1)) if m else None


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _operation(rng: random.Random, v: int) -> tuple[str, int] | None:
    """A random operation applicable to the value `v` as (op, operand), or None if the drawn one is not."""
    op = rng.choice("+-*/")
    if op == "+":
        top = min(ADD_SUB[1], MAX_VALUE - v)
        return (op, rng.randint(ADD_SUB[0], top)) if top >= ADD_SUB[0] else None
    if op == "-":
        top = min(ADD_SUB[1], v - 1)
        return (op, rng.randint(ADD_SUB[0], top)) if top >= ADD_SUB[0] else None
    if op == "*":
        ks = [k for k in range(FACTOR[0], FACTOR[1] + 1) if v * k <= MAX_VALUE]
        return (op, rng.choice(ks)) if ks else None
    ks = [k for k in range(DIVISOR[0], DIVISOR[1] + 1) if v % k == 0 and v // k >= 2]
    return (op, rng.choice(ks)) if ks else None


def _one(rng: random.Random, difficulty: int) -> tuple[str, list[str], int]:
    """(question, solution lines, answer) for one problem, or raises ValueError to resample."""
    name, pronoun = rng.choice(_PEOPLE)
    friend = rng.choice([p for p, _ in _PEOPLE if p != name])
    he, him, his = _PRONOUNS[pronoun]
    (box, boxes), (box2, boxes2) = rng.sample(_CONTAINERS, 2)  # start boxes, then boxes to split into
    fields = dict(Name=name, Friend=friend, him=him, his=his, obj=rng.choice(_OBJECTS), box=box, boxes=boxes)
    sentences: list[str] = []
    lines: list[str] = []
    ops_left = difficulty
    if rng.random() < START_PRODUCT_SHARE:  # a product as the start is the first operation
        a, b = rng.randint(*PRODUCT[0]), rng.randint(*PRODUCT[1])
        v = a * b
        sentence, clause = rng.choice(_START_PRODUCT)
        sentences.append(sentence.format(a=a, b=b, **fields))
        lines.append(clause.format(a=a, b=b, **fields) + f", so {a} x {b} = {v}.")
        ops_left -= 1
    else:
        v = rng.randint(*START)
        sentences.append(rng.choice(_START).format(v=v, **fields))
        lines.append(_START_LINE.format(v=v, **fields))
    question = rng.choice(_QUESTIONS)
    fields.update(box=box2, boxes=boxes2)
    subject = he
    for step in range(ops_left):
        drawn = _operation(rng, v)
        if drawn is None:
            raise ValueError("operation not applicable")
        op, k = drawn
        last = step == ops_left - 1
        if op == "+":
            sentence, clause, new = *rng.choice(_ADD), v + k
        elif op == "-":
            sentence, clause, new = *rng.choice(_SUB), v - k
        elif op == "*":
            options = _MUL + ((_MUL_WORDS[k],) if k in _MUL_WORDS else ())
            sentence, clause, new = *rng.choice(options), v * k
        elif last and rng.random() < 0.5:
            (sentence, clause), new = _SHARE, v // k
            question = _SHARE_QUESTION
        else:
            sentence, clause, new = *rng.choice(_DIV), v // k
        words = dict(fields, k=k, he=subject, He=_cap(subject))
        sentences.append(sentence.format(**words))
        lines.append(clause.format(**words) + f", so {v} {_SYMBOL[op]} {k} = {new}.")
        subject = name if "{Friend}" in sentence else he  # "he" right after a friend is ambiguous
        v = new
    sentences.append(question.format(**fields))
    return " ".join(sentences), lines, v


def generate(n: int, *, split: str = "train", difficulties: Sequence[int] = (1, 2, 3, 4), seed: int = 0,
             answer_prefix: str = "The answer is") -> list[Problem]:
    """`n` problems of `split`; problem i has difficulty difficulties[i % len(difficulties)].

    The same arguments give the same problems in any process, and the first m of n problems are the
    problems of n=m. The reference solution's last line is "<answer_prefix> N."."""
    if split not in SPLITS:
        raise ValueError(f"arith split={split!r}: expected one of {', '.join(SPLITS)}")
    if not difficulties or any(not 1 <= d <= MAX_DIFFICULTY for d in difficulties):
        raise ValueError(f"arith difficulties={tuple(difficulties)!r}: expected values from 1 to {MAX_DIFFICULTY}")
    if n < 0:
        raise ValueError(f"arith n={n}: must be >= 0")
    problems: list[Problem] = []
    seen: set[str] = set()
    for i in range(n):
        d = difficulties[i % len(difficulties)]
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(int.from_bytes(_digest("arith", split, seed, i, attempt)[:8], "big"))
            try:
                question, lines, answer = _one(rng, d)
            except ValueError:
                continue
            if split_of(question) == split and question not in seen:
                break
        else:  # pragma: no cover - would need an exhausted problem space
            raise RuntimeError(f"could not generate arith problem {i} of split {split}")
        seen.add(question)
        solution = "\n".join([*lines, f"{answer_prefix} {answer}."])
        problems.append(Problem(id=f"arith-{split}-{seed}-d{d}-{i:05d}", question=question, answer=str(answer),
                                solution=solution))
    return problems
