"""The configuration examples in README.md load: documentation that drifts from the code fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from router.config_file import config_from_mapping

README = Path(__file__).resolve().parents[3] / "README.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_config_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS)
def test_readme_config_example_loads(block: str) -> None:
    data = yaml.safe_load(block)
    data.get("server", {}).pop("tls", None)  # names certificate files that do not exist here
    config_from_mapping(data).validate()
