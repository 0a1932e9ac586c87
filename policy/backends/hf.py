"""The transformers backend: batched `generate` with a KV cache, left padding, on the CPU or a GPU.

Slower than vLLM but has no extra dependency and computes in the dtype of the config (fp32 on CPU by
default), so it is also the reference the vLLM numbers are checked against. `backend.device` picks
the device (auto: a CUDA GPU when torch sees one); the weights are loaded in `backend.dtype`.

Seeds: every sampled sequence draws its tokens from its own torch.Generator, seeded from its prompt's
seed (`SamplingSettings.seeds`, e.g. `ExpandRequest.seed`) and its sample index, so a prompt's samples
depend on its seed alone, not on the other prompts of the call or on `max_batch_size` (up to the
floating-point noise of a different batch shape). Sampling is done by `SeededSampling`, a logits
processor after the log-prob recorder: temperature, then top-p (as transformers' TopPLogitsWarper and
vLLM: the fewest most likely tokens whose probability reaches top_p), then one uniform draw per row
mapped through the cumulative distribution; every other token is set to -inf, and generate runs in
greedy mode, which takes the drawn token. A call without seeds seeds prompt i from
derive_seed(backend.seed, call index, i).

Log-probabilities: a pass-through logits processor records log_softmax of the *raw* logits at each
step (it runs before SeededSampling applies temperature and top-p), so
`Sample.logprob` is the un-tempered model log-probability of the generated tokens, as in vLLM's
default `logprobs_mode="raw_logprobs"`. Memory: one step of logits, not the whole generation.
"""

from __future__ import annotations

import gc
import logging
from typing import Sequence

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from mcts.seeds import derive_seed  # the project's one seed derivation
from policy.backends import BackendConfig, BackendError
from policy.backends.base import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    ChoiceResult,
    Completion,
    Sample,
    SamplingSettings,
    Usage,
    check_seeds,
)
from policy.models import resolve_device

log = logging.getLogger(__name__)

# A stop string can span tokens; the stopping criterion decodes this many tokens more than the
# longest stop string has characters (a token decodes to at least one character, or to a partial
# UTF-8 byte that completes in the next token).
STOP_WINDOW_SLACK_TOKENS = 2


def torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    try:
        return getattr(torch, {"float": "float32", "half": "float16"}.get(name, name))
    except AttributeError:
        raise BackendError(f"backend.dtype={name!r} is not a torch dtype (float32, bfloat16, float16, auto)") from None


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in `text`, or None."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    return best


class StopOnStrings(StoppingCriteria):
    """Per-sequence stop once the generated text (not the prompt) contains a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_len = prompt_len
        self.window = max(len(s) for s in stops) + STOP_WINDOW_SLACK_TOKENS

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [first_stop(t, self.stops) is not None for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class RecordLogprobs(LogitsProcessor):
    """Pass-through: records the raw log-prob of each sampled token (known one step later)."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.prev: torch.Tensor | None = None  # log_softmax of the last step's raw logits
        self.steps: list[torch.Tensor] = []  # [batch] log-prob of the token generated at step t

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.prev.gather(1, tokens[:, None]).squeeze(1))

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[batch, generated] token log-probs (columns beyond a sequence's end are meaningless)."""
        last = self.prompt_len + len(self.steps)
        if self.prev is not None and sequences.shape[1] > last:
            self._take(sequences[:, last])
        self.prev = None
        if not self.steps:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.steps, dim=1).cpu()


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[batch, vocab] bool: the tokens top-p keeps, the fewest most likely ones whose probability
    reaches `top_p` (always at least the most likely one), as transformers' TopPLogitsWarper."""
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = torch.sort(probs, dim=-1)  # ascending
    drop_sorted = sorted_probs.cumsum(dim=-1) <= (1.0 - top_p)
    drop_sorted[:, -1] = False
    return ~drop_sorted.scatter(1, order, drop_sorted)


def draw_tokens(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """[batch] token ids: row i drawn from `probs[i]` (unnormalised is fine) with one uniform number
    of `generators[i]`, through the cumulative distribution (a token of probability 0 is never drawn)."""
    uniforms = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(probs.device)
    cdf = probs.double().cumsum(dim=-1)
    targets = (uniforms.double() * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


class SeededSampling(LogitsProcessor):
    """Samples each row with its own generator (see the module docstring): returns scores that are
    -inf except at the drawn token, for generate's greedy mode to take. Runs after RecordLogprobs."""

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_p: float):
        self.generators = list(generators)
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        probs = probs * top_p_mask(probs, self.top_p)
        tokens = draw_tokens(probs, self.generators)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)


def row_seeds(prompt_seeds: Sequence[int], n: int) -> list[int]:
    """The seed of each sampled sequence, prompt by prompt: derive_seed(prompt seed, sample index)."""
    return [derive_seed(seed, j) for seed in prompt_seeds for j in range(n)]


