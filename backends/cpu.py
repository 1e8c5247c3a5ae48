"""What this CPU is and computes natively, read once from /proc/cpuinfo (Linux; elsewhere
nothing): the engines choose kernels by it, the resource inventory reports it."""

from __future__ import annotations

import functools
from pathlib import Path

INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
"""x86 instructions that multiply u8 by s8 and sum into int32 in one step (AMX tiles, VNNI),
as /proc/cpuinfo spells them: ONNX Runtime's integer GEMM runs on them at several times its
float rate. Without them (AVX2 only) it pairs VPMADDUBSW and VPMADDWD."""


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags ('' and none where /proc/cpuinfo cannot be read)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                return model, frozenset(value.split())
    except OSError:
        pass
    return model, frozenset()


def int8_dot_flag() -> str | None:
    """The first of INT8_DOT_FLAGS this CPU has, or None."""
    flags = cpu_info()[1]
    return next((flag for flag in INT8_DOT_FLAGS if flag in flags), None)
