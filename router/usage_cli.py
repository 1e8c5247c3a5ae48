"""`irouter usage [--since 24h] [--group-by tenant,day]`: tokens and cost from a running
router's UsageService."""

from __future__ import annotations

import argparse
import re
import sys
import time

import grpc
from google.protobuf import json_format, timestamp_pb2

from router.cli_client import add_connection_flags, call, refused, table
from router.proto.irouter.v1 import usage_service_pb2 as pb
from router.proto.irouter.v1 import usage_service_pb2_grpc as pb_grpc

_SPAN = re.compile(r"(\d+)([mhd])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86_400}
COLUMNS = ("tenant", "key", "deployment", "model", "version", "day")


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `usage` command to `subparsers`."""
    p = subparsers.add_parser("usage", help="tokens and cost per tenant, model, version, day")
    p.add_argument("--since", default="24h", help="how far back: 30m, 24h, 7d (default 24h)")
    p.add_argument(
        "--group-by", default="tenant,deployment,version", help=f"comma-separated: {COLUMNS}"
    )
    add_connection_flags(p)


def run_cli(args: argparse.Namespace) -> int:
    span = _SPAN.fullmatch(args.since)
    if span is None:
        print(f"irouter usage: --since {args.since!r}: use e.g. 30m, 24h or 7d", file=sys.stderr)
        return 2
    start = timestamp_pb2.Timestamp()
    start.FromSeconds(int(time.time()) - int(span[1]) * _UNIT_S[span[2]])
    groups = [g.strip() for g in args.group_by.split(",") if g.strip()]
    request = pb.GetUsageRequest(start_time=start, group_by=groups)
    try:
        answer = call(args, pb_grpc.UsageServiceStub, "GetUsage", request)
    except grpc.RpcError as exc:
        return refused("usage", exc)
    if args.json:
        print(json_format.MessageToJson(answer, preserving_proto_field_name=True))
        return 0
    shown = [c for c in COLUMNS if c in groups]
    rows = [[c.upper() for c in shown] + ["CALLS", "INPUT", "OUTPUT", "COST"]]
    for r in answer.rows:
        rows.append(
            [getattr(r, c) or "-" for c in shown]
            + [str(r.calls), str(r.input_tokens), str(r.output_tokens), f"{r.cost} {r.currency}"]
        )
    table(rows)
    return 0
