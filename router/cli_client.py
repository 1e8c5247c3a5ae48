"""What the control plane's CLI commands (`irouter models ...`, `irouter deployments ...`)
share: the flags that reach a running router, one call with its credentials, and errors
printed as the status the router answered."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """--target, --api-key and --json."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="the router's gRPC host:port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("IROUTER_API_KEY", ""),
        help="API key with the scope the command needs (default: $IROUTER_API_KEY)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")


def call(
    args: argparse.Namespace,
    stub_class: Callable[[grpc.Channel], Any],
    method: str,
    request: Any,
    *,
    timeout_s: float = 300.0,
    progress: str = "",
) -> Any:
    """One call to the router at args.target; with `progress`, a line on stderr that counts
    the seconds while the router works (loading a deployment takes a while)."""
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    with grpc.insecure_channel(args.target) as channel:
        rpc = getattr(stub_class(channel), method)
        if not progress:
            return rpc(request, metadata=metadata, timeout=timeout_s)
        future = rpc.future(request, metadata=metadata, timeout=timeout_s)
        started = time.monotonic()
        while not future.done():
            print(f"\r{progress} {time.monotonic() - started:.0f} s", end="", file=sys.stderr)
            time.sleep(0.5)
        print(file=sys.stderr)
        return future.result()


def refused(command: str, exc: grpc.RpcError) -> int:
    """Print the status the router answered; the exit status 1."""
    print(f"irouter {command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def table(rows: list[list[str]]) -> None:
    """Columns padded to their widest cell; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
