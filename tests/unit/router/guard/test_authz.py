from __future__ import annotations

import pytest

from router.errors import PermissionDenied
from router.guard.authz import (
    RETRIEVAL_READ,
    AuthzConfig,
    check_method,
    check_model,
    check_scope,
    is_public,
)
from router.guard.identity import Identity


def make_identity(*scopes: str, tenant: str = "acme") -> Identity:
    return Identity(subject="svc", tenant=tenant, scopes=frozenset(scopes), method="api_key")


GENERATE = "/irouter.v1.InferenceService/Generate"
EMBED = "/irouter.v1.InferenceService/Embed"


def test_scope_per_method() -> None:
    config = AuthzConfig()
    check_method(config, make_identity("inference:generate"), GENERATE)
    with pytest.raises(PermissionDenied, match="lacks scope 'inference:embed'"):
        check_method(config, make_identity("inference:generate"), EMBED)


def test_list_models_needs_only_authentication_and_admin_grants_all() -> None:
    config = AuthzConfig()
    check_method(config, make_identity(), "/irouter.v1.InferenceService/ListModels")
    check_method(config, make_identity("admin"), EMBED)


def test_unknown_methods_are_denied_by_default() -> None:
    with pytest.raises(PermissionDenied, match="'admin'"):
        check_method(AuthzConfig(), make_identity("inference:generate"), "/x.v1.Other/Do")


def test_public_services() -> None:
    assert is_public("/grpc.health.v1.Health/Check")
    assert is_public("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_public(GENERATE)


def test_tenant_model_allowlist() -> None:
    config = AuthzConfig(tenant_models={"acme": ("small",)})
    check_model(config, make_identity(), "small")
    check_model(config, make_identity(tenant="other"), "big")
    with pytest.raises(PermissionDenied, match="may not use model 'big'; allowed: \\['small'\\]"):
        check_model(config, make_identity(), "big")


def test_an_option_can_need_a_scope_beyond_the_method() -> None:
    check_scope(make_identity("inference:generate", RETRIEVAL_READ), RETRIEVAL_READ, GENERATE, "x")
    check_scope(make_identity("admin"), RETRIEVAL_READ, GENERATE, "x")
    with pytest.raises(PermissionDenied, match="'retrieval:read' needed by the retrieval option"):
        check_scope(
            make_identity("inference:generate"),
            RETRIEVAL_READ,
            GENERATE,
            "the retrieval option",
        )
