"""`irouter models register|list|show|update|deprecate|delete`: the registry of model versions,
as a thin client of a running router's ModelService (gRPC), so the CLI, the REST routes and any
gRPC client change the registry by the same rules and leave the same audit events.

`irouter models prepare` (converting the packaged models) is not a registry command and stays
in router/cli.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, json_format

from router.cli_client import add_connection_flags, call, refused, table
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import model_service_pb2 as pb
from router.proto.irouter.v1 import model_service_pb2_grpc as pb_grpc

COMMANDS = ("register", "list", "show", "update", "deprecate", "delete")
_KINDS = {"generate": inference_pb.MODEL_KIND_GENERATE, "embed": inference_pb.MODEL_KIND_EMBED}
_UPDATE_FLAGS = {
    "description": "description",
    "input_schema": "input_schema",
    "output_schema": "output_schema",
    "input_price": "input_price_per_1k",
    "output_price": "output_price_per_1k",
    "currency": "currency",
    "tags": "tags",
}


def _version_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--description", help="free text for people")
    parser.add_argument("--input-schema", help="JSON Schema of the input (JSON text)")
    parser.add_argument("--output-schema", help="JSON Schema of the output (JSON text)")
    parser.add_argument("--input-price", help="price of 1,000 input tokens, e.g. 0.0005")
    parser.add_argument("--output-price", help="price of 1,000 output tokens")
    parser.add_argument("--currency", help="ISO 4217 code of the prices (default USD)")
    parser.add_argument("--tags", help="comma-separated tags")


def register_cli(models_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the registry's commands under `irouter models`."""
    reg = models_sub.add_parser("register", help="register a model version (artifact checked)")
    reg.add_argument("name", help="model name")
    reg.add_argument("version", help="version label, e.g. 1")
    reg.add_argument("--kind", choices=sorted(_KINDS), required=True, help="what it does")
    source = reg.add_mutually_exclusive_group(required=True)
    source.add_argument("--package", help="a packaged model: smollm2-135m-instruct, ...")
    source.add_argument("--path", help="absolute path of a GGUF file or a prepared folder")
    source.add_argument("--remote-url", help="a remote server's URL (with --remote-backend)")
    reg.add_argument(
        "--remote-backend", default="openai_http", help="openai_http (default) or kserve_grpc"
    )
    reg.add_argument("--remote-model", default="", help="the model's name on the server")
    reg.add_argument(
        "--remote-dialect",
        default="",
        help="openai_http: the server kind (openai, azure, vllm, trtllm, llama.cpp, ovms)",
    )
    reg.add_argument("--remote-api-version", default="", help="dialect azure: the API version")
    reg.add_argument(
        "--remote-api-key-env",
        default="",
        help="openai_http: the environment variable holding the server's API key on the routers",
    )
    reg.add_argument("--context-length", type=int, default=0, help="token limit (0: own)")
    _version_flags(reg)
    add_connection_flags(reg)

    lst = models_sub.add_parser("list", help="list registered model versions")
    lst.add_argument("name", nargs="?", default="", help="only this model's versions")
    lst.add_argument("--kind", choices=sorted(_KINDS), help="only this kind")
    lst.add_argument("--tag", default="", help="only versions with this tag")
    lst.add_argument("--all", action="store_true", help="include deprecated versions")
    add_connection_flags(lst)

    for command, text in (("show", "show one version"), ("delete", "delete one version")):
        p = models_sub.add_parser(command, help=text)
        p.add_argument("name")
        p.add_argument("version")
        add_connection_flags(p)

    upd = models_sub.add_parser("update", help="change a version's metadata")
    upd.add_argument("name")
    upd.add_argument("version")
    _version_flags(upd)
    upd.add_argument("--generation", type=int, default=0, help="apply only at this generation")
    add_connection_flags(upd)

    dep = models_sub.add_parser("deprecate", help="deprecate a version (no new deployments)")
    dep.add_argument("name")
    dep.add_argument("version")
    dep.add_argument("--reason", default="", help="why")
    add_connection_flags(dep)


