"""A deployment of an embedding model as one embedder: every batch goes through the dispatcher to
one of its replicas (a local encoder batcher or a remote embedding server), retried on another
when that replica fails, hedged when the deployment hedges (an Embed call is unary).

Tokenizing and the window check happen once, above, with the deployment's tokenizer; a replica
gets the same pieces whichever it is (a local one reads their token ids, a remote one their
texts).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from router.routing.attempt import AttemptInfo
from router.routing.dispatch import Dispatcher

Vectors = npt.NDArray[np.float32]
ReplicaEmbed = Callable[[str, str, Sequence[Any], list[int] | None], Awaitable[Vectors]]
"""(deployment, replica, pieces, counted) → their vectors from that replica (a remote server's
token count appended to `counted`); raises Unavailable when it is not loaded, or the replica's
own error."""


class RoutedEmbedder:
    """An embedding deployment's replicas as one embedder (see the module docstring)."""

    def __init__(
        self,
        name: str,
        dispatcher: Dispatcher,
        embed_on: ReplicaEmbed,
        *,
        on_attempt: Callable[[AttemptInfo], None] | None = None,
    ) -> None:
        self.name = name
        self._dispatcher = dispatcher
        self._embed_on = embed_on
        self._on_attempt = on_attempt

    async def embed(
        self,
        pieces: Sequence[Any],
        counted: list[int] | None = None,
        *,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> Vectors:
        """The pieces' vectors from the first replica that answers (its server's token count,
        if any, appended to `counted`)."""
        return await self._dispatcher.unary(
            self.name,
            lambda info: self._attempt(pieces, counted, info),
            timeout_s=timeout_s,
            request_id=request_id,
        )

    async def _attempt(
        self, pieces: Sequence[Any], counted: list[int] | None, info: AttemptInfo
    ) -> Vectors:
        if self._on_attempt is not None:
            self._on_attempt(info)
        return await self._embed_on(info.deployment, info.replica.name, pieces, counted)
