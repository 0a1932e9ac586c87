"""Engine start time and generation throughput of the backends, on the tiny random model and the
embedded default model. CPU numbers; run: `python experiments/bench_backends.py [--quick]`.

Prints one line per (model, backend, dtype): start seconds, tokens/s for `batch` prompts x
`max_tokens` generated tokens (no stop strings; sequences may end early at EOS, so the tokens
actually generated are counted), and the choice_probs time on the same prompts.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from policy.backends import BackendConfig, SamplingSettings, make_backend
from policy.models import build_tiny_model, prepare_embedded

QUESTION = "Tom has {k} apples and buys {m} more. How many apples does he have now? Think step by step."


def prompts(backend, batch: int) -> list[str]:
    tok = backend.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": QUESTION.format(k=i, m=2 * i + 1)}],
                                    tokenize=False, add_generation_prompt=True) for i in range(batch)]


def bench(name: str, dtype: str, model: str, label: str, batch: int, max_tokens: int) -> None:
    start = time.perf_counter()
    backend = make_backend(BackendConfig(name=name, dtype=dtype, max_batch_size=batch), model)
    started = time.perf_counter() - start
    try:
        ps = prompts(backend, batch)
        settings = SamplingSettings(n=1, max_tokens=max_tokens, temperature=0.8)
        backend.sample(ps[:2], SamplingSettings(n=1, max_tokens=4))  # warm-up
        t = time.perf_counter()
        backend.sample(ps, settings)
        gen_s = time.perf_counter() - t
        u = backend.last_usage
        t = time.perf_counter()
        backend.choice_probs(ps, [" A", " B"])
        choice_s = time.perf_counter() - t
        cu = backend.last_usage
        print(f"{label:8s} {name:5s} {dtype:9s} start {started:5.1f} s | batch {batch} x <= {max_tokens} tok: "
              f"{u.generated_tokens} tok in {gen_s:5.1f} s = {u.generated_tokens / gen_s:6.1f} tok/s "
              f"(prompt {u.prompt_tokens}, cached {u.cached_tokens}) | choice_probs {choice_s:4.2f} s "
              f"(prompt {cu.prompt_tokens}, cached {cu.cached_tokens})", flush=True)
    finally:
        backend.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    default = str(prepare_embedded("smollm2-135m"))
    tiny = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", default))
    runs = [("tiny", tiny, "hf", "float32"), ("tiny", tiny, "vllm", "float32")]
    if not args.quick:
        runs += [("smollm2", default, "hf", "float32"), ("smollm2", default, "vllm", "float32"),
                 ("smollm2", default, "vllm", "bfloat16")]
    for label, path, name, dtype in runs:
        bench(name, dtype, path, label, args.batch, args.max_tokens)


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
