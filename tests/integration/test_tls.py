"""TLS and mutual TLS on the gRPC port, with a throwaway CA made by `cryptography`."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.server import RouterServer
from router.tls import TlsConfig
from tests.integration.conftest import EMB, make_config
from tests.pki import Issued, issue, make_ca


@dataclass
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA
    unmapped: Issued  # from the right CA, but no tenant is configured for it


def make_pki(tag: str) -> Pki:
    ca, ca_key, ca_cert = make_ca(f"irouter test CA {tag}")
    _, other_key, other_cert = make_ca("someone else's CA")
    server = issue(ca_key, ca_cert, "localhost", x509.DNSName("localhost"))
    client = issue(
        ca_key, ca_cert, "billing", x509.UniformResourceIdentifier("spiffe://acme/billing")
    )
    stranger = issue(other_key, other_cert, "intruder", x509.DNSName("intruder"))
    unmapped = issue(
        ca_key, ca_cert, "unknown", x509.UniformResourceIdentifier("spiffe://acme/unknown")
    )
    return Pki(ca, server, client, stranger, unmapped)


def write(tmp: Path, pki: Pki, client_ca: bool) -> TlsConfig:
    (tmp / "server.pem").write_bytes(pki.server.cert)
    (tmp / "server.key").write_bytes(pki.server.key)
    (tmp / "ca.pem").write_bytes(pki.ca.cert)
    return TlsConfig(
        cert=str(tmp / "server.pem"),
        key=str(tmp / "server.key"),
        client_ca=str(tmp / "ca.pem") if client_ca else "",
    )


async def serve(tmp: Path, model_cache: Path, tls: TlsConfig) -> RouterServer:
    config = make_config(
        model_cache,
        tmp,
        ModelConfig(name=EMB, kind="embed", artifact=EMB),
        retrieval=False,
        server={"tls": tls},
    )
    server = RouterServer(config)
    await server.start()
    return server


async def list_models(port: int, creds: grpc.ChannelCredentials | None) -> pb.ListModelsResponse:
    target = f"localhost:{port}"
    channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
    async with channel:
        return await pb_grpc.InferenceServiceStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=5
        )


@pytest.fixture
async def tls_server(tmp_path: Path, model_cache: Path) -> AsyncIterator[tuple[RouterServer, Pki]]:
    pki = make_pki("a")
    server = await serve(tmp_path, model_cache, write(tmp_path, pki, client_ca=False))
    yield server, pki
    await server.stop(0)


@pytest.fixture
async def mtls_server(
    tmp_path: Path, model_cache: Path
) -> AsyncIterator[tuple[RouterServer, Pki, Path]]:
    pki = make_pki("b")
    server = await serve(tmp_path, model_cache, write(tmp_path, pki, client_ca=True))
    yield server, pki, tmp_path
    await server.stop(0)


async def test_tls_serves_clients_that_trust_the_ca(
    tls_server: tuple[RouterServer, Pki],
) -> None:
    server, pki = tls_server
    response = await list_models(server.port, grpc.ssl_channel_credentials(pki.ca.cert))
    assert [m.name for m in response.models] == [EMB]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await list_models(server.port, None)  # plaintext against a TLS port
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_clients_without_a_valid_certificate(
    mtls_server: tuple[RouterServer, Pki, Path],
) -> None:
    server, pki, _ = mtls_server
    ok = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
    assert (await list_models(server.port, ok)).models
    for creds in (
        grpc.ssl_channel_credentials(pki.ca.cert),  # no client certificate
        grpc.ssl_channel_credentials(pki.ca.cert, pki.stranger.key, pki.stranger.cert),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_models(server.port, creds)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_rotated_certificates_are_picked_up_without_restart(
    mtls_server: tuple[RouterServer, Pki, Path],
) -> None:
    server, _, tmp = mtls_server
    rotated = make_pki("rotated")
    for name, data in (
        ("server.pem", rotated.server.cert),
        ("server.key", rotated.server.key),
        ("ca.pem", rotated.ca.cert),
    ):
        staged = tmp / f".{name}.new"
        staged.write_bytes(data)
        os.replace(staged, tmp / name)
    creds = grpc.ssl_channel_credentials(rotated.ca.cert, rotated.client.key, rotated.client.cert)
    assert (await list_models(server.port, creds)).models
    assert server.tls is not None and server.tls.reloads == 1


async def test_client_certificate_is_an_identity_mapped_to_a_tenant(
    tmp_path: Path, model_cache: Path
) -> None:
    from router.guard.config import AuthSection, GuardConfig, MtlsIdentity

    pki = make_pki("c")
    tls = write(tmp_path, pki, client_ca=True)
    guard = GuardConfig(
        audit_log=str(tmp_path / "audit.jsonl"),
        auth=AuthSection(
            enabled=True,
            registry=tmp_path / "registry.db",
            mtls_identities={
                "spiffe://acme/billing": MtlsIdentity(
                    tenant="acme", scopes=frozenset({"inference:embed"})
                )
            },
        ),
    )
    config = make_config(
        model_cache,
        tmp_path,
        ModelConfig(name=EMB, kind="embed", artifact=EMB),
        retrieval=False,
        server={"tls": tls},
        guard=guard,
    )
    server = RouterServer(config)
    await server.start()
    try:
        mapped = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
        assert (await list_models(server.port, mapped)).models
        # Valid for the CA but not mapped to any tenant: the handshake passes, the call does not.
        unmapped = grpc.ssl_channel_credentials(pki.ca.cert, pki.unmapped.key, pki.unmapped.cert)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_models(server.port, unmapped)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not mapped to a tenant" in (info.value.details() or "")
        assert server.guard is not None
        server.guard.recorder.flush()
        audit = (tmp_path / "audit.jsonl").read_text()
        assert '"tenant":"acme"' in audit and '"auth":"mtls"' in audit
    finally:
        await server.stop(0)
