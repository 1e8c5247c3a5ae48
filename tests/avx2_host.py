"""Python code run as on an AVX2-only host, on any x86-64 machine: QEMU's user-mode emulator with
an AMD EPYC Milan CPU model (CPUID without AVX-512; QEMU's translator has none either, so an
AVX-512 instruction reached by mistake is an illegal instruction there), and `backends.cpu`
reading that CPU's /proc/cpuinfo flags (the emulator shows the host's file).

    result = run_as_avx2_host("print(1)")

Tests that need it skip where `qemu-x86_64` is not installed (.ci/run installs qemu-user).
Code runs ~20x slower there: keep what runs under it small.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-x86_64")
CPU_MODEL = "EPYC-Milan"
"""AVX2, FMA and F16C, no AVX-512: the AVX2-only EPYCs these machines are drawn from."""
ROOT = Path(__file__).resolve().parents[1]

needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-x86_64 is not installed (Debian's qemu-user; .ci/run installs it)"
)

_PRELUDE = """
import backends.cpu as _cpu

_model, _flags = _cpu.cpu_info()
_cpu.cpu_info = lambda: (
    "AMD EPYC-Milan (QEMU)",
    frozenset(f for f in _flags if not f.startswith(("avx512", "amx")) and "vnni" not in f),
)
"""


def run_as_avx2_host(code: str, *args: str, timeout: float = 300) -> str:
    """Runs `code` (a Python program; its arguments in sys.argv[1:]) in this interpreter under
    the emulated CPU; returns its stdout, or fails the test with its stderr."""
    assert QEMU is not None
    done = subprocess.run(
        [QEMU, "-cpu", CPU_MODEL, sys.executable, "-c", _PRELUDE + code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode:
        pytest.fail(f"exit status {done.returncode} under {CPU_MODEL}:\n{done.stderr[-4000:]}")
    return done.stdout
