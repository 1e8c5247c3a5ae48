"""Chunking: token windows with overlap, and parents in the index (replace, delete, reopen)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from router.retrieval import chunking
from router.retrieval.spec import CollectionSpec, Document, Filter
from router.retrieval.store import CollectionStore

DIM = 8


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A BERT-shaped tokenizer: one token per word, [CLS] text [SEP]."""
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return tok


def test_split_windows_overlap_and_offsets() -> None:
    words = [f"w{i}" for i in range(100)]
    tok = word_tokenizer(words)
    text = "  ".join(words)  # double spaces: chunk texts must be slices of the original
    [short], long = chunking.split(tok, ["w1 w2", text], window=42, overlap=8)
    assert short == chunking.Piece("w1 w2", [1, 4, 5, 2])
    assert [len(p.ids) for p in long] == [42, 42, 38]  # 40 tokens each, starting 32 apart
    assert all(p.ids[0] == 1 and p.ids[-1] == 2 for p in long)
    assert long[0].text == "  ".join(words[:40]) and long[1].text.startswith("w32  w33")
    assert long[2].text == "  ".join(words[64:])
    for a, b in itertools.pairwise(long):
        assert a.ids[-9:-1] == b.ids[1:9]  # 8 tokens of overlap
        assert all(p.text in text for p in (a, b))
    assert chunking.special_tokens(tok) == ([1], [2])


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def chunks(parent: str, n: int, tag: str = "") -> list[Document]:
    return [
        Document(chunking.chunk_id(parent, i), f"{tag}{i}", {"parent_id": parent}, parent=parent)
        for i in range(n)
    ]


async def test_parents_replace_delete_and_survive_reopen(tmp_path: Path) -> None:
    store = CollectionStore(tmp_path, fsync=False, compact_after=1000)
    await store.load()
    c = await store.create(CollectionSpec("c", DIM))
    await c.upsert([*chunks("a", 4), Document("b"), *chunks("c", 2)], unit(7, 0))
    assert c.index.chunks_of("a") == ["a#0", "a#1", "a#2", "a#3"] and len(c) == 7
    # Re-upserting a with 2 chunks drops a#2 and a#3; upserting b as chunks drops the whole b.
    vectors = unit(4, 1)
    await c.upsert(chunks("a", 2, "new") + chunks("b", 2), vectors)
    assert c.index.chunks_of("a") == ["a#0", "a#1"] and "a#3" not in c.index
    assert "b" not in c.index and c.index.chunks_of("b") == ["b#0", "b#1"]
    hit = (await c.search(vectors[1], 1, None, Filter()))[0].document
    assert (hit.id, hit.text, hit.metadata["parent_id"]) == ("a#1", "new1", "a")
    # A whole document under a chunked parent's name replaces its chunks.
    await c.upsert([Document("c")], unit(1, 2))
    assert c.index.chunks_of("c") == [] and "c#0" not in c.index and "c" in c.index
    assert await c.delete(["b", "nope"]) == 2 and c.index.chunks_of("b") == []
    await c.upsert(chunks("d", 3), unit(3, 3))
    await c.compact()  # a#*, c in the snapshot; d's chunks and the delete below in the WAL
    assert await c.delete(["d#1"]) == 1
    await store.close()

    reopened = CollectionStore(tmp_path, fsync=False)
    await reopened.load()
    c = reopened.get("c")
    assert c.index.chunks_of("a") == ["a#0", "a#1"] and c.index.chunks_of("d") == ["d#0", "d#2"]
    assert sorted(d for d in ("a#0", "a#1", "c", "d#0", "d#2") if d in c.index) == sorted(
        ("a#0", "a#1", "c", "d#0", "d#2")
    )
    assert len(c) == 5
    assert await c.delete(["a", "d"]) == 4 and len(c) == 1
    await reopened.close()


def test_split_estimated_fills_three_quarters_of_the_window_by_the_estimate() -> None:
    words = " ".join(f"word{i:03d}" for i in range(400))  # 8 bytes a word with its space
    text = "".join(f"Grüße {i}, 世界! " for i in range(30)) + words  # multi-byte, then ASCII
    window, bpt = 64, 4
    [pieces] = chunking.split_estimated([text], window, bytes_per_token=bpt)
    assert len(pieces) > 10 and all(not p.ids for p in pieces)
    for p in pieces:
        size = len(p.text.encode())
        assert p.text in text  # a slice: cut at character boundaries
        assert size <= 48 * bpt and p.tokens == -(-size // bpt) <= 48
    assert text.startswith(pieces[0].text) and text.endswith(pieces[-1].text)
    ascii_pieces = [p for p in pieces if p.text.isascii()]
    for a, b in itertools.pairwise(ascii_pieces):  # cut after a space, ~32 tokens shared
        assert a.text.endswith(" ") and not b.text.startswith(" ")
        assert a.text[-100:] in b.text[:160]
    # Together they cover the text in order.
    at = 0
    for p in pieces:
        found = text.find(p.text, max(0, at - 32 * bpt - 8))
        assert 0 <= found <= at
        at = found + len(p.text)
    assert at == len(text)


def test_split_estimated_keeps_a_fitting_text_whole_and_refuses_a_tiny_window() -> None:
    [[whole]] = chunking.split_estimated(["short text"], 64, bytes_per_token=4)
    assert (whole.text, whole.ids, whole.tokens) == ("short text", [], 3)
    # No whitespace at all: cut at character boundaries still.
    [pieces] = chunking.split_estimated(["é" * 1000], 64, bytes_per_token=4)
    assert "".join(p.text for p in pieces).replace("é", "") == "" and len(pieces) > 1
    with pytest.raises(ValueError, match="window=40"):
        chunking.split_estimated(["x"], 40, bytes_per_token=4)
