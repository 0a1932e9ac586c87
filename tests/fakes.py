"""A scripted fake policy for search tests: sums like "2+3+4" solved one addition per line.

The correct solution of numbers n_0..n_k is the lines "S_0+n_1 = S_1", ..., "S_{k-1}+n_k = S_k",
"The answer is S_k" (S_i the running sums). Each step is sampled (deterministically from the request
seed) among the correct continuation of the *stated* running total and a few wrong ones; the evaluator
scores partial solutions whose steps are all correct higher, with deterministic noise; the verifier
reads "The answer is N".
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from mcts.types import EvalRequest, Evaluation, Expansion, ExpandRequest, Problem, StepSample

ANSWER = re.compile(r"The answer is (-?\d+)")
RESULT = re.compile(r"= (-?\d+)\s*$")


def sum_problem(numbers: Sequence[int], pid: str | None = None) -> Problem:
    question = "+".join(str(n) for n in numbers)
    return Problem(id=pid or question, question=question, answer=str(sum(numbers)))


def numbers_of(problem: Problem) -> list[int]:
    return [int(x) for x in problem.question.split("+")]


def correct_steps(problem: Problem) -> list[str]:
    nums = numbers_of(problem)
    steps, total = [], nums[0]
    for n in nums[1:]:
        steps.append(f"{total}+{n} = {total + n}")
        total += n
    return steps + [f"The answer is {total}"]


def prefix_correct(problem: Problem, steps: Sequence[str]) -> bool:
    return list(steps) == correct_steps(problem)[: len(steps)]


def stated_total(problem: Problem, steps: Sequence[str]) -> int:
    for step in reversed(steps):
        m = RESULT.search(step)
        if m:
            return int(m.group(1))
    return numbers_of(problem)[0]


def candidates(problem: Problem, steps: Sequence[str]) -> list[str]:
    """The continuations offered after `steps`: the right one first, then wrong ones."""
    nums = numbers_of(problem)
    total = stated_total(problem, steps)
    depth = len(steps)
    if depth < len(nums) - 1:
        n = nums[depth + 1]
        return [f"{total}+{n} = {total + n + d}" for d in (0, 1, -1, 2)]
    return [f"The answer is {total + d}" for d in (0, 1, -2)]


def unit_noise(*parts) -> float:
    """A deterministic number in [0, 1) from `parts` (stable across processes)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class FakePolicy:
    """Expander + Evaluator + Verifier; records every batched call.

    p_right: probability of sampling the right continuation (the rest is spread over wrong ones).
    noise: half-width of the uniform noise on self-evaluation scores.
    right_score, wrong_score: self-evaluation centre for correct / incorrect partial solutions.
    """

    p_right: float = 0.4
    noise: float = 0.1
    right_score: float = 0.75
    wrong_score: float = 0.35
    tokens_per_step: int = 0  # 0: number of words
    expand_calls: list[int] = field(default_factory=list)
    evaluate_calls: list[int] = field(default_factory=list)
    expand_log: list[ExpandRequest] = field(default_factory=list)

    def _sample_step(self, rng: random.Random, problem: Problem, steps: Sequence[str]) -> tuple[str, float]:
        options = candidates(problem, steps)
        wrong = (1 - self.p_right) / (len(options) - 1)
        probs = [self.p_right] + [wrong] * (len(options) - 1)
        i = rng.choices(range(len(options)), probs)[0]
        return options[i], math.log(probs[i])

    def _tokens(self, text: str) -> int:
        return self.tokens_per_step or max(1, len(text.split()))

    def expand(self, requests: Sequence[ExpandRequest]) -> list[Expansion]:
        self.expand_calls.append(len(requests))
        self.expand_log.extend(requests)
        out = []
        for r in requests:
            rng = random.Random(r.seed)
            samples = []
            for _ in range(r.n):
                steps, texts, logprob, tokens = list(r.steps), [], 0.0, 0
                while True:
                    text, lp = self._sample_step(rng, r.problem, steps)
                    texts.append(text)
                    steps.append(text)
                    logprob += lp
                    tokens += self._tokens(text)
                    if not r.to_end or ANSWER.search(text):
                        break
                samples.append(StepSample(text="\n".join(texts), num_tokens=tokens, logprob=logprob,
                                          finished=bool(r.to_end)))
            out.append(Expansion(tuple(samples), prompt_tokens=10 + 5 * len(r.steps), cached_tokens=5 * len(r.steps)))
        return out

    def evaluate(self, requests: Sequence[EvalRequest]) -> list[Evaluation]:
        self.evaluate_calls.append(len(requests))
        out = []
        for r in requests:
            # a to-the-end step holds several lines: judge the lines
            lines = [line for step in r.steps for line in step.split("\n")]
            centre = self.right_score if prefix_correct(r.problem, lines) else self.wrong_score
            score = centre + self.noise * (2 * unit_noise(r.problem.id, *r.steps) - 1)
            out.append(Evaluation(min(1.0, max(0.0, score)), prompt_tokens=20, cached_tokens=3))
        return out

    def extract(self, text: str) -> str | None:
        m = ANSWER.search(text)
        return m.group(1) if m else None

    def is_correct(self, predicted: str | None, problem: Problem) -> bool:
        return predicted is not None and predicted.strip() == problem.answer.strip()
