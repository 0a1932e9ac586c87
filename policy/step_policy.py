"""The search's Expander and Evaluator implemented on a generation Backend.

One wave of the search becomes a constant number of backend calls: expansions are grouped by their
sampling settings (root breadth, inner breadth, to-the-end), self-evaluations go in one call.

With a tool (`tool.name=python`), a sampled step that opens a program is continued to the output
fence (one engine call for the wave), the wave's programs run in one sandbox batch, and the step
becomes the whole program with its output block (one node in the tree); to-the-end expansions run
their programs as they are written, in rounds of one sandbox batch and one engine call
(policy/tool_use.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Sequence

from mcts.types import EvalRequest, Evaluation, Expansion, ExpandRequest, StepSample
from policy.backends.base import FINISH_STOP, Backend, SamplingSettings
from policy.prompts import PromptFormatter
from policy.tool_use import ToolExecutor, complete_programs, no_program, sample_solutions
from tools.config import ToolConfig
from tools.format import OUTPUT_OPEN, count_programs, opens_code, output_block


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
                 eval_with_reference: bool, tool: ToolConfig | None = None):
        self.backend = backend
        self.formatter = formatter
        self.gen = gen
        self.eval_with_reference = eval_with_reference
        self.executor = ToolExecutor(tool) if tool is not None and tool.enabled else None

    def _settings(self, n: int, to_end: bool) -> SamplingSettings:
        return SamplingSettings(
            n=n, temperature=self.gen.temperature, top_p=self.gen.top_p,
            max_tokens=self.gen.solution_max_tokens if to_end else self.gen.step_max_tokens,
            stop=() if to_end else (self.formatter.cfg.step_separator,),
        )

    def expand(self, requests: Sequence[ExpandRequest]) -> list[Expansion]:
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.n, r.to_end)].append(i)
        prompts = [self.formatter.solution_prompt(r.problem, r.steps) for r in requests]
        calls = [count_programs(r.steps) for r in requests] if self.executor else [0] * len(requests)
        out: list[Expansion | None] = [None] * len(requests)
        steps: dict[int, list[StepSample]] = {}
        cost: dict[int, list[int]] = {}
        for (n, to_end), idx in groups.items():
            settings = replace(self._settings(n, to_end), seeds=tuple(requests[i].seed for i in idx))
            if to_end:
                completions = sample_solutions(self.backend, [prompts[i] for i in idx], settings, self.executor,
                                               prior_calls=[calls[i] for i in idx])
                for i, c in zip(idx, completions):
                    samples = tuple(StepSample(text=s.text.strip(), num_tokens=s.num_tokens, logprob=s.logprob,
                                               finished=True, tool_calls=s.tool_calls) for s in c.samples)
                    out[i] = Expansion(samples, c.prompt_tokens, c.cached_tokens)
                continue
            for i, c in zip(idx, self.backend.sample([prompts[i] for i in idx], settings)):
                steps[i] = [StepSample(text=s.text, num_tokens=s.num_tokens, logprob=s.logprob,
                                       finished=s.finish_reason != FINISH_STOP) for s in c.samples]
                cost[i] = [c.prompt_tokens, c.cached_tokens]
        if self.executor is not None:
            self._complete_programs(prompts, steps, cost, calls)
        for i, samples in steps.items():
            out[i] = Expansion(tuple(samples), cost[i][0], cost[i][1])
        return out  # type: ignore[return-value]

    def _complete_programs(self, prompts: list[str], steps: dict[int, list[StepSample]], cost: dict[int, list[int]],
                           calls: list[int]) -> None:
        """Every sampled step that opens a program becomes the program with its output (one batch). A step
        that opens an output block itself (a made-up output, no program) gets the environment's
        no-program answer, so every output block in a tree is the environment's text."""
        sep = self.formatter.cfg.step_separator
        for samples in steps.values():
            for j, s in enumerate(samples):
                if not s.finished and s.text.lstrip().startswith(OUTPUT_OPEN):
                    call = no_program()
                    samples[j] = replace(s, text=OUTPUT_OPEN + output_block(call.output), tool_calls=(call,))
        where = [(i, j) for i, samples in steps.items() for j, s in enumerate(samples)
                 if not s.finished and opens_code(s.text)]
        if not where:
            return
        done = complete_programs(self.backend, prompts, [(i, steps[i][j].text) for i, j in where],
                                 self._settings(1, False), self.executor, separator=sep, prior_calls=calls)
        for (i, j), (cont, prompt_tokens, cached_tokens) in zip(where, done):
            head = steps[i][j]
            steps[i][j] = StepSample(text=head.text + sep + cont.text if cont.num_tokens else head.text,
                                     num_tokens=head.num_tokens + cont.num_tokens, logprob=head.logprob + cont.logprob,
                                     finished=cont.finish_reason != FINISH_STOP, tool_calls=cont.tool_calls)
            cost[i][0] += prompt_tokens
            cost[i][1] += cached_tokens

    @property
    def tool_stats(self) -> dict:
        """Programs run and sandbox time so far ({} without a tool)."""
        return self.executor.stats.as_dict() if self.executor else {}

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
