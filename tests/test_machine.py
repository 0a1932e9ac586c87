"""harness/machine.py: the machine record beside each invocation's config."""

import json

from harness.machine import cpu_info, describe, machine_info, memory_gb
from harness.rundir import write_config

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: other
flags\t\t: fpu
"""


def test_cpu_info_reads_the_first_processor_and_the_kernel_flags():
    info = cpu_info(CPUINFO)
    assert info == {"cpu": "Intel(R) Xeon(R) Platinum 8480+", "isa": ["avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                                       "amx_tile"]}
    assert cpu_info("flags : fpu sse2\n")["isa"] == []


def test_memory_and_description():
    assert memory_gb("MemTotal:       24641536 kB\nMemFree: 1 kB\n") == 23.5
    assert memory_gb("") is None
    line = describe({"cpu": "X", "isa": ["avx2", "amx_bf16"], "cores": 2, "memory_gb": 23.5, "gpus": [],
                     "packages": {"torch": "2.13.0", "numpy": "2"}})
    assert line == "X (amx_bf16), 2 cores, 23.5 GiB; torch 2.13.0"


def test_each_invocation_records_its_machine_beside_its_config(tmp_path):
    first = write_config(tmp_path, "a: 1\n", now=0)
    second = write_config(tmp_path, "a: 2\n", now=1, machine={"cpu": "other"})
    assert json.loads(first.with_suffix(".machine.json").read_text())["cores"] == machine_info()["cores"]
    assert json.loads(second.with_suffix(".machine.json").read_text()) == {"cpu": "other"}
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "configs").glob("*.yaml")) == ["0001", "0002"]
