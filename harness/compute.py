"""The compute ledger: counted tokens -> FLOPs, per phase.

Approximations (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1):
a forward pass costs about 2 x parameters FLOPs per processed token, forward + backward about 6 x.
DPO training also runs the frozen reference model forward on the same tokens (2 x). Prompt tokens
served from the prefix cache are not recomputed, so they are not charged (`*_uncached` counts them
anyway, for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD_FLOPS_PER_PARAM_TOKEN = 2  # Kaplan et al. 2020
TRAIN_FLOPS_PER_PARAM_TOKEN = 6  # forward + backward, Kaplan et al. 2020


@dataclass(frozen=True)
class InferenceCost:
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int = 0


def inference_flops(params: int, cost: InferenceCost, *, count_cached: bool = False) -> float:
    """FLOPs of generation/scoring: 2 N per processed token (cached prompt tokens are free unless
    `count_cached`)."""
    processed = cost.prompt_tokens + cost.generated_tokens - (0 if count_cached else cost.cached_tokens)
    return float(FORWARD_FLOPS_PER_PARAM_TOKEN * params * processed)


def training_flops(params: int, tokens: int, *, reference_forward: bool = True) -> float:
    """FLOPs of training on `tokens` processed tokens (summed over epochs): 6 N per token for the
    policy plus 2 N per token for the reference model's forward pass (DPO)."""
    per_token = TRAIN_FLOPS_PER_PARAM_TOKEN + (FORWARD_FLOPS_PER_PARAM_TOKEN if reference_forward else 0)
    return float(per_token * params * tokens)


def phase_record(params: int, *, prompt_tokens: int = 0, generated_tokens: int = 0, cached_tokens: int = 0,
                 train_tokens: int = 0, reference_forward: bool = True) -> dict[str, float]:
    """One phase's entry in compute.json."""
    cost = InferenceCost(prompt_tokens, generated_tokens, cached_tokens)
    flops = inference_flops(params, cost) + training_flops(params, train_tokens, reference_forward=reference_forward)
    flops_uncached = inference_flops(params, cost, count_cached=True) + training_flops(
        params, train_tokens, reference_forward=reference_forward)
    return dict(prompt_tokens=prompt_tokens, generated_tokens=generated_tokens, cached_tokens=cached_tokens,
                train_tokens=train_tokens, flops=flops, flops_uncached=flops_uncached)
