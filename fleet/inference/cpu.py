"""What the device's CPU offers: the SIMD extensions that decide how INT8 kernels compute.

onnxruntime and OpenVINO pick different INT8 kernels with and without AVX-512 VNNI (x86) or
the dot-product extensions (ARM), and their answers can differ; the fidelity check and the
backend choice record which CPU they were measured on.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The extensions that change INT8 arithmetic or speed; other flags are left out of reports.
RELEVANT_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                  "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
                  "asimd", "asimddp", "i8mm", "sve", "sve2")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = CPUINFO.read_text()
    except OSError:
        return out
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip().lower(), value.strip())
    return out


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else what Python's platform module says."""
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The relevant SIMD extensions this CPU has, in a fixed order."""
    info = _cpuinfo()
    have = set((info.get("flags") or info.get("features") or "").split())
    return [f for f in RELEVANT_FLAGS if f in have]