class HFBackend:
    """A transformers model serving `sample`, `choice_probs` and `count_tokens`."""

    name = "hf"

    def __init__(self, model_path: str, cfg: BackendConfig):
        self.cfg = cfg
        try:
            self.device = torch.device(resolve_device(cfg.device, key="backend.device"))
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        self.usage = Usage()
        self.last_usage = Usage()
        self.model = None
        self.tokenizer = None
        self.model_path = ""
        self.load(model_path)

    # ---- lifecycle -------------------------------------------------------------------------

    def load(self, model_path: str) -> None:
        self._free()
        log.info("hf backend: loading %s (%s on %s)", model_path, self.cfg.dtype, self.device)
        tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(self.cfg.dtype))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.eos_ids = self._eos_ids()

    def close(self) -> None:
        self._free()

    def _free(self) -> None:
        if self.model is not None:
            self.model = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the next checkpoint gets the memory back

    def _eos_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return frozenset([ids] if isinstance(ids, int) else ids or [])

    def _check_open(self) -> None:
        if self.model is None:
            raise BackendError("the hf backend is closed")

    # ---- tokens ----------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(prompts), add_special_tokens=False, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def _record(self, usage: Usage) -> None:
        self.last_usage = usage
        self.usage.add(usage)

    # ---- sample ----------------------------------------------------------------------------

    def sample(self, prompts: Sequence[str], settings: SamplingSettings) -> list[Completion]:
        self._check_open()
        check_seeds(prompts, settings)
        prompt_seeds = settings.seeds if settings.seeds is not None else \
            [derive_seed(self.cfg.seed, self.usage.calls, i) for i in range(len(prompts))]
        expanded = [p for p in prompts for _ in range(settings.n)]
        seeds = row_seeds(prompt_seeds, settings.n)
        samples: list[Sample] = []
        size = self.cfg.max_batch_size
        for start in range(0, len(expanded), size):
            samples.extend(self._sample_chunk(expanded[start:start + size], seeds[start:start + size], settings))
        prompt_tokens = [self.count_tokens(p) for p in prompts]
        out = [
            Completion(samples=tuple(samples[i * settings.n:(i + 1) * settings.n]), prompt_tokens=prompt_tokens[i])
            for i in range(len(prompts))
        ]
        self._record(Usage(calls=1, prompts=len(prompts), prompt_tokens=sum(prompt_tokens),
                           generated_tokens=sum(s.num_tokens for s in samples)))
        return out

    def _generation_config(self, settings: SamplingSettings) -> GenerationConfig:
        """Greedy decoding: sampling (temperature > 0) is SeededSampling's, whose drawn token is the only
        finite score; temperature, top-p and top-k (none: vLLM samples from all) are applied there."""
        return GenerationConfig(
            max_new_tokens=settings.max_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    @torch.inference_mode()
    def _sample_chunk(self, prompts: list[str], seeds: Sequence[int], settings: SamplingSettings) -> list[Sample]:
        enc = self._encode(prompts)
        prompt_len = enc["input_ids"].shape[1]
        recorder = RecordLogprobs(prompt_len)
        processors = [recorder]
        if settings.temperature > 0.0:
            processors.append(SeededSampling(self._generators(seeds), settings.temperature, settings.top_p))
        criteria = StoppingCriteriaList([StopOnStrings(self.tokenizer, settings.stop, prompt_len)]
                                        if settings.stop else [])
        sequences = self.model.generate(
            **enc,
            generation_config=self._generation_config(settings),
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=criteria,
        )
        token_logprobs = recorder.finish(sequences)
        generated = sequences[:, prompt_len:].cpu()
        return [self._to_sample(generated[i].tolist(), token_logprobs[i], settings.stop) for i in range(len(prompts))]

    def _to_sample(self, tokens: list[int], logprobs: torch.Tensor, stops: Sequence[str]) -> Sample:
        """Cut one generated row at the first of: completed stop string, EOS, max_tokens."""
        eos_at = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        body = tokens if eos_at is None else tokens[:eos_at]
        text = self._decode(body)
        stop = first_stop(text, stops) if stops else None
        if stop is not None:
            num = self._tokens_until_stop(body, stops)
            text = self._decode(body[:num])
            text = text[:first_stop(text, stops)[0]]
            reason = FINISH_STOP
        elif eos_at is not None:
            num, reason = eos_at + 1, FINISH_EOS
        else:
            num, reason = len(tokens), FINISH_LENGTH
        return Sample(text=text, num_tokens=num, logprob=float(logprobs[:num].sum()), finish_reason=reason)

    def _tokens_until_stop(self, tokens: list[int], stops: Sequence[str]) -> int:
        """The fewest leading tokens whose text contains a stop string (binary search)."""
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if first_stop(self._decode(tokens[:mid]), stops) is not None:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---- choice_probs ----------------------------------------------------------------------

    def choice_probs(self, prompts: Sequence[str], choices: Sequence[str]) -> list[ChoiceResult]:
        self._check_open()
        choice_ids = [self.first_token(c) for c in choices]
        probs: list[list[float]] = []
        for start in range(0, len(prompts), self.cfg.max_batch_size):
            probs.extend(self._next_token_probs(prompts[start:start + self.cfg.max_batch_size], choice_ids))
        prompt_tokens = [self.count_tokens(p) for p in prompts]
        self._record(Usage(calls=1, prompts=len(prompts), prompt_tokens=sum(prompt_tokens)))
        return [ChoiceResult(probs=tuple(p), prompt_tokens=n) for p, n in zip(probs, prompt_tokens)]

    def first_token(self, choice: str) -> int:
        ids = self.tokenizer(choice, add_special_tokens=False).input_ids
        if not ids:
            raise BackendError(f"choice {choice!r} has no tokens")
        return ids[0]

    @torch.inference_mode()
    def _next_token_probs(self, prompts: Sequence[str], choice_ids: list[int]) -> list[list[float]]:
        enc = self._encode(prompts)
        mask = enc["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
        probs = torch.softmax(logits.float(), dim=-1)[:, choice_ids]
        return probs.cpu().tolist()
