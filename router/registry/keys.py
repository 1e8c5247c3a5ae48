"""API keys: creation (the plaintext is shown once), revocation, listing, and verification fast
enough to run on the event loop for every call.

A key reads `irk_<key id>_<secret>`: the prefix makes it recognisable (in an `authorization`
header, and to secret scanners), the key id finds its row without a scan, and the secret is 256
random bits. Only SHA-256 of the whole key is stored. No slow KDF (bcrypt, scrypt, argon2) is
needed: those exist to make guessing low-entropy human passwords expensive, while a 256-bit random
secret cannot be guessed from its hash at any hashing speed; a fast hash keeps an uncached
verification in the microseconds.

Verified keys are cached in memory. Revocation must still take effect at once, including a
revocation committed by another process (`irouter keys revoke`) while the router runs: every
verification asks SQLite for `PRAGMA data_version`, which changes when another connection has
committed, and drops the whole cache when it did. Revocations are rare, so a full drop is simpler
than tracking which entries changed and costs only a few uncached lookups afterwards.

The keys live in a SQLite file of their own (`guard.auth.registry`), or in the registry
database (the default): its SQLite file, or a cluster's PostgreSQL, where revocations made
elsewhere are seen within half a second (router.registry.postgres_keys) and a key not cached yet
is read off the event loop (`averify`).
"""

from __future__ import annotations

