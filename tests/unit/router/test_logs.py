"""Logging set-up: the router's own lines at the configured level, libraries' at WARNING."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from router import logs
from router.config import ConfigError
from router.config_file import config_from_mapping


@pytest.fixture
def restored() -> Iterator[None]:
    names = ("", "httpx", *logs.OWN_LOGGERS)
    before = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def test_libraries_stay_at_warning_while_the_router_logs_info(restored: None) -> None:
    logs.configure("INFO")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)  # a line per request
    assert logging.getLogger("httpx").isEnabledFor(logging.WARNING)
    assert logging.getLogger("router.server").isEnabledFor(logging.INFO)
    assert logging.getLogger("backends.openai.engine").isEnabledFor(logging.INFO)


def test_library_level_can_be_asked_for(restored: None) -> None:
    logs.configure("WARNING", library_level="DEBUG")
    assert logging.getLogger("httpx").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("router.server").isEnabledFor(logging.INFO)


@pytest.mark.parametrize("key", ["log_level", "library_log_level"])
def test_unknown_level_is_refused_by_name(key: str) -> None:
    with pytest.raises(ConfigError, match=f"server.{key}='LOUD'"):
        config_from_mapping({"server": {key: "LOUD"}}).validate()
