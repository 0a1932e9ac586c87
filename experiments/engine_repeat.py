"""Does vLLM's CPU engine repeat its samples from its seed? One engine, 48 chat prompts x 8 samples at
temperature 0.8 (96 tokens each), then 20 x 4 more; prints one JSON line with a hash of the texts.

    for core in process process inline inline; do python experiments/engine_repeat.py $core; done

Equal hashes across invocations mean the same seed gave the same samples (docs/notes.md, "vLLM on the CPU").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def texts_hash(outs) -> str:
    return hashlib.sha1("\x00".join(c.text for o in outs for c in o.outputs).encode()).hexdigest()[:12]


def main(core: str) -> dict:
    from harness.console import quiet_console
    from policy.backends.vllm import MULTIPROCESSING_ENV, cpu_threads_bind, import_vllm
    from policy.models import prepare_embedded

    quiet_console()
    os.environ[MULTIPROCESSING_ENV] = "0" if core == "inline" else "1"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind("all") or "")
    vllm = import_vllm()
    llm = vllm.LLM(model=str(prepare_embedded("smollm2-135m")), seed=0, dtype="bfloat16", max_model_len=2048,
                   gpu_memory_utilization=0.3, enforce_eager=True, enable_prefix_caching=True, block_size=32)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Tom has {a} apples and buys 7 more. How many "
                                         "apples does he have? Think step by step."}],
                                       tokenize=False, add_generation_prompt=True) for a in range(3, 51)]
    start = time.perf_counter()
    first = llm.generate(prompts, vllm.SamplingParams(n=8, temperature=0.8, top_p=0.95, max_tokens=96), use_tqdm=False)
    seconds = time.perf_counter() - start
    second = llm.generate(prompts[:20], vllm.SamplingParams(n=4, temperature=0.8, max_tokens=64), use_tqdm=False)
    return {"engine_core": core, "hash_first": texts_hash(first), "hash_second": texts_hash(second),
            "tokens": sum(len(c.token_ids) for o in first for c in o.outputs), "seconds": round(seconds, 1)}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("inline", "process"):
        sys.exit("usage: python experiments/engine_repeat.py inline|process")
    print(json.dumps(main(sys.argv[1])))
