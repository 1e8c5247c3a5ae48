"""Authorization: which scope each method needs, and which models each tenant may use.

Pure functions over an `Identity`, so the rules are tested without a server. `admin` grants every
scope. Health and reflection are public: load balancers and tooling call them without credentials.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from router.errors import PermissionDenied
from router.guard.identity import Identity

ADMIN = "admin"
RETRIEVAL_READ = "retrieval:read"
"""Also needed by Generate/Complete calls with a retrieval option."""
PUBLIC_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

DEFAULT_METHOD_SCOPES: Mapping[str, str] = {
    "/irouter.v1.InferenceService/Generate": "inference:generate",
    "/irouter.v1.InferenceService/Complete": "inference:generate",
    "/irouter.v1.InferenceService/Embed": "inference:embed",
    "/irouter.v1.InferenceService/ListModels": "",
    "/irouter.v1.RetrievalService/Search": "retrieval:read",
    "/irouter.v1.RetrievalService/ListCollections": "retrieval:read",
    "/irouter.v1.RetrievalService/DescribeCollection": "retrieval:read",
    "/irouter.v1.RetrievalService/CreateCollection": "retrieval:write",
    "/irouter.v1.RetrievalService/DropCollection": "retrieval:write",
    "/irouter.v1.RetrievalService/Upsert": "retrieval:write",
    "/irouter.v1.RetrievalService/Delete": "retrieval:write",
    "/irouter.v1.ModelService/GetModelVersion": "models:read",
    "/irouter.v1.ModelService/ListModelVersions": "models:read",
    "/irouter.v1.ModelService/RegisterModelVersion": "models:write",
    "/irouter.v1.ModelService/UpdateModelVersion": "models:write",
    "/irouter.v1.ModelService/DeprecateModelVersion": "models:write",
    "/irouter.v1.ModelService/DeleteModelVersion": "models:write",
    "/irouter.v1.DeploymentService/GetDeployment": "deployments:read",
    "/irouter.v1.DeploymentService/ListDeployments": "deployments:read",
    "/irouter.v1.DeploymentService/WatchDeployment": "deployments:read",
    "/irouter.v1.DeploymentService/CreateDeployment": "deployments:write",
    "/irouter.v1.DeploymentService/ScaleDeployment": "deployments:write",
    "/irouter.v1.DeploymentService/RolloutDeployment": "deployments:write",
    "/irouter.v1.DeploymentService/DeleteDeployment": "deployments:write",
    "/irouter.v1.ResourceService/GetResources": "resources:read",
    "/irouter.v1.UsageService/GetUsage": "usage:read",
}
"""Full method name -> scope it needs ('' = any authenticated caller)."""


@dataclass(frozen=True)
class AuthzConfig:
    method_scopes: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_METHOD_SCOPES))
    """Full gRPC method name -> required scope; methods not listed need `admin`."""
    tenant_models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Tenant -> models it may call; a tenant not listed may call every model."""


def is_public(method: str) -> bool:
    """Health and reflection need no credentials."""
    service = method.lstrip("/").split("/", 1)[0]
    return service in PUBLIC_SERVICES


def required_scope(config: AuthzConfig, method: str) -> str:
    """The scope `method` needs; unknown methods need admin (deny by default)."""
    return config.method_scopes.get(method, ADMIN)


def check_method(config: AuthzConfig, identity: Identity, method: str) -> None:
    """Raise PermissionDenied naming the missing scope."""
    scope = required_scope(config, method)
    if not scope or scope in identity.scopes or ADMIN in identity.scopes:
        return
    raise PermissionDenied(
        f"{identity.method} caller {identity.subject!r} of tenant {identity.tenant!r} lacks "
        f"scope {scope!r} needed by {method}"
    )


def check_scope(identity: Identity, scope: str, method: str, why: str) -> None:
    """Raise PermissionDenied when a request option needs `scope` beyond the method's own."""
    if scope in identity.scopes or ADMIN in identity.scopes:
        return
    raise PermissionDenied(
        f"{identity.method} caller {identity.subject!r} of tenant {identity.tenant!r} lacks "
        f"scope {scope!r} needed by {why} of {method}"
    )


def check_model(config: AuthzConfig, identity: Identity, model: str) -> None:
    """Raise PermissionDenied when the tenant has a model allowlist without `model`."""
    allowed = config.tenant_models.get(identity.tenant)
    if allowed is None or model in allowed or ADMIN in identity.scopes:
        return
    raise PermissionDenied(
        f"tenant {identity.tenant!r} may not use model {model!r}; allowed: {sorted(allowed)}"
    )
