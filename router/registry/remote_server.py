"""How the router talks to a registered OpenAI-compatible server: its dialect, the API version
dialect azure needs, and the environment variable holding its API key. A model version's remote
artifact and a deployment's remote replicas name the same three; `check_server` is their one
rule, its messages naming the request's fields under the prefix each caller gives."""

from __future__ import annotations

from router.errors import InvalidArgument, quote
from router.routing.config import API_KEY_ENV_RE

REPLICA_DIALECTS = ("openai", "azure", "vllm", "trtllm", "llama.cpp", "ovms")
"""Server kinds a replica or a remote artifact may name ('' is openai)."""


def check_server(
    where: str, backend: str, dialect: str, api_version: str, api_key_env: str
) -> None:
    """InvalidArgument naming `{where}.dialect`, `{where}.api_version` or `{where}.api_key_env`
    when one is wrong for a remote server of `backend`: a dialect or an API key variable on a
    backend other than openai_http, a dialect outside REPLICA_DIALECTS, an API version without
    dialect azure or azure without one, a variable name that is not one."""
    if dialect and (backend != "openai_http" or dialect not in REPLICA_DIALECTS):
        raise InvalidArgument(
            f"{where}.dialect {quote(dialect)}: backend 'openai_http' takes one of "
            f"{', '.join(REPLICA_DIALECTS)}",
            field=f"{where}.dialect",
        )
    if (dialect == "azure") != bool(api_version):
        raise InvalidArgument(
            f"{where}.api_version {quote(api_version)}: dialect 'azure' needs one (e.g. "
            "'2024-10-21'), and only it takes one",
            field=f"{where}.api_version",
        )
    if api_key_env and (backend != "openai_http" or not API_KEY_ENV_RE.fullmatch(api_key_env)):
        raise InvalidArgument(
            f"{where}.api_key_env {quote(api_key_env)}: backend 'openai_http' takes the name of "
            "an environment variable (a letter or '_', then letters, digits or '_')",
            field=f"{where}.api_key_env",
        )
