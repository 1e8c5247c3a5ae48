"""Which graph computes a decoder's prompts: the packed int8 prompt graph where the CPU
multiplies int8 natively (backends.packed_prefill), else the decoder's own graph, or the native
kernels where they compute every step (backends.native_decode); and which of a prepared
folder's files a decoder so configured leaves unloaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from backends import native_decode
from backends.base import PREFILL_GRAPHS
from backends.cpu import int8_dot_flag

logger = logging.getLogger(__name__)


def prefill_graph_file(manifest: dict[str, Any], model_dir: Path, prefill: str) -> Path | None:
    """The graph file that computes prompts, or None for the decoder's own (`prefill`: one of
    PREFILL_GRAPHS; 'auto' takes the int8 graph where the CPU multiplies int8 natively)."""
    if prefill not in PREFILL_GRAPHS:
        raise ValueError(f"prefill_graph={prefill!r} is unknown; use one of {list(PREFILL_GRAPHS)}")
    entry = manifest.get("prefill_graph")
    # Only the packed graph (several prompts a call); a folder prepared before it was built
    # holds a GroupQueryAttention one, one prompt a call: prepare it again.
    packed = isinstance(entry, dict) and entry.get("attention") == "packed"
    path = model_dir / str(entry["file"]) if isinstance(entry, dict) and packed else None
    if prefill in ("model", "native"):
        return None
    if path is None or not path.is_file():
        if prefill == "int8":
            raise ValueError(
                f"prefill_graph='int8': {model_dir} has no packed int8 prefill graph (an int4 "
                "decoder prepared by `irouter models prepare` has one); use 'model' or 'auto'"
            )
        return None
    if prefill == "auto" and int8_dot_flag() is None:
        return None
    return path


def unused_files(
    manifest: dict[str, Any], model_dir: Path, prefill: str, decode_kernel: str = "auto"
) -> list[Path]:
    """Files of a decoder folder that an OnnxDecoder with `prefill` does not load: the prompt
    graph (and its weights) where the decoder's own graph or the native step computes prompts;
    the decoder's graph too where the native step computes both (it holds a copy instead)."""
    entry = manifest.get("prefill_graph")
    graphs = []
    if native_decode.native_every_step(model_dir, manifest, decode_kernel, prefill):
        prefill = "native"
        graphs.append(model_dir / "model.onnx")
    if isinstance(entry, dict) and not prefill_graph_file(manifest, model_dir, prefill):
        graphs.append(model_dir / str(entry["file"]))
    return [f for g in graphs for f in (g, g.with_name(g.name + ".data")) if f.is_file()]


def prompt_graph(manifest: dict[str, Any], model_dir: Path, prefill: str) -> Path | None:
    """prefill_graph_file, logged (the graph an OnnxDecoder loads for its prompts)."""
    path = prefill_graph_file(manifest, model_dir, prefill)
    flag = int8_dot_flag()
    if path is None:
        if prefill == "auto" and flag is None and manifest.get("prefill_graph"):
            logger.info(
                "%s: prompts computed with the decoder's own graph (no VNNI or AMX on this "
                "CPU; prefill_graph: int8 overrides)",
                manifest.get("name"),
            )
        return None
    logger.info(
        "%s: prompts computed with the int8 graph %s (%s; prefill_graph: model overrides)",
        manifest.get("name"),
        path.name,
        f"the CPU has {flag}" if flag else "asked for",
    )
    return path
