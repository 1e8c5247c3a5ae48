"""What a local model artifact is, and whether the router can prepare and serve it: a llama GGUF
file (prepare_decoders converts it), a folder prepared by `irouter models prepare`, or the
packaged MiniLM safetensors folder (prepare_encoder exports it).

Only metadata is read, never weights. Every function raises FailedPrecondition with a message
that starts with `named`, the caller's name for the artifact (e.g. "artifact.path='/m.gguf'"),
and says what would make it servable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.errors import FailedPrecondition, quote
from router.models import prepare
from router.models.gguf_metadata import GGUFMetadata
from router.models.gguf_weights import field_value, read_config
from router.models.tokenizer_from_gguf import tokenizer_from_gguf

GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file."""
_PREPARE = "`irouter models prepare`"

_GGUF_KIND = "generate"
"""The router prepares decoders only from GGUF files."""
_MANIFEST_KINDS = {"decoder": "generate", "encoder": "embed"}
_MANIFEST_KEYS = {
    "generate": (
        "context_length",
        "vocab_size",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "stop_token_ids",
        "chat_template",
    ),
    "embed": ("embedding_dim", "max_length"),
}
"""Manifest keys the engines and router/serving/loader.py read, by kind."""
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")
"""What prepare_encoder reads from the packaged MiniLM folder."""
_LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)
"""Per-block tensors (blk.<i>.<name>.weight) that gguf_weights.load_llama_weights reads."""
_TOKENIZER_KEYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.eos_token_id",
)
"""GGUF metadata that tokenizer_from_gguf and prepare.decoder_manifest read."""


@dataclass(frozen=True, slots=True)
class ModelFile:
    """What inspecting a local artifact found."""

    format: str
    """'gguf', 'onnx' (a prepared folder) or 'safetensors' (the packaged MiniLM folder)."""
    kind: str
    """'generate' or 'embed'."""
    context_length: int
    """The model's own token limit where the artifact states it, else 0."""


