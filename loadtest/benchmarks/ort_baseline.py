"""Bare ONNX Runtime loops on the prepared models: the baselines server benchmarks divide by.

No engine, no router: one InferenceSession, IOBinding over preallocated NumPy buffers, greedy
argmax. `python -m loadtest.benchmarks.ort_baseline [cache_dir]` prints the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from router.models.chat_template import render_chat

logger = logging.getLogger(__name__)

CHAT = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "Tell me a story."},
]
"""Renders to a 22-token SmolLM2 prompt (the ~21-token prompt of FACTS.md)."""
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon."
"""20 tokens with [CLS]/[SEP]."""


@dataclass(frozen=True)
class DecodeRun:
    """One greedy generation (or `batch` identical ones decoded together)."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    """Per sequence, including the one the prefill produced."""
    ttft_s: float
    """Prefill of all rows (one at a time) until every first token is known."""
    total_s: float

    @property
    def tok_s(self) -> float:
        """Aggregate new tokens per second, prefill included."""
        return self.batch * self.new_tokens / self.total_s

    @property
    def decode_tok_s(self) -> float:
        """Aggregate tokens per second of the decode steps alone."""
        return self.batch * (self.new_tokens - 1) / (self.total_s - self.ttft_s)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _chat_prompt(model_dir: Path) -> np.ndarray:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return np.array(tok.encode(render_chat(manifest["chat_template"], CHAT)).ids, np.int64)


def run_bare_decode(
    model_dir: Path, *, new_tokens: int = 128, batch: int = 1, threads: int = 2
) -> DecodeRun:
    """Greedy generation of new_tokens for `batch` copies of the chat prompt."""
    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    sess = _session(model_dir / "model.onnx", threads)
    prompt = _chat_prompt(model_dir)
    capacity = len(prompt) + new_tokens
    layers, kvh, hd = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]
    kv = [np.zeros((batch, kvh, capacity, hd), np.float32) for _ in range(2 * layers)]

    def bind_kv(io: ort.IOBinding, lo: int, hi: int) -> list[ort.OrtValue]:
        keep = []
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(kv[2 * i + j][lo:hi])
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                io.bind_ortvalue_output(f"present.{i}.{kind}", value)
                keep.append(value)
        return keep

    start = time.perf_counter()
    tokens = np.zeros((batch, 1), np.int64)
    for row in range(batch):  # GQA prefill with S > 1 is only valid at batch 1
        io = sess.io_binding()
        keep = bind_kv(io, row, row + 1)
        io.bind_cpu_input("input_ids", prompt[None])
        io.bind_cpu_input("seqlens_k", np.array([len(prompt) - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(len(prompt), np.int32))
        io.bind_output("logits")
        sess.run_with_iobinding(io)
        tokens[row, 0] = int(np.argmax(io.copy_outputs_to_cpu()[-1][0]))
        del keep
    ttft = time.perf_counter() - start

    io = sess.io_binding()
    seqlens = np.full(batch, len(prompt), np.int32)
    total = np.array(len(prompt) + 1, np.int32)
    logits = np.zeros((batch, manifest["vocab_size"]), np.float32)
    keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in (tokens, seqlens, total, logits)]
    for name, value in zip(("input_ids", "seqlens_k", "total_sequence_length"), keep, strict=False):
        io.bind_ortvalue_input(name, value)
    io.bind_ortvalue_output("logits", keep[3])
    keep += bind_kv(io, 0, batch)
    for _ in range(new_tokens - 1):
        sess.run_with_iobinding(io)
        tokens[:, 0] = logits.argmax(-1)
        seqlens += 1
        total[()] += 1
    total_s = time.perf_counter() - start
    return DecodeRun(batch, len(prompt), new_tokens, ttft, total_s)


def bare_decode_tok_s(
    model_dir: Path, *, new_tokens: int = 128, batch: int = 1, threads: int = 2
) -> float:
    """Aggregate greedy tokens/s (prefill included) of a bare ORT loop on the prepared decoder."""
    return run_bare_decode(model_dir, new_tokens=new_tokens, batch=batch, threads=threads).tok_s


def bare_embed_texts_s(
    model_dir: Path, *, batch: int = 32, rounds: int = 10, threads: int = 2
) -> float:
    """Texts/s of the prepared encoder on batches of `batch` ~20-token sentences."""
    model_dir = Path(model_dir)
    sess = _session(model_dir / "model.onnx", threads)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch([f"{SENTENCE} ({i})" for i in range(batch)])
    feed = {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
    }
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    sess.run(["embeddings"], feed)  # warm-up: first run allocates
    start = time.perf_counter()
    for _ in range(rounds):
        sess.run(["embeddings"], feed)
    return batch * rounds / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "cache_dir",
        nargs="?",
        type=Path,
        default=Path("models-cache"),
        help="folder of prepared models (prepared here if missing)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from router.models.prepare import DECODER_NAME, ENCODER_NAME, prepare_models

    models = prepare_models(args.cache_dir)
    for batch in (1, 16):
        run_bare_decode(models[DECODER_NAME], new_tokens=8, batch=batch, threads=args.threads)
        r = run_bare_decode(models[DECODER_NAME], batch=batch, threads=args.threads)
        print(
            f"decode batch={batch:2d}: {r.tok_s:7.1f} tok/s "
            f"(decode steps {r.decode_tok_s:7.1f} tok/s), prompt {r.prompt_tokens} tokens, "
            f"prefill {r.ttft_s * 1e3:.0f} ms, {r.new_tokens} new tokens"
        )
    texts = bare_embed_texts_s(models[ENCODER_NAME], threads=args.threads)
    print(f"embed batch=32: {texts:7.1f} texts/s")


if __name__ == "__main__":
    main()
