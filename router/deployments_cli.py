"""`irouter deployments create|list|status|scale|delete`: deployments at run time, as a thin
client of a running router's DeploymentService (gRPC)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from router.cli_client import add_connection_flags, call, refused, table
from router.proto.irouter.v1 import deployment_service_pb2 as pb
from router.proto.irouter.v1 import deployment_service_pb2_grpc as pb_grpc


def register_cli(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the `deployments` command to `subparsers`."""
    deployments = subparsers.add_parser("deployments", help="serve registered model versions")
    sub = deployments.add_subparsers(dest="deployments_command", required=True)

    create = sub.add_parser("create", help="serve a model version under a name (waits for it)")
    create.add_argument("name", help="the name clients call")
    create.add_argument("--model", required=True, help="registered model name")
    create.add_argument("--version", required=True, help="its version")
    create.add_argument("--replicas", type=int, default=1, help="how many replicas (r0, r1...)")
    create.add_argument("--backend", default="onnxruntime", help="onnxruntime, openvino, ...")
    create.add_argument("--device", default="", help="OpenVINO device of local replicas")
    create.add_argument("--url", default="", help="remote replicas' server (openai_http...)")
    create.add_argument("--remote-model", default="", help="the model's name on that server")
    create.add_argument(
        "--dialect",
        default="",
        help="openai_http: the server kind (openai, azure, vllm, trtllm, llama.cpp, ovms)",
    )
    create.add_argument(
        "--api-key-env",
        default="",
        help="openai_http: the environment variable holding the server's API key on the routers",
    )
    create.add_argument("--api-version", default="", help="dialect azure: the API version")
    create.add_argument("--threads", type=int, default=0, help="threads per replica (0: 2)")
    create.add_argument("--max-slots", type=int, default=0, help="sequences per replica (0: 16)")
    create.add_argument("--max-context", type=int, default=0, help="tokens per sequence")
    create.add_argument("--prefix-cache-mb", type=int, help="prefix KV per replica (MiB)")
    create.add_argument(
        "--prefill-graph",
        default="",
        help="what computes onnxruntime replicas' prompts: auto (default), native, int8 or model",
    )
    create.add_argument(
        "--decode-kernel",
        default="",
        help="onnxruntime replicas' decode steps: auto (default), native, onnxruntime, or a "
        "native tile: avx2, avx512-vnni or amx-int8",
    )
    create.add_argument("--require-auth", action="store_true", help="refuse anonymous callers")
    create.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="TIER=RPM/TPM/STREAMS",
        help="per-tenant limits of a tier, e.g. default=100/100000/16 (repeat per tier)",
    )
    add_connection_flags(create)

    lst = sub.add_parser("list", help="list deployments and their replicas")
    add_connection_flags(lst)
    status = sub.add_parser("status", help="one deployment and its replicas")
    status.add_argument("name")
    add_connection_flags(status)
    scale = sub.add_parser("scale", help="set the number of replicas (removed ones drain)")
    scale.add_argument("name")
    scale.add_argument("replicas", type=int, help="1 to 16")
    scale.add_argument("--generation", type=int, default=0, help="apply only at this generation")
    add_connection_flags(scale)
    rollout = sub.add_parser("rollout", help="move to another version by steps of traffic")
    rollout.add_argument("name")
    rollout.add_argument("version", help="the registered version to move to")
    rollout.add_argument("--steps", default="10,50,100", help="percents of traffic, to 100")
    rollout.add_argument("--step-interval", type=float, default=60.0, help="seconds per step")
    rollout.add_argument("--max-error-rate", type=float, default=0.05, help="per step")
    rollout.add_argument("--max-ttft-p95", type=float, default=0.0, help="seconds (0: off)")
    rollout.add_argument("--min-calls", type=int, default=0, help="calls a step needs")
    rollout.add_argument("--backend", help="the new version's replicas' backend (default: as r0)")
    rollout.add_argument("--device", default="", help="their OpenVINO device")
    rollout.add_argument("--url", default="", help="their remote server")
    rollout.add_argument("--generation", type=int, default=0, help="apply only at this generation")
    add_connection_flags(rollout)
    watch = sub.add_parser("watch", help="print a deployment at every change until deleted")
    watch.add_argument("name")
    add_connection_flags(watch)
    delete = sub.add_parser("delete", help="stop serving a deployment (calls in flight finish)")
    delete.add_argument("name")
    add_connection_flags(delete)
    return deployments


