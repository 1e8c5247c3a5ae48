"""The engines batching_bench compares the router with, run standalone in this process on
issue 12's workload (8 chat prompts with SmolLM2's default system prompt cycled to N, greedy,
exactly NEW tokens each, all N at once): the router's step engine with no scheduler and no gRPC
(OnnxDecoder, bare loops), and OpenVINO GenAI's ContinuousBatchingPipeline."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from router.models.chat_template import render_chat

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a binary search does, briefly.",
    "Name three fruits that are red.",
    "How many legs does a spider have?",
    "Give me a tip for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 3?",
]

if TYPE_CHECKING:
    from backends.onnx_runtime import OnnxDecoder

Run = tuple[float, list[float]]
"""Aggregate generated tokens/s, and each request's time to first token in seconds."""


def prompt_ids(model_dir: Path, n: int) -> list[list[int]]:
    manifest = load_manifest(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = [
        render_chat(manifest["chat_template"], [{"role": "user", "content": q}]) for q in QUESTIONS
    ]
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    return [ids[i % len(ids)] for i in range(n)]


def load_manifest(model_dir: Path) -> dict[str, object]:
    from backends.artifact import read_manifest

    return dict(read_manifest(model_dir))


def bare_onnx(
    model_dir: Path, prompts: list[list[int]], new: int, rounds: int, decode_kernel: str
) -> Run:
    from backends.onnx_runtime import OnnxDecoder

    decoder = OnnxDecoder(
        model_dir, max_slots=len(prompts), max_context=512, threads=2, decode_kernel=decode_kernel
    )
    decoder.prefill(0, np.array(prompts[0], np.int64), 0)  # warm up
    decoder.release(0)
    return median([_bare_round(decoder, prompts, new) for _ in range(rounds)])


def _bare_round(decoder: OnnxDecoder, prompts: list[list[int]], new: int) -> Run:
    n = len(prompts)
    for slot in range(n):
        decoder.release(slot)
    started = time.perf_counter()
    ttfts, tokens = [], []
    for slot, ids in enumerate(prompts):
        logits = decoder.prefill(slot, np.array(ids, np.int64), 0)
        tokens.append(int(np.argmax(logits)))
        ttfts.append(time.perf_counter() - started)
    slots = np.arange(n, dtype=np.int64)
    positions = np.array([len(p) for p in prompts], np.int64)
    last = np.array(tokens, np.int64)
    for _ in range(new - 1):
        logits = decoder.decode(slots, last, positions)
        last = np.argmax(logits, axis=1).astype(np.int64)
        positions += 1
    return n * new / (time.perf_counter() - started), ttfts


def median(runs: list[Run]) -> Run:
    return statistics.median(r[0] for r in runs), [t for r in runs for t in r[1]]


def openvino_cb(model_dir: Path, prompts: list[list[int]], new: int, rounds: int) -> Run:
    run = openvino_pipeline(model_dir, new)
    return median([run(prompts) for _ in range(rounds)])


def openvino_pipeline(model_dir: Path, new: int) -> Callable[[list[list[int]]], Run]:
    """OpenVINO GenAI's ContinuousBatchingPipeline on the model's GGUF, in process and warmed
    up: a function running a batch of prompts to `new` tokens each."""
    import openvino as ov
    import openvino_genai as ov_genai

    from backends.openvino.ir import load_pipeline
    from router.models.prepare import smollm2_gguf_path

    scheduler = ov_genai.SchedulerConfig()
    scheduler.max_num_seqs = 16
    scheduler.max_num_batched_tokens = 256
    scheduler.dynamic_split_fuse = True
    scheduler.cache_size = 1  # GB of KV
    scheduler.enable_prefix_caching = True
    # Converts the GGUF the first time, as the router's `backend: openvino` does: on a fresh
    # machine there is no IR yet, and skipping this engine would make the bare loop "the best".
    pipe = load_pipeline(
        model_dir,
        smollm2_gguf_path(),
        exact=False,
        scheduler=scheduler,
        device="CPU",
        properties={"INFERENCE_NUM_THREADS": 2},
    )
    eos = int(load_manifest(model_dir)["eos_token_id"])  # type: ignore[call-overload]
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = new
    config.set_eos_token_id(eos)
    config.stop_token_ids = {eos}
    config.ignore_eos = True

    def run(batch: list[list[int]]) -> Run:
        started = time.perf_counter()
        handles = [
            pipe.add_request(i, ov.Tensor(np.array([ids], np.int64)), config)
            for i, ids in enumerate(batch)
        ]
        first: dict[int, float] = {}
        generated = 0
        while pipe.has_non_finished_requests():
            pipe.step()
            for i, handle in enumerate(handles):
                while handle.can_read():
                    for output in handle.read().values():
                        generated += len(output.generated_ids)
                        if output.generated_ids and i not in first:
                            first[i] = time.perf_counter() - started
        return generated / (time.perf_counter() - started), list(first.values())

    run(prompt_ids(model_dir, 1))  # warm up (the first compiled model runs slowly at first)
    return run
