"""Loading a served model: the one mapping from its configuration to what serves it (an engine
the router batches, one that batches itself, an encoder batcher or a remote embedder), starting
and stopping it, and its warm-up call.

`load_artifact` and `load_engine` block (reading files, compiling graphs, connecting): callers run
them in a worker thread. `start`, `stop` and `warm_up` run on the event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from tokenizers import Tokenizer

from backends.artifact import read_manifest
from backends.base import DecoderStepEngine, EncoderEngine, RequestEngine, SamplingParams
from backends.factory import create_backend, create_remote_embedder, create_remote_generator
from router.models.prepare import smollm2_gguf_path
from router.scheduler.batcher import EncoderBatcher
from router.scheduler.engine import DecoderEngine
from router.scheduler.generation import EngineLimits
from router.scheduler.request import Priority
from router.scheduler.request_engine import RequestEngineAdapter
from router.serving import embedding, passthrough, prompt, tokenize
from router.serving.model import ServedModel
from router.telemetry import Metrics


def _gguf_source(manifest: dict[str, Any]) -> Path | None:
    """The GGUF a prepared decoder was built from, when it is installed (engines that convert
    the GGUF themselves, e.g. OpenVINO GenAI, read it on their first load)."""
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        return None
    return path if path.name == manifest.get("source") else None


def load_artifact(model: ServedModel) -> None:
    """The model's manifest and tokenizer, from its prepared folder (none for a model served
    with no artifact: its context is the remote server's)."""
    if model.config.passthrough:
        remote = model.config.remote
        model.context_length = min(
            model.config.max_context, remote.context_length if remote else model.config.max_context
        )
        return
    model.manifest = read_manifest(model.model_dir)
    model.tokenizer = Tokenizer.from_file(str(model.model_dir / "tokenizer.json"))
    model.max_token_bytes = tokenize.max_token_bytes(model.tokenizer)
    if model.config.kind == "generate":
        model.pieces = tokenize.PieceCache.create(model.tokenizer)
    if model.deployment is None:
        return
    if model.config.kind == "embed":
        # The deployment tokenizes and checks each text once; its replicas embed the pieces.
        model.tokenizer.no_padding()
        model.tokenizer.no_truncation()
        model.context_length = min(model.config.max_context, int(model.manifest["max_length"]))
        model.dimension = int(model.manifest["embedding_dim"])
    else:
        model.context_length = min(model.config.max_context, int(model.manifest["context_length"]))