def _tags(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The version's metadata flags that were given, by ModelVersion field."""
    found: dict[str, Any] = {}
    for flag, field in _UPDATE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            found[field] = _tags(value) if field == "tags" else value
    return found


def _request(args: argparse.Namespace) -> tuple[str, Any]:
    command = args.models_command
    if command == "register":
        artifact = pb.Artifact()
        if args.package:
            artifact.package = args.package
        elif args.path:
            artifact.path = os.path.abspath(args.path)
        else:
            artifact.remote.CopyFrom(
                pb.RemoteArtifact(
                    backend=args.remote_backend,
                    url=args.remote_url,
                    model=args.remote_model,
                    dialect=args.remote_dialect,
                    api_version=args.remote_api_version,
                    api_key_env=args.remote_api_key_env,
                )
            )
        version = pb.ModelVersion(
            name=args.name,
            version=args.version,
            kind=_KINDS[args.kind],
            artifact=artifact,
            context_length=args.context_length,
            **_fields(args),
        )
        return "RegisterModelVersion", pb.RegisterModelVersionRequest(model_version=version)
    if command == "list":
        return "ListModelVersions", pb.ListModelVersionsRequest(
            name=args.name,
            kind=_KINDS[args.kind] if args.kind else inference_pb.MODEL_KIND_UNSPECIFIED,
            tag=args.tag,
            include_deprecated=args.all,
            page_size=1000,
        )
    if command == "show":
        return "GetModelVersion", pb.GetModelVersionRequest(name=args.name, version=args.version)
    if command == "delete":
        return "DeleteModelVersion", pb.DeleteModelVersionRequest(
            name=args.name, version=args.version
        )
    if command == "deprecate":
        return "DeprecateModelVersion", pb.DeprecateModelVersionRequest(
            name=args.name, version=args.version, reason=args.reason
        )
    fields = _fields(args)
    if not fields:
        raise ValueError("update: give at least one of --" + ", --".join(_UPDATE_FLAGS))
    return "UpdateModelVersion", pb.UpdateModelVersionRequest(
        model_version=pb.ModelVersion(name=args.name, version=args.version, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=sorted(fields)),
        expected_generation=args.generation,
    )


def _row(v: pb.ModelVersion) -> list[str]:
    kind = {k: n for n, k in _KINDS.items()}.get(v.kind, "?")
    state = pb.ModelVersionState.Name(v.state).removeprefix("MODEL_VERSION_STATE_").lower()
    source = v.artifact.WhichOneof("source") or ""
    where = v.artifact.remote.url if source == "remote" else getattr(v.artifact, source, "")
    return [
        v.name,
        v.version,
        kind,
        state,
        str(v.context_length),
        f"{source}:{where}",
        v.artifact_sha256[:12],
        ",".join(v.tags),
    ]


def _print(response: Any, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
        return
    versions = list(getattr(response, "model_versions", []))
    single = getattr(response, "model_version", None)
    if single is not None and single.name:
        versions = [single]
    if not versions:
        print("(none)" if hasattr(response, "model_versions") else "done")
        return
    header = ["NAME", "VERSION", "KIND", "STATE", "CONTEXT", "ARTIFACT", "SHA256", "TAGS"]
    table([header] + [_row(v) for v in versions])


def run_cli(args: argparse.Namespace) -> int:
    """Run a parsed registry command; the exit status (1: the router refused, 2: bad flags)."""
    try:
        method, request = _request(args)
    except ValueError as exc:
        print(f"irouter models: {exc}", file=sys.stderr)
        return 2
    progress = ""
    if args.models_command == "register":
        progress = f"checking the artifact of {args.name}/{args.version}..."
    try:
        response = call(args, pb_grpc.ModelServiceStub, method, request, progress=progress)
    except grpc.RpcError as exc:
        return refused("models", exc)
    _print(response, args.json)
    return 0


def is_registry_command(command: str) -> bool:
    return command in COMMANDS