def inspect_file(path: Path, named: str) -> ModelFile:
    """A single file: it must be a GGUF (recognised by its magic bytes, not its name)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise FailedPrecondition(
            f"{named} cannot be read ({exc.strerror or exc}); give the router read access to it"
        ) from None
    if magic == GGUF_MAGIC:
        return inspect_gguf(path, named)
    if path.suffix == ".onnx":
        raise FailedPrecondition(
            f"{named} is a bare ONNX graph; register the folder prepared by {_PREPARE} that "
            f"holds it ({path.parent}), with its {prepare.MANIFEST} and tokenizer.json"
        )
    raise FailedPrecondition(
        f"{named} is not a GGUF file (it does not start with {GGUF_MAGIC!r}); give a .gguf file "
        f"or a folder prepared by {_PREPARE}"
    )


def inspect_gguf(path: Path, named: str) -> ModelFile:
    """A GGUF that prepare_decoders can convert: architecture 'llama' with the metadata
    gguf_weights.read_config needs, tied embeddings and every tensor load_llama_weights reads, a
    tokenizer that tokenizer_from_gguf builds, an end-of-sequence token and a chat template."""
    try:
        reader = GGUFMetadata.read(path)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise FailedPrecondition(
            f"{named} is not a readable GGUF file ({exc}); give a complete .gguf file"
        ) from None
    architecture = field_value(reader, "general.architecture")
    if architecture != "llama":
        raise FailedPrecondition(
            f"{named} has general.architecture={quote(str(architecture))}; the router prepares "
            f"GGUF files of architecture 'llama' only (register a folder prepared by {_PREPARE} "
            "instead)"
        )
    try:
        config = read_config(reader)
    except (ValueError, TypeError) as exc:
        raise FailedPrecondition(f"{named} cannot be prepared: {exc}") from None
    names = {tensor.name for tensor in reader.tensors}
    if "output.weight" in names:
        raise FailedPrecondition(
            f"{named} has an untied output.weight; the router prepares llama models whose "
            "output projection is the token embedding"
        )
    needed = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(config.num_layers) for t in _LAYER_TENSORS
    ]
    missing = [n for n in needed if n not in names]
    if missing:
        raise FailedPrecondition(
            f"{named} lacks {len(missing)} of the {len(needed)} tensors of a "
            f"{config.num_layers}-block llama model, e.g. {', '.join(missing[:3])}; give a "
            "complete .gguf file"
        )
    for key in _TOKENIZER_KEYS:
        if field_value(reader, key) is None:
            raise FailedPrecondition(f"{named} has no {key}; the router's tokenizer needs it")
    if not field_value(reader, "tokenizer.chat_template"):
        raise FailedPrecondition(
            f"{named} has no tokenizer.chat_template; a generate model needs one to render chat "
            "messages (add it to the GGUF metadata)"
        )
    try:
        tokenizer_from_gguf(reader)
    except ValueError as exc:
        raise FailedPrecondition(f"{named}: its tokenizer cannot be built: {exc}") from None
    return ModelFile(format="gguf", kind=_GGUF_KIND, context_length=config.context_length)


def inspect_prepared(folder: Path, named: str) -> ModelFile:
    """A folder written by `irouter models prepare`: manifest.json of the current
    FORMAT_VERSION and a known kind, model.onnx, tokenizer.json, and the manifest keys that the
    engines of its kind read."""
    missing = [f for f in (prepare.MANIFEST, "model.onnx") if not (folder / f).is_file()]
    if missing:
        raise FailedPrecondition(
            f"{named} is a folder without {' or '.join(missing)}; give a folder prepared by "
            f"{_PREPARE}, or a .gguf file"
        )
    manifest = _read_json(folder / prepare.MANIFEST, named)
    version = manifest.get("format_version")
    if version != prepare.FORMAT_VERSION:
        raise FailedPrecondition(
            f"{named} was prepared at format_version={version!r}; this router reads "
            f"format_version={prepare.FORMAT_VERSION}: prepare it again with {_PREPARE}"
        )
    manifest_kind = manifest.get("kind")
    if manifest_kind not in _MANIFEST_KINDS:
        raise FailedPrecondition(
            f"{named} has a manifest of kind={quote(str(manifest_kind))}, not 'decoder' or "
            f"'encoder'; prepare it again with {_PREPARE}"
        )
    kind = _MANIFEST_KINDS[manifest_kind]
    absent = [key for key in _MANIFEST_KEYS[kind] if not manifest.get(key)]
    if not (folder / "tokenizer.json").is_file():
        absent.insert(0, "tokenizer.json")
    if absent:
        raise FailedPrecondition(
            f"{named} lacks {', '.join(absent)} (a prepared {manifest_kind} reads them from its "
            f"folder and {prepare.MANIFEST}); prepare it again with {_PREPARE}"
        )
    return ModelFile(
        format="onnx", kind=kind, context_length=_int_or_zero(manifest.get("context_length"))
    )


def inspect_minilm(folder: Path, named: str) -> ModelFile:
    """The packaged all-MiniLM-L6-v2 source folder: what prepare_encoder reads is there."""
    missing = [f for f in _MINILM_FILES if not (folder / f).is_file()]
    if missing:
        raise FailedPrecondition(
            f"{named}: {folder} lacks {', '.join(missing)}; reinstall the package"
        )
    config = _read_json(folder / "config.json", named)
    return ModelFile(
        format="safetensors",
        kind="embed",
        context_length=_int_or_zero(config.get("max_position_embeddings")),
    )


def _read_json(path: Path, named: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"{named}: {path.name} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FailedPrecondition(f"{named}: {path.name} is not a JSON object")
    return data


def _int_or_zero(value: Any) -> int:
    """A positive integer from a JSON file, else 0 (unknown)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return int(value)
    return 0