def load_engine(model: ServedModel, metrics: Metrics) -> None:
    """Build what serves a model or a deployment's replica (after load_artifact), from its
    config: backend kind, device, limits and remote endpoint."""
    cfg = model.config
    if cfg.passthrough:
        _load_passthrough(model)
        return
    assert model.tokenizer is not None
    observer = metrics.model_observer(cfg.name)
    if cfg.kind == "generate":
        context = min(cfg.max_context, int(model.manifest["context_length"]))
        options: dict[str, Any] = {
            "max_slots": cfg.max_slots,
            "max_context": context,
            "threads": cfg.threads,
        }
        if cfg.backend == "onnxruntime":
            options |= {"prefill_graph": cfg.prefill_graph, "decode_kernel": cfg.decode_kernel}
        if cfg.backend == "tensorrt_llm":
            options |= {"device": cfg.device, "engine_path": cfg.engine_path}
        if cfg.backend == "openai_http":
            options |= {"remote": cfg.remote}
        if cfg.backend == "kserve_grpc":
            options |= {"kserve": cfg.kserve}
        if cfg.backend == "openvino":
            options |= {
                "device": cfg.device,
                "precision": cfg.precision,
                "token_budget": cfg.token_budget,
                "prefix_cache_mb": cfg.prefix_cache_mb,
                "gguf_path": _gguf_source(model.manifest),
                "observer": observer,
            }
        backend = create_backend(cfg.backend, model.model_dir, **options)
        model.context_length = context
        limits = EngineLimits(
            cfg.max_slots,
            cfg.token_budget,
            cfg.max_waiting,
            context,
            cfg.max_queue_wait_s,
            cfg.prefix_cache_mb * 2**20,
        )
        stop_ids = [int(i) for i in model.manifest["stop_token_ids"]]
        if isinstance(backend, RequestEngine):
            # The backend batches whole requests itself; the router streams its tokens.
            model.engine = RequestEngineAdapter(
                cfg.name, backend, model.tokenizer, limits, stop_ids
            )
        else:
            model.engine = DecoderEngine(
                cfg.name,
                cast(DecoderStepEngine, backend),
                model.tokenizer,
                limits,
                stop_ids,
                observer,
            )
    elif cfg.remote is not None:
        # A remote embedding server: the router's tokenizer still validates and counts.
        model.tokenizer.no_padding()
        model.tokenizer.no_truncation()
        model.context_length = int(model.manifest["max_length"])
        model.remote_embedder = create_remote_embedder(cfg.remote)
    else:
        model.tokenizer.no_padding()
        encoder_options: dict[str, Any] = {"threads": cfg.threads}
        if cfg.backend == "openvino":
            encoder_options |= {"device": cfg.device, "precision": cfg.precision}
        backend = create_backend(cfg.backend, model.model_dir, **encoder_options)
        model.context_length = int(model.manifest["max_length"])
        model.dimension = int(model.manifest["embedding_dim"])
        model.tokenizer.no_truncation()
        model.batcher = EncoderBatcher(
            cfg.name,
            cast(EncoderEngine, backend),
            max_batch=cfg.max_batch,
            max_delay_s=cfg.max_delay_ms / 1000.0,
            pad_id=int(model.manifest.get("pad_token_id", 0)),
            observer=observer,
        )


def _load_passthrough(model: ServedModel) -> None:
    """A model with no artifact: its remote server renders chats and counts tokens."""
    cfg = model.config
    assert cfg.remote is not None
    if cfg.kind == "embed":
        model.remote_embedder = create_remote_embedder(cfg.remote)
        return
    backend = create_remote_generator(
        cfg.remote, max_slots=cfg.max_slots, max_context=model.context_length
    )
    limits = EngineLimits(
        cfg.max_slots,
        cfg.token_budget,
        cfg.max_waiting,
        model.context_length,
        cfg.max_queue_wait_s,
    )
    model.engine = RequestEngineAdapter(cfg.name, backend, None, limits, ())


def start(model: ServedModel) -> None:
    """On the event loop, after loading: start the engine thread or batcher task."""
    if model.engine is not None:
        model.engine.start()
    if model.batcher is not None:
        model.batcher.start()
    if model.remote_embedder is not None:
        model.remote_embedder.start()
    model.ready = True


async def stop(model: ServedModel) -> None:
    """Stop what start() started; the model is no longer ready."""
    model.ready = False
    if model.engine is not None:
        model.engine.stop()
    if model.batcher is not None:
        await model.batcher.stop()
    if model.remote_embedder is not None:
        await model.remote_embedder.aclose()


async def warm_up(model: ServedModel, engine_id: int) -> None:
    """A first call through the real path, so the first client does not pay for it."""
    if model.engine is not None:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        if model.config.passthrough:
            request, _ = passthrough.build_request(
                model,
                "warm-up",
                engine_id=engine_id,
                prompt=None,
                messages=[{"role": "user", "content": "Hello"}],
                tools=None,
                params=params,
                max_tokens_set=True,
                priority=Priority.NORMAL,
            )
        else:
            request = await prompt.build_request(
                model,
                "warm-up",
                engine_id=engine_id,
                text="Hello",
                params=params,
                max_tokens_set=True,
                priority=Priority.NORMAL,
            )
        async for _ in model.engine.generate(request):
            pass
    if model.config.kind == "embed":
        # Also learns a remote embedding server's dimension.
        await embedding.embed_pieces(model, embedding.encode_texts(model, ["warm up"]))
