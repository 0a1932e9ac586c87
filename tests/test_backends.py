"""Both generation backends against the same contract, on a tiny random Llama (fast) and, marked
slow, on the embedded default model. vLLM tests share one engine per module (start costs ~20 s)."""

from __future__ import annotations

import math

import pytest

from conftest import vllm_available
from policy.backends import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    BackendConfig,
    BackendError,
    SamplingSettings,
    make_backend,
)

FINISHES = {FINISH_STOP, FINISH_EOS, FINISH_LENGTH}
PROMPTS = ["The cat sat on the", "Question: what is 2 + 2?\nAnswer:", "Once upon a time"]
CHOICES = ["A", " B", " yes", " no"]
BACKENDS = [
    "hf",
    pytest.param("vllm", marks=[pytest.mark.vllm,
                                pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")]),
]


def tiny_config(name: str) -> BackendConfig:
    # float32 in both engines, so that they compute the same numbers; a small KV cache for the tests
    return BackendConfig(name=name, dtype="float32", max_batch_size=4, max_model_len=512, gpu_memory_utilization=0.1)


@pytest.fixture(scope="module")
def second_tiny_model_dir(default_model_dir, tmp_path_factory):
    from policy.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny2") / "model", default_model_dir, seed=1)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_model_dir):
    b = make_backend(tiny_config(request.param), str(tiny_model_dir))
    yield b
    b.close()
    b.close()  # idempotent
    if request.param == "vllm":
        from policy.backends.vllm import _child_processes

        assert not b.engine_pids
        assert all(p.name() not in ("VLLM::EngineCore", "VLLM::Worker") for p in _child_processes())


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendError, match="unknown backend 'tgi'"):
        BackendConfig(name="tgi")


def test_missing_vllm_is_one_clear_line(monkeypatch):
    import builtins

    from policy.backends import vllm as vllm_backend

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(BackendError, match=r"backend=vllm needs the vllm package.*backend=hf"):
        vllm_backend.import_vllm()


def test_sample_n_stop_logprobs_and_accounting(backend):
    stops = ("e", "\n")
    settings = SamplingSettings(n=3, max_tokens=12, temperature=1.0, stop=stops)
    completions = backend.sample(PROMPTS, settings)
    assert len(completions) == len(PROMPTS)
    samples = [s for c in completions for s in c.samples]
    assert all(len(c.samples) == settings.n for c in completions)
    for s in samples:
        assert s.finish_reason in FINISHES
        assert not any(stop in s.text for stop in stops), s
        assert math.isfinite(s.logprob) and s.logprob <= 0.0
        assert 0 < s.num_tokens <= settings.max_tokens
        if s.finish_reason == FINISH_LENGTH:
            assert s.num_tokens == settings.max_tokens
    assert any(s.finish_reason == FINISH_STOP for s in samples), "a random model should emit an 'e' in 12 tokens"
    # accounting: prompt tokens as the tokenizer counts them, generated tokens as the samples report
    counted = [backend.count_tokens(p) for p in PROMPTS]
    assert [c.prompt_tokens for c in completions] == counted
    usage = backend.last_usage
    assert (usage.calls, usage.prompts) == (1, len(PROMPTS))
    assert usage.prompt_tokens == sum(counted)
    assert usage.generated_tokens == sum(s.num_tokens for s in samples)
    assert 0 <= usage.cached_tokens <= usage.prompt_tokens


def test_sample_keeps_caller_order_and_length_finish(backend):
    prompts = ["zzz last alphabetically", "aaa first alphabetically", "mmm"]
    settings = SamplingSettings(n=1, max_tokens=5, temperature=0.0)
    completions = backend.sample(prompts, settings)
    assert [c.prompt_tokens for c in completions] == [backend.count_tokens(p) for p in prompts]
    for c in completions:
        (s,) = c.samples
        assert s.finish_reason in (FINISH_LENGTH, FINISH_EOS)
        assert s.num_tokens <= settings.max_tokens
    # greedy is deterministic
    again = backend.sample(prompts, settings)
    assert [c.samples[0].text for c in again] == [c.samples[0].text for c in completions]


def test_usage_is_cumulative(backend):
    before = backend.usage.as_dict()
    backend.sample(PROMPTS[:1], SamplingSettings(n=2, max_tokens=3))
    after = backend.usage.as_dict()
    last = backend.last_usage.as_dict()
    assert all(after[k] == before[k] + last[k] for k in after)


def greedy_choices(backend, prompts) -> list[str]:
    """Each prompt's most likely next token, as text: in the top-k whatever the model (vLLM reads
    choice probabilities from its top-20 only, and a random model's distribution is nearly flat)."""
    completions = backend.sample(prompts, SamplingSettings(n=1, max_tokens=1, temperature=0.0))
    return [c.samples[0].text or "A" for c in completions]


def test_choice_probs(backend):
    choices = greedy_choices(backend, PROMPTS) + CHOICES
    results = backend.choice_probs(PROMPTS, choices)
    assert len(results) == len(PROMPTS)
    for r in results:
        assert len(r.probs) == len(choices)
        assert all(0.0 <= p <= 1.0 for p in r.probs)
        assert sum(r.probs) <= 1.0 + 1e-6
    assert results[0].probs != results[1].probs, "the probabilities must depend on the prompt"
    assert results[0].probs[0] > 0.0 and results[1].probs[1] > 0.0
    assert [r.prompt_tokens for r in results] == [backend.count_tokens(p) for p in PROMPTS]
    assert backend.last_usage.prompt_tokens == sum(backend.count_tokens(p) for p in PROMPTS)


def test_choice_probs_match_across_batches(backend):
    """Left padding must not change the numbers: one prompt alone == the same prompt in a batch."""
    choices = greedy_choices(backend, PROMPTS) + CHOICES
    alone = backend.choice_probs(PROMPTS[2:], choices)[0].probs
    batched = backend.choice_probs(PROMPTS, choices)[2].probs
    assert alone == pytest.approx(batched, rel=1e-3, abs=1e-6)


def test_reload_serves_new_weights(backend, second_tiny_model_dir):
    """Runs last for its backend; the other tests hold for any model, so the swap is harmless."""
    from policy.backends.vllm import _child_processes

    prompts = PROMPTS[:2]
    choices = greedy_choices(backend, prompts) + CHOICES
    before = backend.choice_probs(prompts, choices)
    children = len(_child_processes()) if backend.name == "vllm" else 0
    backend.load(str(second_tiny_model_dir))
    assert backend.model_path == str(second_tiny_model_dir)
    after = backend.choice_probs(prompts, choices)
    assert [r.probs for r in after] != [r.probs for r in before]
    if backend.name == "vllm":
        assert len(_child_processes()) == children, "the old engine's processes must be gone"


@pytest.mark.slow
def test_default_model_answers_simple_question(default_model_dir):
    backend = make_backend(BackendConfig(name="hf"), str(default_model_dir))
    try:
        messages = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
        prompt = backend.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        (completion,) = backend.sample([prompt], SamplingSettings(n=1, max_tokens=16, temperature=0.0))
        assert "5" in completion.samples[0].text
        (paris,) = backend.choice_probs(["The capital of France is"], [" Paris", " London"])
        assert paris.probs[0] > 10 * paris.probs[1]
    finally:
        backend.close()


def test_cpu_threads_bind_setting():
    import os

    from policy.backends.vllm import cpu_threads_bind

    assert cpu_threads_bind("auto") is None
    assert cpu_threads_bind("0-3") == "0-3"
    cores = sorted(os.sched_getaffinity(0))
    assert cpu_threads_bind("all") == ",".join(map(str, cores))
    assert cpu_threads_bind("all", tensor_parallel_size=2) is None  # several ranks: vLLM splits the cores


def test_engine_core_setting():
    from policy.backends.vllm import engine_inline, inline_kv_cache_bytes

    assert engine_inline("auto", is_cpu=True) and not engine_inline("auto", is_cpu=False)
    assert engine_inline("inline", is_cpu=False) and not engine_inline("process", is_cpu=True)
    with pytest.raises(BackendError, match="backend.engine_core"):
        BackendConfig(name="vllm", engine_core="thread")
    assert inline_kv_cache_bytes(0.5, total=8 * 2**30, weights=2**30) == 3 * 2**30
    with pytest.raises(BackendError, match="gpu_memory_utilization=0.1"):
        inline_kv_cache_bytes(0.1, total=2**30, weights=2**30)


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_vllm_cpu_engines_repeat_their_samples_from_their_seed(tiny_model_dir):
    """The CPU engine core runs inline (backend.engine_core=auto): no engine process, and a fresh engine
    with the same seed samples the same texts for the same call, here built while the first still holds
    its KV cache in this process; closing puts torch.set_num_threads back."""
    import torch

    from policy.backends.vllm import torch_set_num_threads

    settings = SamplingSettings(n=4, temperature=1.0, max_tokens=24)
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(24)]
    engines, samples = [], []
    try:
        for _ in range(2):  # inline engines draw from the process's torch generator, seeded as each is built
            engines.append(make_backend(tiny_config("vllm"), str(tiny_model_dir)))
            assert engines[-1].inline and not engines[-1].engine_pids
            samples.append([[s.text for s in c.samples] for c in engines[-1].sample(prompts, settings)])
    finally:
        for e in engines:
            e.close()
    first, second = samples
    assert first == second
    assert len({t for c in first for t in c}) > 24  # sampled, not one text repeated
    assert torch.set_num_threads is torch_set_num_threads()


