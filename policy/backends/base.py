"""The generation-engine protocol shared by every backend (vLLM, transformers).

A backend holds one model in one engine. It knows nothing about trees: the search, evaluation and
benchmarks all call it with plain, already formatted prompt strings, in batches. To spread work over
several engines (one per GPU, several machines), run several backends and split the batch: no engine
state lives in the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

# Why a sample stopped.
FINISH_STOP = "stop"  # a stop string was generated (it is not part of `text`)
FINISH_EOS = "eos"  # the model emitted its end-of-sequence token
FINISH_LENGTH = "length"  # max_tokens was reached


@dataclass(frozen=True)
class Sample:
    """One generated continuation.

    text: the continuation, without the matched stop string and without the EOS token.
    num_tokens: generated tokens (including those of a matched stop string, excluding nothing else).
    logprob: the summed log-probability of the generated tokens under the sampling model
        (un-tempered log-softmax of the logits).
    finish_reason: FINISH_STOP, FINISH_EOS or FINISH_LENGTH.
    """

    text: str
    num_tokens: int
    logprob: float
    finish_reason: str


@dataclass(frozen=True)
class Completion:
    """The n samples for one prompt, and what the prompt cost."""

    samples: tuple[Sample, ...]
    prompt_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class ChoiceResult:
    """Next-token probabilities of each given choice (not renormalised: they sum to at most 1)."""

    probs: tuple[float, ...]
    prompt_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class SamplingSettings:
    """Settings of one `sample` call. Defaults are neutral; callers pass config values.

    seeds: one seed per prompt of the call (e.g. `ExpandRequest.seed`), or None. Where an engine honours
        them, a prompt's n samples depend on its seed only, not on the other prompts of the call:
        hf draws each sample with its own torch.Generator, seeded from (seed, sample index); vLLM on a
        GPU passes `SamplingParams(seed=...)`. vLLM's CPU engine ignores them (per-request seeds crash
        it, docs/notes.md): there the engine seed (`backend.seed`) alone seeds sampling. Without seeds, hf
        seeds each call from the engine seed and the call's index.
    """

    n: int = 1
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None


def check_seeds(prompts: Sequence[str], settings: SamplingSettings) -> None:
    """Raise ValueError unless `settings` gives one seed per prompt, or none (a caller's mistake)."""
    if settings.seeds is not None and len(settings.seeds) != len(prompts):
        raise ValueError(f"{len(settings.seeds)} seeds for {len(prompts)} prompts: give one seed per prompt, or none")


@dataclass
class Usage:
    """Token accounting, per call and cumulative. Mutable: it is a counter a backend owns."""

    calls: int = 0
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0

    def add(self, other: "Usage") -> None:
        self.calls += other.calls
        self.prompts += other.prompts
        self.prompt_tokens += other.prompt_tokens
        self.generated_tokens += other.generated_tokens
        self.cached_tokens += other.cached_tokens

    def as_dict(self) -> dict[str, int]:
        return dict(
            calls=self.calls,
            prompts=self.prompts,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            cached_tokens=self.cached_tokens,
        )


class Backend(Protocol):
    """A generation engine serving one checkpoint."""

    name: str
    model_path: str
    usage: Usage  # cumulative since the backend was created
    last_usage: Usage  # of the most recent call

    def sample(self, prompts: Sequence[str], settings: SamplingSettings) -> list[Completion]:
        """For each prompt, `settings.n` continuations; one Completion per prompt, in order."""
        ...

    def choice_probs(self, prompts: Sequence[str], choices: Sequence[str]) -> list[ChoiceResult]:
        """For each prompt, the probability of each choice as the very next token.

        A choice is a short string whose first token is scored (e.g. "A", " Yes")."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under this model's tokenizer (no special tokens added)."""
        ...

    def load(self, model_path: str) -> None:
        """Serve a new checkpoint (after training): frees the old engine first, no leaks."""
        ...

    def close(self) -> None:
        """Free the engine (processes, memory). Idempotent."""
        ...
