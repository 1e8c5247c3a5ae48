"""The control plane's cost to serving: the same calls on a router with its registry off and on
(usage metering of every call, the registry's services), each figure a ratio against the
registry-off router measured in the same run; and a run-time deployment against the same model
from the config file.

    python -m loadtest.benchmarks.control_plane_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import grpc

from loadtest.benchmarks.serve_bench import embed_load, generate_load, line, router_process
from router.models.prepare import DECODER_NAME
from router.proto.irouter.v1 import deployment_service_pb2 as dpb
from router.proto.irouter.v1 import deployment_service_pb2_grpc as dpb_grpc
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import model_service_pb2 as mpb
from router.proto.irouter.v1 import model_service_pb2_grpc as mpb_grpc

NO_EMBED_CACHE = "cache: {embedding: {enabled: false}}\n"


def _config(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


async def _deploy(target: str) -> None:
    """Register the packaged SmolLM2 and deploy it as 'chat', one replica like the config's."""
    async with grpc.aio.insecure_channel(target) as channel:
        version = mpb.ModelVersion(
            name="smol",
            version="1",
            kind=pb.MODEL_KIND_GENERATE,
            artifact=mpb.Artifact(package=DECODER_NAME),
            input_price_per_1k="0.5",
            output_price_per_1k="1.5",
        )
        models = mpb_grpc.ModelServiceStub(channel)
        await models.RegisterModelVersion(
            mpb.RegisterModelVersionRequest(model_version=version), timeout=300
        )
        deployment = dpb.Deployment(
            name="chat", model_name="smol", model_version="1", replicas=[dpb.Replica(name="r0")]
        )
        await dpb_grpc.DeploymentServiceStub(channel).CreateDeployment(
            dpb.CreateDeploymentRequest(deployment=deployment), timeout=300
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 8.0
    n, rounds = (64, 1) if args.quick else (128, 3)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        off = _config(tmp, "off", NO_EMBED_CACHE + "registry: {enabled: false}\n")
        on = _config(tmp, "on", NO_EMBED_CACHE + f"registry: {{url: 'sqlite:///{tmp}/r.db'}}\n")
        with router_process(config=off) as target:
            embed_off = asyncio.run(embed_load(target, 64, seconds))
            gen_off, _ = asyncio.run(generate_load(target, 4, n, rounds))
        line("Embed, 64 callers, registry off", embed_off, "texts/s")
        line("Generate 4 streams, registry off", gen_off, "tok/s")
        with router_process(config=on) as target:
            embed_on = asyncio.run(embed_load(target, 64, seconds))
            gen_on, _ = asyncio.run(generate_load(target, 4, n, rounds))
        line(
            "Embed, 64 callers, registry on (metered)",
            embed_on,
            "texts/s",
            embed_off,
            "goal >= 0.95",
        )
        line("Generate 4 streams, registry on (metered)", gen_on, "tok/s", gen_off, "goal >= 0.97")
        # The config's SmolLM2 stays loaded next to the deployment's: both hold a KV cache.
        with router_process(config=on) as target:
            asyncio.run(_deploy(target))
            deployed, _ = asyncio.run(generate_load(target, 4, n, rounds, model="chat"))
        line(
            "Generate 4 streams, run-time deployment 'chat'",
            deployed,
            "tok/s",
            gen_off,
            "goal >= 0.95",
        )


if __name__ == "__main__":
    main()