# ---- devices and dtypes ---------------------------------------------------------------------------


def test_device_resolution():
    from policy.models import resolve_device

    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    assert resolve_device("cuda", cuda_available=True) == "cuda"
    with pytest.raises(ValueError, match=r"train.device=cuda, but torch sees no CUDA device"):
        resolve_device("cuda", key="train.device", cuda_available=False)
    with pytest.raises(ValueError, match=r"backend.device='gpu': expected one of auto, cpu, cuda"):
        resolve_device("gpu", key="backend.device", cuda_available=True)
    with pytest.raises(BackendError, match="backend.device='gpu'"):
        BackendConfig(name="hf", device="gpu")
    from policy.dpo import TrainConfig

    with pytest.raises(ValueError, match="train.device='gpu'"):
        TrainConfig(device="gpu")
    assert TrainConfig().device == BackendConfig().device == "auto"


def test_hf_backend_puts_the_model_on_the_resolved_device_in_the_configured_dtype(tiny_model_dir):
    import torch

    from policy.models import resolve_device

    backend = make_backend(BackendConfig(name="hf", dtype="bfloat16", device="auto"), str(tiny_model_dir))
    try:
        expected = resolve_device("auto")
        params = list(backend.model.parameters())
        assert backend.device.type == expected and all(p.device.type == expected for p in params)
        assert all(p.dtype == torch.bfloat16 for p in params)
        (completion,) = backend.sample(PROMPTS[:1], SamplingSettings(n=2, max_tokens=4, temperature=1.0, seeds=(3,)))
        assert all(math.isfinite(s.logprob) for s in completion.samples)
    finally:
        backend.close()
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="backend.device=cuda"):
            make_backend(BackendConfig(name="hf", device="cuda"), str(tiny_model_dir))


