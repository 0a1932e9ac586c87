"""The search's Expander and Evaluator implemented on a generation Backend.

One wave of the search becomes a constant number of backend calls: expansions are grouped by their
sampling settings (root breadth, inner breadth, to-the-end), self-evaluations go in one call.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from mcts.types import EvalRequest, Evaluation, Expansion, ExpandRequest, StepSample
from policy.backends.base import FINISH_STOP, Backend, SamplingSettings
from policy.prompts import PromptFormatter


@dataclass(frozen=True)
class GenerationConfig:
    """The `generation` config group: how steps and solutions are sampled.

    temperature, top_p: step sampling (MCTS-DPO reference: temperature 1.0, top_p 1.0 for search;
        we default lower for a 135M model, whose samples at T=1 are mostly noise).
    step_max_tokens: the longest single step.
    solution_max_tokens: the longest whole solution (to-the-end expansions, greedy/sampled eval).
    """

    temperature: float = 0.8
    top_p: float = 0.95
    step_max_tokens: int = 64
    solution_max_tokens: int = 256


class StepPolicy:
    """Expander + Evaluator over one backend and one prompt formatter."""

    def __init__(self, backend: Backend, formatter: PromptFormatter, gen: GenerationConfig, *,
                 eval_with_reference: bool):
        self.backend = backend
        self.formatter = formatter
        self.gen = gen
        self.eval_with_reference = eval_with_reference

    def expand(self, requests: Sequence[ExpandRequest]) -> list[Expansion]:
        sep = self.formatter.cfg.step_separator
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.n, r.to_end)].append(i)
        out: list[Expansion | None] = [None] * len(requests)
        for (n, to_end), idx in groups.items():
            settings = SamplingSettings(
                n=n, temperature=self.gen.temperature, top_p=self.gen.top_p,
                max_tokens=self.gen.solution_max_tokens if to_end else self.gen.step_max_tokens,
                stop=() if to_end else (sep,),
            )
            prompts = [self.formatter.solution_prompt(requests[i].problem, requests[i].steps) for i in idx]
            for i, completion in zip(idx, self.backend.sample(prompts, settings)):
                samples = tuple(
                    StepSample(text=s.text.strip() if to_end else s.text, num_tokens=s.num_tokens,
                               logprob=s.logprob, finished=to_end or s.finish_reason != FINISH_STOP)
                    for s in completion.samples
                )
                out[i] = Expansion(samples, completion.prompt_tokens, completion.cached_tokens)
        return out  # type: ignore[return-value]

    def evaluate(self, requests: Sequence[EvalRequest]) -> list[Evaluation]:
        if not requests:
            return []
        prompts = [self.formatter.eval_prompt(r.problem, r.steps, with_reference=self.eval_with_reference)
                   for r in requests]
        results = self.backend.choice_probs(prompts, list(self.formatter.cfg.eval_choices))
        return [Evaluation(choice_score(r.probs), r.prompt_tokens, r.cached_tokens) for r in results]


def choice_score(probs: Sequence[float]) -> float:
    """p(first choice) renormalised over the choices; 0.5 when the model gives them no mass."""
    total = sum(probs)
    return probs[0] / total if total > 0 else 0.5
