"""Plain NumPy forward passes of the two models, written from the papers, used as test oracles.

Independent of the ONNX exporters: no shared graph code, only the same dequantized weights.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from router.models.gguf_weights import LlamaWeights

F32 = npt.NDArray[np.float32]


# ---------------------------------------------------------------- llama (SmolLM2)
def _rms_norm(x: F32, w: F32, eps: float) -> F32:
    var = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps) * w).astype(np.float32)


def _rope(x: F32, positions: npt.NDArray[np.int64], theta: float) -> F32:
    """x [heads, S, D]; Hugging Face rotate_half convention."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.outer(positions, inv)  # [S, D/2]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)
    half = d // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rot * sin).astype(np.float32)


def llama_logits(w: LlamaWeights, ids: list[int], *, last_only: bool = False) -> F32:
    """Logits [S, V] (or [1, V] with last_only) for a whole sequence, without a cache."""
    c = w.config
    s = len(ids)
    pos = np.arange(s, dtype=np.int64)
    x = w.embedding[np.asarray(ids)]
    group = c.num_heads // c.num_kv_heads
    causal = np.triu(np.full((s, s), -np.inf, dtype=np.float32), k=1)
    for layer in w.layers:
        h = _rms_norm(x, layer["attn_norm"], c.rms_eps)
        q = (h @ layer["q"].T).reshape(s, c.num_heads, c.head_dim).transpose(1, 0, 2)
        k = (h @ layer["k"].T).reshape(s, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
        v = (h @ layer["v"].T).reshape(s, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
        q = _rope(q, pos, c.rope_theta)
        k = np.repeat(_rope(k, pos, c.rope_theta), group, axis=0)
        v = np.repeat(v, group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(c.head_dim) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(s, c.hidden_size)
        x = x + attn @ layer["o"].T
        h = _rms_norm(x, layer["ffn_norm"], c.rms_eps)
        gate = h @ layer["gate"].T
        x = x + ((gate / (1.0 + np.exp(-gate))) * (h @ layer["up"].T)) @ layer["down"].T
    if last_only:
        x = x[-1:]
    x = _rms_norm(x, w.final_norm, c.rms_eps)
    return (x @ w.embedding.T).astype(np.float32)


def llama_greedy(w: LlamaWeights, ids: list[int], new_tokens: int) -> list[int]:
    seq = list(ids)
    out: list[int] = []
    for _ in range(new_tokens):
        nxt = int(np.argmax(llama_logits(w, seq, last_only=True)[-1]))
        out.append(nxt)
        seq.append(nxt)
    return out


# ---------------------------------------------------------------- BERT (all-MiniLM-L6-v2)
def _layer_norm(x: F32, g: F32, b: F32, eps: float) -> F32:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * g + b).astype(np.float32)


def _gelu(x: F32) -> F32:
    from math import erf, sqrt

    verf = np.vectorize(erf)
    return (0.5 * x * (1.0 + verf(x / sqrt(2.0)))).astype(np.float32)


def bert_embeddings(
    t: dict[str, F32],
    ids: npt.NDArray[np.int64],
    mask: npt.NDArray[np.int64],
    num_heads: int,
    eps: float = 1e-12,
) -> F32:
    """Mean-pooled, L2-normalised sentence embeddings [B, H]; t = safetensors tensors."""
    b, s = ids.shape
    x = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][np.arange(s)][None]
        + t["embeddings.token_type_embeddings.weight"][np.zeros_like(ids)]
    )
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    hid = x.shape[-1]
    d = hid // num_heads
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
    i = 0
    while f"encoder.layer.{i}.attention.self.query.weight" in t:
        p = f"encoder.layer.{i}."

        def lin(x: F32, name: str, p: str = p) -> F32:
            return x @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        def heads(y: F32) -> F32:
            return y.reshape(b, s, num_heads, d).transpose(0, 2, 1, 3)

        q = heads(lin(x, "attention.self.query"))
        k = heads(lin(x, "attention.self.key"))
        v = heads(lin(x, "attention.self.value"))
        sc = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        ctx = ((sc / sc.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, s, hid)
        x = _layer_norm(
            x + lin(ctx, "attention.output.dense"),
            t[p + "attention.output.LayerNorm.weight"],
            t[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        ff = lin(_gelu(lin(x, "intermediate.dense")), "output.dense")
        x = _layer_norm(
            x + ff, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps
        )
        i += 1
    m = mask[..., None].astype(np.float32)
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return (pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)).astype(np.float32)
