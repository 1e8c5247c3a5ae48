from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import router

CHECKED_IN = Path(router.__file__).parent / "_native.pyi"


def test_checked_in_stub_matches_the_built_extension(tmp_path: Path) -> None:
    """router/_native.pyi (read by mypy on the source tree) must describe the built module.

    The build generates the same file with nanobind_add_stub; after changing the
    bindings, copy it over: cp build/*/_native.pyi router/_native.pyi
    """
    generated = tmp_path / "_native.pyi"
    subprocess.run(
        [sys.executable, "-m", "nanobind.stubgen", "-q", "-m", "router._native", "-o", generated],
        check=True,
    )
    assert generated.read_text() == CHECKED_IN.read_text(), (
        "router/_native.pyi is stale: cp build/*/_native.pyi router/_native.pyi"
    )
