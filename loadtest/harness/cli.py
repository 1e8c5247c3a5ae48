"""`irouter loadtest run|compare|report` (also `python -m loadtest.harness ...`).

Flags build the same mapping a YAML scenario file holds and override its keys, so
`--scenario base.yaml --rate 20` reuses a file with another rate; the mapping is validated once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_TARGET = "grpc://127.0.0.1:50051"
DEFAULT_DURATION_S = 10.0


def _add_run_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("--scenario", type=Path, help="YAML scenario file (flags override its keys)")
    run.add_argument(
        "--target",
        help=f"grpc://host:port (router) or http://host:port (OpenAI proxy); "
        f"default {DEFAULT_TARGET}",
    )
    run.add_argument(
        "--method",
        action="append",
        metavar="NAME[=WEIGHT]",
        help="method in the mix, repeatable; gRPC: Generate Complete Embed Search ListModels; "
        "HTTP: chat chat-stream completions completions-stream embeddings (default Generate or "
        "chat-stream)",
    )
    load = run.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--sweep-concurrency", metavar="N,N,...", help="closed-loop sweep")
    load.add_argument("--sweep-rate", metavar="R,R,...", help="open-loop sweep")
    run.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    run.add_argument(
        "--duration", type=float, help=f"seconds per stage (default {DEFAULT_DURATION_S:g})"
    )
    run.add_argument("--requests", type=int, help="requests per stage")
    run.add_argument("--processes", type=int, help="client processes (default 1)")
    run.add_argument("--prompts", help="'builtin' (default) or a JSONL file")
    run.add_argument(
        "--max-tokens",
        help="N, uniform:MIN:MAX or normal:MEAN:STD[:MIN:MAX] (default 64)",
    )
    run.add_argument("--temperature", type=float, help="default 0 (greedy)")
    run.add_argument("--ignore-eos", action="store_true", default=None, help="always max_tokens")
    run.add_argument("--model", help="generation model")
    run.add_argument("--embed-model", help="embedding model")
    run.add_argument("--collection", help="collection for Search")
    run.add_argument("--top-k", type=int, help="Search results per query")
    run.add_argument("--timeout", type=float, help="per-request seconds (default 120)")
    run.add_argument(
        "--honor-retry-info",
        action="store_true",
        default=None,
        help="closed loop: a shed call's client waits its RetryInfo delay before calling again",
    )
    run.add_argument("--seed", type=int, help="seed of the random choices")
    run.add_argument(
        "--slo",
        action="append",
        metavar="KEY=MS",
        help="goodput threshold, repeatable: ttft_ms, tpot_ms, itl_ms, e2e_ms",
    )
    run.add_argument("--out", type=Path, default=Path("loadtest-results.json"), help="results JSON")
    run.add_argument("--html", type=Path, help="HTML report (default: --out with .html)")
    run.add_argument("--no-html", action="store_true", help="write no HTML report")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def register_cli(sub: Any) -> argparse.ArgumentParser:
    """Add `loadtest` to a parent's subparsers (irouter's)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "loadtest", help="load-test a router or the OpenAI proxy; compare results"
    )
    _fill(parser)
    return parser


def _fill(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="loadtest_command", required=True)
    _add_run_flags(commands.add_parser("run", help="run a scenario"))
    compare = commands.add_parser("compare", help="two results files side by side (B/A)")
    compare.add_argument("a", type=Path)
    compare.add_argument("b", type=Path)
    report = commands.add_parser("report", help="(re)write the HTML report of a results file")
    report.add_argument("results", type=Path)
    report.add_argument("--html", type=Path, help="default: the results path with .html")


def _list(text: str, name: str, kind: type[int] | type[float]) -> list[int] | list[float]:
    from loadtest.harness.scenario import ScenarioError

    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ScenarioError(f"{name}: {text!r} is not a comma-separated list of numbers") from None


