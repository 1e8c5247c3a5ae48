"""`irouter` command line: serve, proxy, models (prepare, and the registry's commands),
deployments, resources, usage, keys, loadtest."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from loadtest.harness.cli import register_cli as register_loadtest_cli
from loadtest.harness.cli import run_cli as run_loadtest_cli
from router import logs
from router.config import ConfigError
from router.config_file import load_config
from router.deployments_cli import register_cli as register_deployments_cli
from router.deployments_cli import run_cli as run_deployments_cli
from router.guard.config import keys_location
from router.keys_cli import register_cli, run_cli
from router.models_cli import is_registry_command
from router.models_cli import register_cli as register_models_cli
from router.models_cli import run_cli as run_models_cli
from router.resources_cli import register_cli as register_resources_cli
from router.resources_cli import run_cli as run_resources_cli
from router.usage_cli import register_cli as register_usage_cli
from router.usage_cli import run_cli as run_usage_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irouter", description="gRPC inference router")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the router (built-in default: SmolLM2 + MiniLM)")
    serve.add_argument("--config", type=Path, help="YAML config file (default: $IROUTER_CONFIG)")
    serve.add_argument("--host", help="bind address (overrides server.host)")
    serve.add_argument("--port", type=int, help="gRPC port (overrides server.port; 0 = any)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (0 disables)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--no-prepare", action="store_true", help="fail instead of preparing models")
    serve.add_argument("--http-port", type=int, help="also serve the REST proxy (0: off)")

    models = sub.add_parser("models", help="manage models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prep = models_sub.add_parser("prepare", help="convert the packaged models into the cache")
    prep.add_argument("--config", type=Path, help="YAML config file")
    prep.add_argument("--force", action="store_true", help="rebuild even if prepared")
    prep.add_argument(
        "--int8",
        action="store_true",
        help="also the whole decoder at int8 (folder <name>-int8: faster with many streams, "
        "slower with one; serve it with artifact: <name>-int8)",
    )
    register_models_cli(models_sub)

    proxy = sub.add_parser("proxy", help="REST proxy speaking the OpenAI API to a router")
    proxy.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    proxy.add_argument("--port", type=int, default=8080, help="HTTP port")
    proxy.add_argument("--target", default="127.0.0.1:50051", help="router gRPC host:port")
    proxy.add_argument("--timeout", type=float, default=600.0, help="per-request seconds")
    proxy.add_argument("--max-body-bytes", type=int, default=1_048_576, help="largest body")
    proxy.add_argument("--access-log", action="store_true", help="log one line per request")

    keys = register_cli(sub)
    keys.add_argument("--config", type=Path, help="YAML config file (its guard.auth.registry)")
    register_deployments_cli(sub)
    register_resources_cli(sub)
    register_usage_cli(sub)
    register_loadtest_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "loadtest":
        return run_loadtest_cli(args)
    if args.command == "models" and is_registry_command(args.models_command):
        return run_models_cli(args)
    if args.command == "deployments":
        return run_deployments_cli(args)
    if args.command == "resources":
        return run_resources_cli(args)
    if args.command == "usage":
        return run_usage_cli(args)
    reload = None
    try:
        if args.command == "serve":
            overrides = {
                "host": args.host,
                "port": args.port,
                "metrics_port": args.metrics_port,
                "workers": args.workers,
            }
            # SIGHUP reads the same sources again (picklable, for worker processes).
            reload = functools.partial(load_config, args.config, overrides=overrides)
            config = reload()
        else:
            config = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"irouter: configuration error: {exc}", file=sys.stderr)
        return 2

    if args.command == "proxy":
        import uvloop

        from router.rest import serve_proxy

        logs.configure("INFO")
        if args.access_log:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        try:
            # uvloop as for the router itself; uvicorn parses HTTP with httptools (installed).
            uvloop.run(
                serve_proxy(
                    args.host,
                    args.port,
                    args.target,
                    timeout_s=args.timeout,
                    max_body_bytes=args.max_body_bytes,
                    access_log=args.access_log,
                )
            )
        except ValueError as exc:
            print(f"irouter proxy: {exc}", file=sys.stderr)
            return 2
        return 0

    if args.command == "keys":
        return run_cli(args, default_db=keys_location(config.guard.auth, config.registry))

    from router.models.prepare import prepare_models

    if args.command == "models":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        precisions = ("int4", "int8") if args.int8 else ("int4",)
        prepare_models(
            config.model_cache, progress=True, force=args.force, decoder_precisions=precisions
        )
        return 0

    if not args.no_prepare:
        prepare_models(config.model_cache, progress=True)

    if args.http_port:
        from router.rest.embedded import run_with_proxy

        return run_with_proxy(config, args.http_port)

    from router.server import run

    try:
        return run(config, reload)
    except OSError as exc:
        print(f"irouter: {exc}", file=sys.stderr)
        return 1
