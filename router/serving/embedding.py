"""An embedding call's input as the encoder sees it (texts checked, tokenized, fitted to the
window) and one batch through the model's encoder, local or remote."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from backends.remote import RemoteError
from router.errors import InvalidArgument
from router.retrieval import chunking
from router.scheduler.remote_errors import remote_error
from router.serving import passthrough, tokenize
from router.serving.model import ServedModel


def check_batch(model: ServedModel, texts: Sequence[str]) -> None:
    """An Embed call's texts: at least one, at most the model's batch."""
    if not texts:
        raise InvalidArgument("texts is empty: give at least one text", field="texts")
    if len(texts) > model.config.max_batch:
        raise InvalidArgument(
            f"texts has {len(texts)} entries; model {model.name!r} takes at most "
            f"{model.config.max_batch} per call",
            field="texts",
        )


def encode_texts(
    model: ServedModel,
    texts: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    field: str = "texts",
    truncate: bool = False,
) -> list[chunking.Piece]:
    """Each text with its encoder token ids, checked to be non-empty and to fit the window.
    `positions` are the texts' indexes in the request (for the error's field name);
    `truncate` keeps the first window of a longer text instead of refusing it (queries).
    A model with no local tokenizer gets the texts as they are, counted by estimate; its server
    refuses one longer than its window (a query is cut to the estimate's window first)."""
    where = positions if positions is not None else range(len(texts))
    if model.tokenizer is None:
        return _estimated(model, texts, where, field=field, truncate=truncate)
    for i, text in zip(where, texts, strict=True):
        if not text:
            raise InvalidArgument(f"{field}[{i}] is empty", field=f"{field}[{i}]")
        if not truncate:
            tokenize.check_fits(
                [text],
                limit_tokens=model.context_length,
                token_bytes=model.max_token_bytes,
                what=f"model {model.name!r}",
                field=f"{field}[{i}]",
            )
    if truncate:
        # The first window of tokens lies within the first context * max_token_bytes bytes,
        # hence characters: the rest of a huge query need not be tokenized at all (only a
        # single word longer than 4 * context bytes, across the cut, could tokenize otherwise).
        if model.max_token_bytes:
            keep = model.context_length * model.max_token_bytes
            texts = [text[:keep] for text in texts]
        pieces = chunking.split(model.tokenizer, list(texts), model.context_length)
        return [chunks[0] for chunks in pieces]
    out: list[chunking.Piece] = []
    for i, text, enc in zip(where, texts, model.tokenizer.encode_batch(list(texts)), strict=True):
        if len(enc.ids) > model.context_length:
            raise InvalidArgument(
                f"{field}[{i}] has {len(enc.ids)} tokens; model {model.name!r} embeds at most "
                f"{model.context_length}",
                field=f"{field}[{i}]",
            )
        out.append(chunking.Piece(text, enc.ids))
    return out


def _estimated(
    model: ServedModel, texts: Sequence[str], where: Sequence[int], *, field: str, truncate: bool
) -> list[chunking.Piece]:
    out: list[chunking.Piece] = []
    for i, text in zip(where, texts, strict=True):
        if not text:
            raise InvalidArgument(f"{field}[{i}] is empty", field=f"{field}[{i}]")
        if truncate:
            text = text[: model.context_length * passthrough.BYTES_PER_TOKEN]
        out.append(
            chunking.Piece(text, [], passthrough.estimate_tokens(prompt=text, messages=None))
        )
    return out


async def embed_pieces(
    model: ServedModel, pieces: Sequence[chunking.Piece], counted: list[int] | None = None
) -> npt.NDArray[np.float32]:
    """One batch (at most the model's max_batch) through its encoder: the local batcher
    takes the token ids, a remote server the texts; a deployment hands the batch to one of its
    replicas (each one of those). A remote server's count of the batch's tokens, when it gives
    one, is appended to `counted`."""
    if model.routed_embedder is not None:  # its dimension is its replicas' (set as they load)
        return await model.routed_embedder.embed(pieces, counted)
    if model.remote_embedder is not None:
        try:
            vectors, tokens = await model.remote_embedder.embed_counted([p.text for p in pieces])
        except RemoteError as exc:
            raise remote_error(model.name, exc) from None
        model.dimension = model.dimension or int(vectors.shape[1])
        if counted is not None and tokens is not None:
            counted.append(tokens)
        return vectors
    assert model.batcher is not None
    return await model.batcher.embed([p.ids for p in pieces])