import builtins
import getpass
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from router.errors import NotFound, Unavailable
from router.registry.sqlite_db import KeyEvent, KeyRow, SqliteKeyTable

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "irk_"
_KEY_ID_BYTES = 8
_SECRET_BYTES = 32
_KEY_ID_RE = re.compile(rf"[0-9a-f]{{{2 * _KEY_ID_BYTES}}}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32): 43 base64url characters
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_SCOPE_RE = re.compile(r"[A-Za-z0-9_.:/*-]{1,64}")
_MAX_LABEL = 200


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the registry knows about one API key; never the key itself."""

    key_id: str
    """Public identifier, used to revoke the key and in logs."""
    tenant: str
    """The tenant calls made with the key belong to."""
    scopes: frozenset[str]
    """What the key may do."""
    tier: str
    """Service tier of the key's calls."""
    name: str
    """Free-text label given at creation ('' if none)."""
    created_at: float
    """Unix time of creation."""
    revoked_at: float | None
    """Unix time of revocation; None while the key is live."""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def looks_like_api_key(credential: str) -> bool:
    """True for credentials in the API-key format (checked before any database access)."""
    return _split(credential) is not None


def _split(plaintext: str) -> tuple[str, str] | None:
    if not plaintext.startswith(API_KEY_PREFIX):
        return None
    key_id, sep, secret = plaintext[len(API_KEY_PREFIX) :].partition("_")
    if not sep or not _KEY_ID_RE.fullmatch(key_id) or not _SECRET_RE.fullmatch(secret):
        return None
    return key_id, secret


def _digest(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode()).digest()


def _record(row: KeyRow) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,
        tenant=row.tenant,
        scopes=frozenset(row.scopes.split()),
        tier=row.tier,
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class KeyTable(Protocol):
    """Where the keys are stored: a SQLite file (router.registry.sqlite_db) or the registry's
    PostgreSQL database (router.registry.postgres_keys)."""

    @property
    def path(self) -> object:
        """Where the keys are, for messages."""
        ...

    @property
    def remote(self) -> bool:
        """Whether a read is a round trip to a server (then a cache miss is read off the loop)."""
        ...

    def close(self) -> None: ...
    def data_version(self) -> int: ...
    def insert(self, row: KeyRow, event: KeyEvent | None = None) -> None: ...
    def get(self, key_id: str) -> KeyRow | None: ...
    def revoke(self, key_id: str, at: float, event: KeyEvent | None = None) -> bool: ...
    def all(self) -> builtins.list[KeyRow]: ...


def open_key_store(location: Path | str) -> KeyStore:
    """The keys at `location`: a SQLite file's path (or sqlite:/// URL), or the registry's
    postgresql:// URL (its schema brought to the newest revision first)."""
    if isinstance(location, Path) or "://" not in location:
        return KeyStore(Path(location).expanduser())
    from router.registry.database import engine_url, open_database

    url = engine_url(location)  # ValueError naming what is wrong
    if url.drivername == "sqlite":
        return KeyStore(Path(str(url.database)).expanduser())
    from router.registry.postgres_keys import PostgresKeyTable

    return KeyStore(PostgresKeyTable(open_database(location)))


class KeyStore:
    """API keys and their tenants in a SQLite file or the registry's database (see the module
    docstring)."""

    def __init__(
        self,
        table: Path | str | KeyTable,
        *,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._table: KeyTable = (
            SqliteKeyTable(Path(table)) if isinstance(table, (Path, str)) else table
        )
        self._clock = clock
        self._cache_size = cache_size
        # sha256(key) -> record, least recently used first.
        self._cache: OrderedDict[bytes, KeyRecord] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._seen_version = self._table.data_version()
        # Bumped by this store's own revocations, which data_version does not report.
        self._epoch = 0

    @property
    def path(self) -> object:
        """The SQLite file, or the database URL (no password)."""
        return self._table.path

    def close(self) -> None:
        self._table.close()

    def create(
        self,
        tenant: str,
        scopes: Iterable[str],
        tier: str = "default",
        name: str = "",
        *,
        actor: str = "",
    ) -> tuple[str, str]:
        """Store a new key; returns (key_id, plaintext key). The plaintext exists only in this
        return value: show it to the user once. In the registry's database the creation is an
        audit event by `actor` (default: the OS user and host running this)."""
        scope_set = frozenset(scopes)
        _check_name(tenant, "tenant")
        _check_name(tier, "tier")
        for scope in sorted(scope_set):
            if not _SCOPE_RE.fullmatch(scope):
                raise ValueError(
                    f"scope {scope!r} is not valid: use 1-64 letters, digits or _ . : / * -"
                )
        if len(name) > _MAX_LABEL or not name.isprintable():
            raise ValueError(f"key name must be printable and at most {_MAX_LABEL} characters")
        key_id = secrets.token_hex(_KEY_ID_BYTES)
        plaintext = f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
        now = self._clock()
        row = KeyRow(
            key_id=key_id,
            key_hash=_digest(plaintext),
            tenant=tenant,
            scopes=" ".join(sorted(scope_set)),
            tier=tier,
            name=name,
            created_at=now,
            revoked_at=None,
        )
        described = {"tenant": tenant, "scopes": sorted(scope_set), "tier": tier, "name": name}
        event = KeyEvent(
            now, actor or _os_actor(), "api_key.create", f"api_key/{key_id}", {}, described
        )
        self._table.insert(row, event)
        return key_id, plaintext

    def revoke(self, key_id: str, *, actor: str = "") -> bool:
        """Revoke a key at once. True if it was live, False if it was already revoked; raises
        NotFound for an unknown id. Audited as `create` is."""
        now = self._clock()
        event = KeyEvent(
            now,
            actor or _os_actor(),
            "api_key.revoke",
            f"api_key/{key_id}",
            {"revoked_at": None},
            {"revoked_at": now},
        )
        revoked = self._table.revoke(key_id, now, event)
        # data_version does not change for this connection's own commits: drop the cache here.
        with self._cache_lock:
            self._cache.clear()
            self._epoch += 1
        if not revoked and self._table.get(key_id) is None:
            raise NotFound(f"no API key with id {key_id!r}")
        return revoked

    def get(self, key_id: str) -> KeyRecord | None:
        row = self._table.get(key_id)
        return None if row is None else _record(row)

    def list(self) -> builtins.list[KeyRecord]:
        """Every key, revoked ones included, ordered by tenant then creation; no secrets."""
        return [_record(row) for row in self._table.all()]

    def verify(self, plaintext: str) -> KeyRecord | None:
        """The live key's record, or None for anything else (malformed, unknown, revoked).
        Raises Unavailable when the database cannot be read (locked past the busy timeout,
        disk error): the caller's key may be fine, so this must not read as "unknown key"."""
        parts = _split(plaintext)
        if parts is None:
            return None
        try:
            return self._verify(plaintext, parts[0])
        except sqlite3.Error as exc:  # (the PostgreSQL table raises Unavailable itself)
            logger.error("reading API keys from %s failed: %s", self.path, exc)
            raise Unavailable("the API key registry cannot be read; retry shortly") from None

    async def averify(self, plaintext: str) -> KeyRecord | None:
        """`verify` for the event loop: a key in the cache is answered at once; a miss on a
        database server is read on the registry's threads, so the loop does not wait for it."""
        if not self._table.remote:
            return self.verify(plaintext)
        parts = _split(plaintext)
        if parts is None:
            return None
        cached, _, _ = self._cached(_digest(plaintext))
        if cached is not None:
            return cached
        from router.registry.database import call

        return await call(self.verify, plaintext)

    def _cached(self, digest: bytes) -> tuple[KeyRecord | None, int, int]:
        """The cached record (after dropping the cache if a revocation was seen), and the data
        version and epoch it was looked up at."""
        version = self._table.data_version()
        with self._cache_lock:
            if version != self._seen_version:
                self._cache.clear()
                self._seen_version = version
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
            return cached, version, self._epoch

    def _verify(self, plaintext: str, key_id: str) -> KeyRecord | None:
        digest = _digest(plaintext)
        cached, version, epoch = self._cached(digest)
        if cached is not None:
            return cached
        row = self._table.get(key_id)
        # compare_digest: the stored hash is compared in constant time so response timing tells
        # a caller nothing about how much of a guess matched.
        if (
            row is None
            or row.revoked_at is not None
            or not hmac.compare_digest(row.key_hash, digest)
        ):
            return None
        record = _record(row)
        with self._cache_lock:
            # Cache only if no revocation was seen (by another thread's verify, or made by this
            # store) since `version` was read: the row may predate it, and caching it would hide
            # the revocation.
            if version == self._seen_version and epoch == self._epoch:
                self._cache[digest] = record
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return record


def _os_actor() -> str:
    """Who changes keys from a shell: the OS user and host (the audit log's actor)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        user = f"uid {os.getuid()}"
    return f"os:{user}@{socket.gethostname()}"


def _check_name(value: str, what: str) -> None:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not valid: start with a letter or digit, then up to 127 "
            "letters, digits or _ . : @ -"
        )
