"""Markers by path: tests/unit → unit, tests/native → native, tests/integration → integration,
tests/e2e → e2e (LitServe's convention), so `pytest -m unit` needs no decorators."""

from __future__ import annotations

from pathlib import Path

import pytest

_ROOT = Path(__file__).parent
_MARKERS = ("unit", "native", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            part = Path(item.fspath).relative_to(_ROOT).parts[0]
        except ValueError:
            continue
        if part in _MARKERS:
            item.add_marker(getattr(pytest.mark, part))


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The prepared models, built once (reused from $IROUTER_MODEL_CACHE or the default cache)."""
    from router.config_file import load_config
    from router.models.prepare import prepare_models

    cache = load_config().model_cache
    prepare_models(cache, progress=False)
    return cache
