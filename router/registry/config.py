"""The `registry:` section: where the control plane keeps model versions and its audit log."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RegistryConfig:
    enabled: bool = True
    """Serve the control plane's ModelService (the registry of model versions)."""
    url: str = ""
    """The database: '' is a SQLite file, registry.db under `data_dir` (one host, no server);
    `postgresql://USER:PASSWORD@HOST:PORT/DB` is shared by a cluster's replicas (psycopg 3).
    $IROUTER_REGISTRY_URL overrides it."""
    data_dir: Path = Path("~/.cache/irouter")
    """Folder of the default SQLite registry."""

    def resolved_url(self) -> str:
        """The database URL the router opens."""
        if self.url:
            return self.url
        return f"sqlite:///{Path(os.path.expanduser(self.data_dir)) / 'registry.db'}"

    def validate(self) -> None:
        # SQLAlchemy is imported only when the registry is on: the REST proxy and the CLI read
        # this config too.
        if self.enabled:
            from router.registry.database import engine_url

            engine_url(self.resolved_url())