# ---- per-request seeds in vLLM (no engine: the parameters it would be given) ------------------------


class _Platform:
    def __init__(self, cpu: bool):
        self.cpu = cpu

    def is_cpu(self) -> bool:
        return self.cpu


class _FakeLLM:
    """Records what `generate` was given; answers each prompt with itself."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm, tokenization_kwargs):
        self.calls.append((list(prompts), params))
        return list(prompts)


def _offline_vllm_backend(request_seeds: bool):
    import types

    from policy.backends.vllm import VLLMBackend

    backend = object.__new__(VLLMBackend)  # no engine: only the request building is under test
    backend.cfg = BackendConfig(name="vllm")
    backend.vllm = types.SimpleNamespace(SamplingParams=dict)  # SamplingParams(**kw) -> the kwargs
    backend.llm = _FakeLLM()
    backend.request_seeds = request_seeds
    return backend


def test_vllm_request_seeds_act_on_gpus_only():
    from policy.backends.vllm import honours_request_seeds

    assert honours_request_seeds(_Platform(cpu=False)) and not honours_request_seeds(_Platform(cpu=True))
    settings = SamplingSettings(n=2, temperature=1.0, seeds=(5, 6))
    gpu = _offline_vllm_backend(request_seeds=True)._sampling_params(settings)
    assert [p["seed"] for p in gpu] == [5, 6] and all(p["n"] == 2 for p in gpu)
    cpu = _offline_vllm_backend(request_seeds=False)._sampling_params(settings)
    assert isinstance(cpu, dict) and "seed" not in cpu  # the CPU engine: engine seed only
    unseeded = _offline_vllm_backend(request_seeds=True)._sampling_params(SamplingSettings(n=2))
    assert isinstance(unseeded, dict) and "seed" not in unseeded


def test_vllm_request_seeds_follow_their_prompts_when_sorted():
    backend = _offline_vllm_backend(request_seeds=True)
    prompts = ["zzz", "aaa", "mmm"]
    params = backend._sampling_params(SamplingSettings(seeds=(1, 2, 3)))
    assert backend._generate(prompts, params) == prompts  # outputs in the caller's order
    ((sent, sent_params),) = backend.llm.calls
    assert sent == ["aaa", "mmm", "zzz"] and [p["seed"] for p in sent_params] == [2, 3, 1]
