"""`irouter keys create|revoke|list`: manage the API keys in the registry.

The lead's `router/cli.py` calls `register_cli(subparsers, default_db=...)` while building its
parser and `run_cli(args)` when the command is 'keys'. The router notices a revocation made here
on its next verification of that key (see `router.registry.keys`), so no restart is needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from router.cli_client import table
from router.errors import NotFound
from router.registry.keys import KeyRecord, KeyStore, open_key_store


def register_cli(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    default_db: Path | str | None = None,
) -> argparse.ArgumentParser:
    """Add the `keys` command to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    keys = subparsers.add_parser("keys", help="manage API keys")
    db_help = (
        "where the keys are: a SQLite file, or the registry's postgresql:// URL; default: "
        "the config's guard.auth.registry, else its registry database"
    ) + (f" ({default_db})" if default_db is not None else "")
    keys.add_argument("--db", default=default_db, help=db_help)
    sub = keys.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("--tenant", required=True, help="tenant the key's calls belong to")
    create.add_argument(
        "--scopes", required=True, help="comma-separated scopes, e.g. generate,embed"
    )
    create.add_argument("--tier", default="default", help="service tier (default: default)")
    create.add_argument("--name", default="", help="label to recognise the key by")

    revoke = sub.add_parser("revoke", help="revoke a key; takes effect at once")
    revoke.add_argument("key_id", help="the key's id, as printed by create or list")

    sub.add_parser("list", help="list keys (no secrets)")
    return keys


def run_cli(args: argparse.Namespace, default_db: Path | str | None = None) -> int:
    """Run a parsed `keys` command; returns the process exit status."""
    db: Path | str | None = getattr(args, "db", None) or default_db
    if db is None:
        print("irouter keys: no registry database: pass --db PATH", file=sys.stderr)
        return 2
    try:
        store = open_key_store(db)
    except Exception as exc:  # database errors, permissions: say which, not a traceback
        print(f"irouter keys: cannot open registry {db}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.keys_command == "create":
            return _create(store, args)
        if args.keys_command == "revoke":
            return _revoke(store, args.key_id)
        if args.keys_command == "list":
            _print_table(store.list())
            return 0
        print(f"irouter keys: unknown command {args.keys_command!r}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _create(store: KeyStore, args: argparse.Namespace) -> int:
    scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
    try:
        key_id, plaintext = store.create(args.tenant, scopes, tier=args.tier, name=args.name)
    except ValueError as exc:
        print(f"irouter keys: {exc}", file=sys.stderr)
        return 2
    print(f"key id:  {key_id}")
    print(f"tenant:  {args.tenant}")
    print(f"scopes:  {','.join(sorted(set(scopes))) or '(none)'}")
    print(f"tier:    {args.tier}")
    print(f"api key: {plaintext}")
    print("Store the key now: only its hash is kept, it cannot be shown again.", file=sys.stderr)
    return 0


def _revoke(store: KeyStore, key_id: str) -> int:
    try:
        revoked = store.revoke(key_id)
    except NotFound as exc:
        print(f"irouter keys: {exc}", file=sys.stderr)
        return 1
    print(f"revoked key {key_id}" if revoked else f"key {key_id} was already revoked")
    return 0


def _print_table(records: list[KeyRecord]) -> None:
    header = ("ID", "TENANT", "TIER", "SCOPES", "STATUS", "CREATED", "NAME")
    rows = [header] + [
        (
            r.key_id,
            r.tenant,
            r.tier,
            ",".join(sorted(r.scopes)) or "-",
            "revoked" if r.revoked else "active",
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.created_at)),
            r.name or "-",
        )
        for r in records
    ]
    table([list(row) for row in rows])
    if not records:
        print("(no keys)")
