"""TLS and mutual TLS for the gRPC port, with certificates reloaded when their files change.

grpc's dynamic server credentials call `fetch()` before each new handshake; it stats the three
files and returns a new certificate configuration only when one changed, so a rotated
certificate (cert-manager, SPIFFE agents) is picked up without a restart and without dropping
established connections.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""
    """PEM certificate chain of the server; empty disables TLS."""
    key: str = ""
    """PEM private key of the server."""
    client_ca: str = ""
    """PEM CA bundle for client certificates; set it to require mutual TLS."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("server.tls needs both cert and key (or neither)")
        if self.client_ca and not self.cert:
            raise ValueError("server.tls.client_ca (mutual TLS) needs cert and key too")
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path and not Path(path).expanduser().is_file():
                raise ValueError(f"server.tls.{name}={path!r} is not a readable file")


class CertificateReloader:
    def __init__(self, config: TlsConfig) -> None:
        self._paths = [
            Path(p).expanduser() for p in (config.cert, config.key, config.client_ca) if p
        ]
        self._config = config
        self._stamp = self._mtimes()
        self.reloads = 0

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(os.stat(p).st_mtime_ns for p in self._paths)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cfg = self._config
        pair = (Path(cfg.key).expanduser().read_bytes(), Path(cfg.cert).expanduser().read_bytes())
        ca = Path(cfg.client_ca).expanduser().read_bytes() if cfg.client_ca else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            config = self._load()
        except (OSError, ValueError):  # half-written during rotation: keep the old certificate
            logger.warning("TLS certificate files changed but could not be read; keeping the old")
            return None
        self._stamp = stamp
        self.reloads += 1
        logger.info("TLS certificates reloaded")
        return config

    def credentials(self) -> grpc.ServerCredentials:
        # grpc documents that the fetcher returns None for "no change"; the stubs say otherwise.
        return grpc.dynamic_ssl_server_credentials(
            self._load(),
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=bool(self._config.client_ca),
        )
