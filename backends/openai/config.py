"""Where a remote OpenAI-compatible server is and how to talk to it (OpenAIHttpConfig): the
`remote:` section of a model, and each openai_http replica's url and model."""

from __future__ import annotations

from dataclasses import dataclass

from backends.openai.wire import DIALECTS, PROMPT_FORMATS


@dataclass(frozen=True)
class OpenAIHttpConfig:
    """One remote OpenAI-compatible server and the model it serves."""

    url: str = ""
    """Server root, e.g. 'http://10.0.0.7:8000' (api_prefix is appended). Empty only in a
    models[] entry behind a deployment whose replicas each give their own url."""
    model: str = ""
    """Model name on the server: sent as `model`, and looked for in /models by ready(). Empty
    only behind a deployment (each replica's remote_model, else the router's model name)."""
    dialect: str = "openai"
    """Server kind, deciding which sampling fields beyond OpenAI's are sent: one of DIALECTS."""
    api_prefix: str | None = None
    """API path; None takes the dialect's ('/v1', or '/v3' for ovms)."""
    prompt_format: str = "text"
    """'text' sends the rendered prompt; 'token_ids' the router's ids (vllm and trtllm only)."""
    connect_timeout_s: float = 5.0
    """Longest wait for a TCP connection."""
    read_timeout_s: float = 60.0
    """Longest silence in a streamed answer (time to first token included) before
    RemoteTimeout."""
    unary_timeout_s: float = 600.0
    """Longest wait for a non-streamed answer (a unary call's, fetched whole) before
    RemoteTimeout: the whole generation is one silence."""
    max_connections: int = 64
    """Requests in flight to this server (pooled connections); more wait for a free one."""
    api_key: str | None = None
    """Sent as 'Authorization: Bearer <api_key>' when set (dialect azure: as 'api-key')."""
    api_version: str = ""
    """Dialect azure: the API version every URL carries (?api-version=, e.g. '2024-10-21')."""
    context_length: int = 2048
    """Prompt plus completion tokens the remote model accepts."""
    vocab_size: int = 0
    """Vocabulary size of the remote model, for the router's checks (0: unknown)."""

    def require_endpoint(self) -> OpenAIHttpConfig:
        """Raise ValueError when url or model is missing (say which and how to set it)."""
        if not self.url:
            raise ValueError("url is missing: set it to the server root, e.g. http://10.0.0.7:8000")
        if not self.model:
            raise ValueError(f"model is missing: set it to the model's name at {self.url}")
        return self

    def validate(self) -> OpenAIHttpConfig:
        """Raise ValueError naming the first bad field and what it accepts; returns self. An
        empty url or model is left to require_endpoint()."""
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url={self.url!r} must start with http:// or https://")
        if "@" in self.url.partition("//")[2].partition("/")[0]:  # user:password@host
            raise ValueError(
                f"url={self.url!r} holds credentials, which are not sent; give the key as api_key"
            )
        if self.dialect not in DIALECTS:
            raise ValueError(
                f"dialect={self.dialect!r} is unknown; accepted: {', '.join(DIALECTS)}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format={self.prompt_format!r} is unknown; accepted: "
                f"{', '.join(PROMPT_FORMATS)}"
            )
        if self.prompt_format == "token_ids" and not DIALECTS[self.dialect].token_id_prompts:
            raise ValueError(
                f"prompt_format='token_ids' is not accepted by a {self.dialect!r} server; "
                "use 'text'"
            )
        if DIALECTS[self.dialect].api_version and not self.api_version:
            raise ValueError(
                f"api_version is missing: a {self.dialect!r} server needs one, e.g. '2024-10-21'"
            )
        if self.api_version and not DIALECTS[self.dialect].api_version:
            raise ValueError(f"api_version applies to dialect 'azure' only, not {self.dialect!r}")
        for name in ("connect_timeout_s", "read_timeout_s", "unary_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("max_connections", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size={self.vocab_size} must not be negative (0: unknown)")
        return self

    def endpoint(self, path: str) -> str:
        """Full URL of an API path such as '/completions'."""
        kind = DIALECTS[self.dialect]
        prefix = kind.api_prefix if self.api_prefix is None else self.api_prefix
        prefix = prefix.strip("/")
        url = f"{self.url.rstrip('/')}{'/' + prefix if prefix else ''}{path}"
        return f"{url}?api-version={self.api_version}" if kind.api_version else url

    def headers(self) -> dict[str, str]:
        """The headers every request carries (the API key, as the dialect sends it)."""
        if not self.api_key:
            return {}
        header = DIALECTS[self.dialect].key_header
        if header == "Authorization":
            return {header: f"Bearer {self.api_key}"}
        return {header: self.api_key}
