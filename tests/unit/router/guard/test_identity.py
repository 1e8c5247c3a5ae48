"""The identity context a call runs under."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from router.errors import RouterError
from router.guard.identity import (
    Identity,
    PermissionDenied,
    Unauthenticated,
    bind_identity,
    current_identity,
    get_identity,
    require_identity,
    require_scopes,
)

ALICE = Identity("alice", "acme", frozenset({"generate"}), "jwt")


def test_errors_carry_their_grpc_codes() -> None:
    assert issubclass(Unauthenticated, RouterError)
    assert Unauthenticated.code is grpc.StatusCode.UNAUTHENTICATED
    assert PermissionDenied.code is grpc.StatusCode.PERMISSION_DENIED


def test_bind_identity_restores_the_previous_identity() -> None:
    assert get_identity() is None
    with pytest.raises(Unauthenticated):
        require_identity()
    with bind_identity(ALICE):
        assert require_identity() is ALICE
    assert current_identity.get() is None


async def test_concurrent_calls_see_only_their_own_identity() -> None:
    async def call(who: Identity) -> Identity | None:
        with bind_identity(who):
            await asyncio.sleep(0)
            return get_identity()

    bob = Identity("bob", "other", frozenset(), "api_key", key_id="k")
    assert list(await asyncio.gather(call(ALICE), call(bob))) == [ALICE, bob]


def test_require_scopes_names_the_missing_ones() -> None:
    require_scopes(ALICE, "generate")
    with pytest.raises(PermissionDenied, match="lacks scope\\(s\\) admin, embed"):
        require_scopes(ALICE, "generate", "embed", "admin")
