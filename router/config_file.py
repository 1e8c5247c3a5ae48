"""Reading the configuration: the built-in default, then an optional YAML file, then `IROUTER_`
environment variables, then command-line flags. YAML sections become the frozen dataclasses of
router/config.py (and the section modules it holds): unknown keys are refused, types checked,
missing required keys named, and each section's own `validate()` run, so an error names the key
and what would be right."""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from router.config import ENV_PREFIX, ConfigError, RouterConfig


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check and convert one YAML value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} must be one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, where)
    if origin is frozenset:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, not {type(value).__name__}")
        return frozenset(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, not {type(value).__name__}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, not {type(value).__name__}")
        key_hint, value_hint = args if args else (Any, Any)
        return {
            _coerce(k, key_hint, f"{where} key"): _coerce(v, value_hint, f"{where}.{k}")
            for k, v in value.items()
        }
    if hint is Any:
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a path string")
        return Path(os.path.expanduser(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} must be a number")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}={value!r} must be {hint.__name__}, not {type(value).__name__}")
    return value


def _build(cls: type[Any], data: Any, where: str) -> Any:
    """A dataclass from a YAML mapping: unknown keys refused, types checked, defaults kept."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; known keys: {sorted(known)}")
    values = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        path = where.removeprefix("config.")
        raise ConfigError(
            f"{path} is missing required key(s) {', '.join(repr(k) for k in missing)}; add "
            + (" and ".join(f"`{k}:`" for k in missing))
        )
    try:
        built = cls(**values)
    except ValueError as exc:  # checked in __post_init__
        raise ConfigError(f"{where}: {exc}") from None
    validate = getattr(built, "validate", None)
    if callable(validate) and where != "":
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            # Name the section unless the message already does (nested sections such as a
            # model's `remote:` report their fields relative to themselves).
            path = where.removeprefix("config.")
            message = str(exc)
            raise ConfigError(
                message if message.startswith(path) else f"{path}: {message}"
            ) from None
    return built


def config_from_mapping(data: Mapping[str, Any]) -> RouterConfig:
    """Build a config from parsed YAML: keys left out keep their built-in default."""
    if not isinstance(data, Mapping):
        raise ConfigError("the config file must hold a mapping at its top level")
    config: RouterConfig = _build(RouterConfig, data, "config")
    return config


# Environment variables that override single settings (the config file path is IROUTER_CONFIG).
_ENV_SERVER = {
    "HOST": ("host", str),
    "PORT": ("port", int),
    "METRICS_PORT": ("metrics_port", int),
    "WORKERS": ("workers", int),
    "GRACE_SECONDS": ("grace_seconds", float),
    "LOG_LEVEL": ("log_level", str),
}


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RouterConfig:
    """Default ← YAML file (path or $IROUTER_CONFIG) ← IROUTER_* variables ← overrides (flags)."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    config = RouterConfig()
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        config = config_from_mapping(data)
    server_changes: dict[str, Any] = {}
    for suffix, (key, kind) in _ENV_SERVER.items():
        raw = env.get(ENV_PREFIX + suffix)
        if raw is None or raw == "":
            continue
        try:
            server_changes[key] = kind(raw)
        except ValueError:
            raise ConfigError(
                f"{ENV_PREFIX}{suffix}={raw!r} is not a valid {kind.__name__}"
            ) from None
    for key, value in (overrides or {}).items():
        if value is not None:
            server_changes[key] = value
    if server_changes:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, **server_changes)
        )
    registry_url = env.get(ENV_PREFIX + "REGISTRY_URL")
    if registry_url:
        config = dataclasses.replace(
            config, registry=dataclasses.replace(config.registry, url=registry_url)
        )
    cache = env.get(ENV_PREFIX + "MODEL_CACHE")
    if cache:
        config = dataclasses.replace(config, model_cache=Path(os.path.expanduser(cache)))
    return config.validate()
