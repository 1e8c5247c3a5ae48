from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["router._native", "backends._kernels"])
def test_checked_in_stub_matches_the_built_extension(tmp_path: Path, module: str) -> None:
    """Each extension module's checked-in stub (read by mypy on the source tree) must describe
    the built module.

    The build generates the same file with nanobind_add_stub; after changing the bindings, copy
    it over: cp build/*/_native.pyi router/ (or _kernels.pyi to backends/)
    """
    package, name = module.split(".")
    checked_in = Path(importlib.import_module(package).__file__ or "").parent / f"{name}.pyi"
    generated = tmp_path / f"{name}.pyi"
    subprocess.run(
        [sys.executable, "-m", "nanobind.stubgen", "-q", "-m", module, "-o", generated],
        check=True,
    )
    assert generated.read_text() == checked_in.read_text(), (
        f"{checked_in} is stale: cp build/*/{name}.pyi {checked_in}"
    )