def _request(args: argparse.Namespace) -> tuple[str, Any, str]:
    """The method, its request, and a progress line ('' for quick calls)."""
    command = args.deployments_command
    if command == "create":
        replica = {"backend": args.backend, "device": args.device, "url": args.url}
        replicas = [
            pb.Replica(
                name=f"r{i}",
                remote_model=args.remote_model,
                dialect=args.dialect,
                api_key_env=args.api_key_env,
                api_version=args.api_version,
                **replica,
            )
            for i in range(args.replicas)
        ]
        deployment = pb.Deployment(
            name=args.name,
            model_name=args.model,
            model_version=args.version,
            replicas=replicas,
            threads=args.threads,
            max_slots=args.max_slots,
            max_context=args.max_context,
            prefill_graph=args.prefill_graph,
            decode_kernel=args.decode_kernel,
        )
        if args.prefix_cache_mb is not None:
            deployment.prefix_cache_mb = args.prefix_cache_mb
        deployment.require_auth = args.require_auth
        deployment.limits.extend(_limit(text) for text in args.limit)
        request = pb.CreateDeploymentRequest(deployment=deployment)
        return "CreateDeployment", request, f"loading {args.name}'s replicas..."
    if command == "list":
        return "ListDeployments", pb.ListDeploymentsRequest(), ""
    if command == "status":
        return "GetDeployment", pb.GetDeploymentRequest(name=args.name), ""
    if command == "scale":
        scale = pb.ScaleDeploymentRequest(
            name=args.name, replica_count=args.replicas, expected_generation=args.generation
        )
        return "ScaleDeployment", scale, f"scaling {args.name} to {args.replicas}..."
    if command == "rollout":
        try:
            steps = [int(p) for p in args.steps.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--steps {args.steps!r}: give percents such as 10,50,100") from None
        rollout = pb.RolloutDeploymentRequest(
            name=args.name,
            target_version=args.version,
            steps=steps,
            step_interval_s=args.step_interval,
            max_error_rate=args.max_error_rate,
            max_ttft_p95_s=args.max_ttft_p95,
            min_calls=args.min_calls,
            expected_generation=args.generation,
        )
        if args.backend or args.device or args.url:
            rollout.target_replica.CopyFrom(
                pb.Replica(backend=args.backend or "onnxruntime", device=args.device, url=args.url)
            )
        return "RolloutDeployment", rollout, f"loading version {args.version}..."
    return "DeleteDeployment", pb.DeleteDeploymentRequest(name=args.name), "draining..."


def _limit(text: str) -> pb.TierLimit:
    tier, _, numbers = text.partition("=")
    parts = numbers.split("/")
    if not tier or len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"--limit {text!r}: write TIER=RPM/TPM/STREAMS, e.g. default=100/100000/16"
        )
    rpm, tpm, streams = (int(p) for p in parts)
    return pb.TierLimit(
        tier=tier, requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrent_streams=streams
    )


def _print(response: Any, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
        return
    found = list(getattr(response, "deployments", []))
    single = getattr(response, "deployment", None)
    if single is not None and single.name:
        found = [single]
    if not found:
        print("(none)" if hasattr(response, "deployments") else "done")
        return
    rows = [["NAME", "VERSION", "GENERATION", "REPLICA", "BACKEND", "READY", "ERROR"]]
    for d in found:
        backends = {r.name: r.backend + (f" {r.url}" if r.url else "") for r in d.replicas}
        for s in d.replica_states:
            rows.append(
                [
                    d.name,
                    f"{d.model_name}/{d.model_version}",
                    str(d.generation),
                    s.name,
                    backends.get(s.name, ""),
                    "yes" if s.ready else "no",
                    s.error[:80],
                ]
            )
    table(rows)
    for d in found:
        r = d.rollout
        if r.target_version:
            state = pb.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_").lower()
            share = f", {r.steps[r.step]}% of traffic" if state == "running" else ""
            moving = f"{r.from_version} -> {r.target_version}"
            print(f"{d.name}: rollout {moving} {state}{share}: {r.reason}")


def _watch(args: argparse.Namespace) -> int:
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    request = pb.WatchDeploymentRequest(name=args.name)
    with grpc.insecure_channel(args.target) as channel:
        try:
            for change in pb_grpc.DeploymentServiceStub(channel).WatchDeployment(
                request, metadata=metadata
            ):
                _print(change, args.json)
        except grpc.RpcError as exc:
            return refused("deployments", exc)
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """Run a parsed `deployments` command; the exit status (1: the router refused)."""
    if args.deployments_command == "watch":
        return _watch(args)
    try:
        method, request, progress = _request(args)
    except ValueError as exc:
        print(f"irouter deployments: {exc}", file=sys.stderr)
        return 2
    try:
        response = call(
            args, pb_grpc.DeploymentServiceStub, method, request, timeout_s=900, progress=progress
        )
    except grpc.RpcError as exc:
        return refused("deployments", exc)
    _print(response, args.json)
    return 0
