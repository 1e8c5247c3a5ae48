"""`irouter resources`: what a running router's host has and what its engines hold (a thin
client of ResourceService)."""

from __future__ import annotations

import argparse

import grpc
from google.protobuf import json_format

from router.cli_client import add_connection_flags, call, refused, table
from router.proto.irouter.v1 import resource_service_pb2 as pb
from router.proto.irouter.v1 import resource_service_pb2_grpc as pb_grpc

_MIB = 1 << 20


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `resources` command to `subparsers`."""
    add_connection_flags(subparsers.add_parser("resources", help="host, devices, allocations"))


def run_cli(args: argparse.Namespace) -> int:
    try:
        r = call(args, pb_grpc.ResourceServiceStub, "GetResources", pb.GetResourcesRequest())
    except grpc.RpcError as exc:
        return refused("resources", exc)
    if args.json:
        print(json_format.MessageToJson(r, preserving_proto_field_name=True))
        return 0
    print(f"cpu: {r.cpu_model}, {r.cpu_cores} cores, {' '.join(r.isa_features) or 'no AVX2'}")
    print(
        f"memory: {r.memory_total_bytes // _MIB} MiB total, {r.memory_available_bytes // _MIB} "
        f"available; ledger {r.memory_allocatable_bytes // _MIB} allocatable, "
        f"{r.memory_allocated_bytes // _MIB} allocated, {r.memory_free_bytes // _MIB} free; "
        f"{r.threads_allocated} threads in use"
    )
    for d in r.devices:
        print(f"device {d.name} ({d.kind}): {d.description}")
    for a in r.absent:
        print(f"no {a.kind}: {a.reason}")
    rows = [["MODEL", "REPLICA", "DEVICE", "THREADS", "KV MiB", "WEIGHTS MiB"]]
    for x in r.allocations:
        rows.append(
            [x.model, x.replica or "-", x.device, str(x.threads), str(x.kv_bytes // _MIB),
             str(x.weight_bytes // _MIB)]
        )  # fmt: skip
    table(rows)
    return 0
