"""Python code run as on an AVX2-only host, on an x86-64 machine: QEMU's user-mode emulator with
an AMD EPYC Milan CPU model (CPUID without AVX-512; QEMU's translator has none either, so an
AVX-512 instruction reached by mistake is an illegal instruction there), and `backends.cpu`
reading that CPU's /proc/cpuinfo flags (the emulator shows the host's file).

    result = run_as_avx2_host("print(1)")

Tests that need it skip where `qemu-x86_64` is not installed (.ci/run installs qemu-user), where
it does not emulate AVX2 (QEMU before 7.2 drops AVX, AVX2 and FMA from any CPU model: the
kernels would run their plain x86-64 code and prove nothing), or where the host is not x86-64.
Code runs ~20x slower there: keep what runs under it small.
"""

from __future__ import annotations

import functools
import platform
import resource
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
    QEMU is None or platform.machine() != "x86_64",
    reason="qemu-x86_64 is not installed (Debian's qemu-user; .ci/run installs it) or this "
    "host is not x86-64",
)

_PRELUDE = """
import backends.cpu as _cpu

_model, _flags = _cpu.cpu_info()
_cpu.cpu_info = lambda: (
    "AMD EPYC-Milan (QEMU)",
    frozenset(f for f in _flags if not f.startswith(("avx512", "amx")) and "vnni" not in f),
)
"""


def _no_core_files() -> None:
    # An illegal instruction, what these tests catch, would leave QEMU's and the kernel's core
    # files (hundreds of MB with the models loaded) in the working directory.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _run(code: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    assert QEMU is not None
    return subprocess.run(
        [QEMU, "-cpu", CPU_MODEL, sys.executable, "-c", _PRELUDE + code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=_no_core_files,
    )


@functools.cache
def _kernel_there() -> subprocess.CompletedProcess[str]:
    """The native kernels' best int4 tile under the emulated CPU ('avx2' where QEMU emulates
    it), asked once."""
    return _run("from backends._kernels import q4_best_kernel; print(q4_best_kernel())", timeout=60)


def _checked(done: subprocess.CompletedProcess[str]) -> str:
    if done.returncode:  # a crash (as an illegal instruction) is a failure, never a skip
        pytest.fail(f"exit status {done.returncode} under {CPU_MODEL}:\n{done.stderr[-4000:]}")
    return done.stdout


def run_as_avx2_host(code: str, *args: str, timeout: float = 300) -> str:
    """Runs `code` (a Python program; its arguments in sys.argv[1:]) in this interpreter under
    the emulated CPU; returns its stdout, or fails the test with its stderr."""
    if (kernel := _checked(_kernel_there()).strip()) != "avx2":
        pytest.skip(f"{QEMU} -cpu {CPU_MODEL} does not emulate AVX2 and FMA (got {kernel!r})")
    return _checked(_run(code, *args, timeout=timeout))