def scenario_mapping(args: argparse.Namespace) -> dict[str, Any]:
    """The scenario file's mapping with the flags applied over it (not validated yet)."""
    from loadtest.harness.scenario import ScenarioError, load_scenario_file

    spec: dict[str, Any] = load_scenario_file(args.scenario) if args.scenario else {}
    simple = {
        "target": args.target,
        "duration_s": args.duration,
        "requests": args.requests,
        "processes": args.processes,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "model": args.model,
        "embed_model": args.embed_model,
        "collection": args.collection,
        "top_k": args.top_k,
        "timeout_s": args.timeout,
        "seed": args.seed,
        "honor_retry_info": args.honor_retry_info,
    }
    spec.update({k: v for k, v in simple.items() if v is not None})
    spec.setdefault("target", DEFAULT_TARGET)
    if args.method:
        mix: dict[str, float] = {}
        for item in args.method:
            name, _, weight = item.partition("=")
            try:
                mix[name] = float(weight) if weight else 1.0
            except ValueError:
                raise ScenarioError(
                    f"mix: weight of {name!r} in --method {item!r} is not a number"
                ) from None
        spec["mix"] = mix
    elif "mix" not in spec:
        spec["mix"] = "Generate" if str(spec["target"]).startswith("grpc://") else "chat-stream"
    load: dict[str, Any] | None = None
    if args.concurrency is not None:
        load = {"mode": "closed", "concurrency": args.concurrency}
    elif args.rate is not None:
        load = {"mode": "open", "rate": args.rate}
    elif args.sweep_concurrency:
        load = {
            "mode": "sweep",
            "concurrency": _list(args.sweep_concurrency, "load.concurrency", int),
        }
    elif args.sweep_rate:
        load = {"mode": "sweep", "rate": _list(args.sweep_rate, "load.rate", float)}
    if load is not None:
        spec["load"] = load
    spec.setdefault("load", {"mode": "closed", "concurrency": 1})
    if args.max_concurrency is not None and isinstance(spec["load"], dict):
        spec["load"]["max_concurrency"] = args.max_concurrency
    if "duration_s" not in spec and "requests" not in spec:
        spec["duration_s"] = DEFAULT_DURATION_S
    if args.slo:
        slo = dict(spec.get("slo") or {})
        for item in args.slo:
            key, sep, value = item.partition("=")
            try:
                slo[key] = float(value)
            except ValueError:
                raise ScenarioError(f"slo.{key}: --slo {item!r} is not KEY=MILLISECONDS") from None
            if not sep:
                raise ScenarioError(f"slo: --slo {item!r} is not KEY=MILLISECONDS")
        spec["slo"] = slo
    return spec


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from loadtest.harness.report_html import write_html
    from loadtest.harness.results import run_scenario, save_results
    from loadtest.harness.runner import HarnessError
    from loadtest.harness.scenario import scenario_from_dict
    from loadtest.harness.table import summary_table

    scenario = scenario_from_dict(scenario_mapping(args))
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        result = uvloop.run(run_scenario(scenario, progress=progress))
    except HarnessError as exc:
        print(f"irouter loadtest: {exc}", file=sys.stderr)
        return 1
    print(summary_table(result))
    save_results(result, args.out)
    print(f"results: {args.out}")
    if not args.no_html:
        html_path = args.html or args.out.with_suffix(".html")
        write_html(result, html_path)
        print(f"report:  {html_path}")
    return 0 if any(s["summary"]["completed"] for s in result["stages"]) else 1


def run_cli(args: argparse.Namespace) -> int:
    """Dispatch a parsed `loadtest` command; errors in the input exit 2 with the field named."""
    from loadtest.harness.results import load_results
    from loadtest.harness.scenario import ScenarioError

    try:
        if args.loadtest_command == "run":
            return _run(args)
        if args.loadtest_command == "compare":
            from loadtest.harness.compare import compare_results

            a, b = load_results(args.a), load_results(args.b)
            print(compare_results(a, b, (args.a.stem, args.b.stem)))
            return 0
        from loadtest.harness.report_html import write_html

        result = load_results(args.results)
        html_path = args.html or args.results.with_suffix(".html")
        write_html(result, html_path)
        print(f"report: {html_path}")
        return 0
    except ScenarioError as exc:
        print(f"irouter loadtest: scenario error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"irouter loadtest: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="irouter loadtest", description=__doc__)
    _fill(parser)
    return run_cli(parser.parse_args(argv))
