"""The native int4 decode step (backends.native_decode, native/src/q4_decoder.cpp) against the
graph it replaces, and its independence from the batch, the thread count and the kernel."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from tokenizers import Tokenizer

from backends import kv_pool, native_decode
from backends._kernels import Q4Decoder, q4_best_kernel
from backends.native_decode import NativeSteps
from backends.onnx_runtime import OnnxDecoder
from tests.avx2_host import needs_qemu, run_as_avx2_host

pytestmark = pytest.mark.skipif(not q4_best_kernel(), reason="the CPU has no AVX2")

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
    "import numpy as np\n",
]
SLOTS = 12


@pytest.fixture(scope="module")
def folder(prepared_models: dict[str, Path]) -> Path:
    return prepared_models["smollm2-135m-instruct"]


@pytest.fixture(scope="module")
def prompts(folder: Path) -> list[np.ndarray]:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [np.array(tokenizer.encode(p).ids, np.int64) for p in PROMPTS]


def _decoder(folder: Path, kernel: str, threads: int = 2) -> OnnxDecoder:
    return OnnxDecoder(
        folder,
        max_slots=SLOTS,
        max_context=128,
        threads=threads,
        prefill_graph="model",
        decode_kernel=kernel,
    )


@pytest.fixture(scope="module")
def native(folder: Path) -> OnnxDecoder:
    return _decoder(folder, "native")


@pytest.fixture(scope="module")
def graph(folder: Path) -> OnnxDecoder:
    return _decoder(folder, "onnxruntime")


def _fill(engine: OnnxDecoder, prompts: list[np.ndarray]) -> list[int]:
    """Every slot holds one of the prompts (slot s: prompt s % 4); their lengths."""
    for slot in range(engine.max_slots):
        engine.release(slot)
        engine.prefill(slot, prompts[slot % len(prompts)], 0)
    return [int(prompts[s % len(prompts)].size) for s in range(engine.max_slots)]


def test_auto_decodes_natively_and_onnxruntime_opts_out(native: OnnxDecoder, graph: OnnxDecoder):
    assert native.decode_kernel == "native"
    assert graph.decode_kernel == "onnxruntime"


@pytest.fixture(scope="module")
def mixed(folder: Path) -> OnnxDecoder:
    """The default: prompts in the native kernels too, float16 KV."""
    engine = OnnxDecoder(folder, max_slots=SLOTS, max_context=128, threads=2)
    assert engine.mixed_steps and engine._keys[0].dtype == np.float16
    return engine


@pytest.mark.parametrize("kind", ["native", "mixed"])
def test_steps_compute_what_the_graph_computes(
    request: pytest.FixtureRequest, kind: str, graph: OnnxDecoder, prompts: list[np.ndarray]
):
    """Both steps compute the same function; int8 activations round alike but not bit for bit
    (nor float16 keys and values, where the kernels compute prompts too). Fed the graph's
    greedy tokens (teacher forcing: a close call may flip a token, as between CPUs, and the
    answers then part), each of 8 steps' logits stay within a small fraction of their ~30
    range and nearly every next token agrees."""
    native: OnnxDecoder = request.getfixturevalue(kind)
    slots = np.arange(len(prompts))
    fed, logits = [], {}
    for name, engine in (("graph", graph), ("native", native)):
        lengths = np.array(_fill(engine, prompts)[: len(prompts)])
        tokens = np.array([p[-1] for p in prompts])
        for s in slots:  # each prompt's last token comes again, as a decode row
            engine.release(int(s))
            engine.prefill(int(s), prompts[s][:-1], 0)
        for i in range(8):
            out = engine.decode(slots, tokens, lengths - 1 + i)
            logits[name, i] = out
            if name == "graph":
                fed.append(tokens)
                tokens = out.argmax(axis=1)
            elif i + 1 < len(fed):
                tokens = fed[i + 1]
    gaps = [np.abs(logits["native", i] - logits["graph", i]).max() for i in range(8)]
    agree = np.mean(
        [(logits["native", i].argmax(1) == logits["graph", i].argmax(1)) for i in range(8)]
    )
    assert max(gaps) < 1.5, gaps
    assert agree >= 0.9, agree


def test_a_row_is_the_same_alone_and_in_any_batch(native: OnnxDecoder, prompts: list[np.ndarray]):
    """Bit for bit: logits and the keys and values written, for a slot decoded alone and among
    eleven rows (a tile call holds 6 rows, or 4 with AVX2 tiles: this one falls in the second
    call, or the third)."""
    lengths = _fill(native, prompts)
    alone = native.decode(np.array([9]), np.array([42]), np.array([lengths[9]]))
    key = native._keys[5][9, :, lengths[9]].copy()
    _fill(native, prompts)
    slots = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11])
    tokens = np.array([7, 8, 9, 10, 11, 12, 13, 14, 15, 42, 99])
    batch = native.decode(slots, tokens, np.array([lengths[s] for s in slots]))
    np.testing.assert_array_equal(batch[9], alone[0])
    np.testing.assert_array_equal(native._keys[5][9, :, lengths[9]], key)


def test_threads_and_kernels_do_not_change_a_result(folder: Path, prompts: list[np.ndarray]):
    """One thread or two, AVX2 or AVX-512 VNNI tiles (where the CPU has both): the same bits."""
    results = []
    vnni = q4_best_kernel() in ("avx512-vnni", "amx-int8")
    kernels = ["avx2"] + (["avx512-vnni"] if vnni else [])
    for kernel in kernels:
        for threads in (1, 2):
            engine = _decoder(folder, "native", threads)
            engine._native = NativeSteps(
                _rebuilt(folder, kernel, threads), engine._keys, engine._values, engine.vocab_size
            )
            lengths = _fill(engine, prompts)
            slots = np.array([3, 0, 2])
            results.append(
                engine.decode(slots, np.array([5, 6, 7]), np.array([lengths[s] for s in slots]))
            )
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_the_avx2_pin_computes_prompts_and_half_precision_kv_to_the_same_bits(
    folder: Path, prompts: list[np.ndarray]
):
    """With float16 KV (the default, prompts in the kernels), 'avx2' runs the AVX2 tile and the
    x86-64-v3 attention and KV stores even on an AVX-512 CPU: the same logits and KV as the
    CPU's best, so an AVX2-only host answers as an AVX-512 one does."""
    engines = [
        OnnxDecoder(folder, max_slots=4, max_context=128, prefill_graph="native", decode_kernel=k)
        for k in ("avx2", "auto")
    ]
    for engine in engines:
        assert engine.mixed_steps and engine._keys[0].dtype == np.float16
    for got, want in zip(*(_answers(engine, prompts) for engine in engines), strict=True):
        np.testing.assert_array_equal(got, want)


needs_amx = pytest.mark.skipif(
    q4_best_kernel() != "amx-int8", reason="the CPU has no AMX int8 tiles, or Linux grants none"
)


@needs_amx
def test_amx_tiles_compute_the_vnni_tiles_bits(folder: Path, prompts: list[np.ndarray]):
    """'amx-int8' multiplies rows in groups of 16 on AMX tiles and the rest on the VNNI tile:
    prompts of 1 to 61 rows (none, one and three groups, with and without a remainder) and a
    20-row decode step give the VNNI tile's logits and KV bit for bit, on one thread or two."""
    tokens = np.concatenate(prompts * 4)
    lengths = [1, 5, 15, 16, 17, 31, 32, 33, 48, 61] + [3 + 4 * i for i in range(10)]
    ragged = [tokens[i : i + n] for i, n in enumerate(lengths)]
    answers = []
    for kernel, threads in (("avx512-vnni", 2), ("amx-int8", 2), ("amx-int8", 1)):
        engine = OnnxDecoder(
            folder, max_slots=len(ragged), max_context=128, threads=threads, decode_kernel=kernel
        )
        assert engine.mixed_steps and engine._native.decoder.kernel == kernel
        answers.append(_answers(engine, ragged))
    for other in answers[1:]:
        for got, want in zip(other, answers[0], strict=True):
            np.testing.assert_array_equal(got, want)


def _answers(engine: OnnxDecoder, prompts: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Each prompt computed in its slot, one decode step of them all, and two layers' KV."""
    first = np.stack([engine.prefill(slot, ids, 0) for slot, ids in enumerate(prompts)])
    lengths = np.array([ids.size for ids in prompts])
    step = engine.decode(np.arange(len(prompts)), np.arange(5, 5 + len(prompts)), lengths)
    return first, step, engine._keys[7].copy(), engine._values[29].copy()


AVX2_HOST = """
import json, sys
import numpy as np
from backends._kernels import q4_best_kernel
from backends.onnx_runtime import OnnxDecoder
from tests.unit.backends.test_native_decode import _answers

folder, given, out = sys.argv[1:]
engine = OnnxDecoder(folder, max_slots=4, max_context=128)  # the defaults choose
np.savez(out, *_answers(engine, [ids for _, ids in sorted(np.load(given).items())]))
print(json.dumps({
    "best": q4_best_kernel(), "tile": engine._native.decoder.kernel,
    "decode": engine.decode_kernel, "prompts": engine.prefill_graph,
}))
"""


@needs_qemu
def test_an_avx2_only_cpu_decodes_natively_to_the_same_bits(
    folder: Path, prompts: list[np.ndarray], tmp_path: Path
) -> None:
    """On an AVX2-only host (emulated: tests/avx2_host.py) the defaults choose the AVX2 tile and
    native prompts by themselves and give the same bits as 'avx2' here: no AVX-512 instruction
    is reached where the CPU has none."""
    np.savez(tmp_path / "prompts.npz", **{f"p{i}": ids for i, ids in enumerate(prompts)})
    chosen = json.loads(
        run_as_avx2_host(AVX2_HOST, str(folder), str(tmp_path / "prompts.npz"), str(tmp_path / "a"))
    )
    assert chosen == {"best": "avx2", "tile": "avx2", "decode": "native", "prompts": "native"}
    here = OnnxDecoder(folder, max_slots=4, max_context=128, decode_kernel="avx2")
    there = np.load(tmp_path / "a.npz")
    for i, want in enumerate(_answers(here, prompts)):
        np.testing.assert_array_equal(there[f"arr_{i}"], want)


def _rebuilt(folder: Path, kernel: str, threads: int) -> Q4Decoder:
    """The same weights on another kernel: `decode_kernel` naming the tile."""
    from backends.artifact import read_manifest

    built = native_decode.load_native_decode(folder, read_manifest(folder), kernel, threads)
    assert built is not None and built.kernel == kernel
    return built


def test_decode_kernel_pins_a_tile_or_refuses_it_by_name(
    folder: Path, monkeypatch: pytest.MonkeyPatch
):
    """'avx2' runs wherever a tile does (an AVX2-only host's step, on any CPU); 'avx512-vnni'
    and 'amx-int8' only where the CPU has them; 'native' and 'auto' take the best."""
    from backends.artifact import read_manifest

    manifest = read_manifest(folder)
    engine = _decoder(folder, "avx2")
    assert engine.decode_kernel == "native" and engine._native.decoder.kernel == "avx2"
    assert native_decode.native_will_decode(folder, manifest, "avx2")
    assert _decoder(folder, "auto")._native.decoder.kernel == q4_best_kernel()
    beyond_avx2 = {"avx512-vnni": ["avx512-vnni"], "amx-int8": ["avx512-vnni", "amx-int8"]}
    for tile in beyond_avx2.get(q4_best_kernel(), []):
        assert _decoder(folder, tile)._native.decoder.kernel == tile
    monkeypatch.setattr(native_decode, "q4_best_kernel", lambda: "avx512-vnni")  # no AMX
    with pytest.raises(ValueError, match=r"'amx-int8' cannot run .*no AMX int8 tiles"):
        native_decode.load_native_decode(folder, manifest, "amx-int8", 1)
    monkeypatch.setattr(native_decode, "q4_best_kernel", lambda: "avx2")  # an AVX2-only CPU
    assert not native_decode.native_will_decode(folder, manifest, "avx512-vnni")
    assert not native_decode.native_will_decode(folder, manifest, "amx-int8")
    with pytest.raises(ValueError, match=r"'avx512-vnni' cannot run .*no AVX-512 VNNI"):
        native_decode.load_native_decode(folder, manifest, "avx512-vnni", 1)
    assert native_decode.native_will_decode(folder, manifest, "avx2")


def test_refusals_name_what_is_wrong(
    folder: Path, prepared_models: dict[str, Path], native: OnnxDecoder, prompts: list[np.ndarray]
):
    with pytest.raises(ValueError, match="decode_kernel='gpu' is unknown"):
        _decoder(folder, "gpu")
    with pytest.raises(ValueError, match=r"decode_kernel='native' cannot run .*not the int4"):
        _decoder(prepared_models["smollm2-135m-instruct-fp32"], "native")
    # An fp32 folder on 'auto' decodes through its graph.
    assert _decoder(prepared_models["smollm2-135m-instruct-fp32"], "auto").decode_kernel == (
        "onnxruntime"
    )
    # The binding checks what the engine's own validation would (a caller skipping it):
    # nothing is computed or written when a row is bad.
    lengths = _fill(native, prompts)
    assert native._native is not None
    step = native._native.decoder
    before = native._keys[0].copy()
    logits = np.zeros((SLOTS, 49152), np.float32)
    cases = [
        ([0, 0], [1, 2], [lengths[0], lengths[0]], "rows of slot 0 must be at consecutive"),
        ([0], [49152], [lengths[0]], "token 49152 is outside the vocabulary"),
        ([0], [1], [128], r"position 128 is outside 0\.\.127"),
        ([SLOTS], [1], [0], f"slot {SLOTS} is out of range"),
    ]
    for slots, tokens, positions, message in cases:
        with pytest.raises(ValueError, match=message):
            step.step(
                np.array(slots, np.int64),
                np.array(tokens, np.int64),
                np.array(positions, np.int64),
                native._keys,
                native._values,
                logits,
            )
    # Logits rows asked for: increasing rows of the call, each once.
    for outputs, message in (
        ([0, 0], "outputs must be increasing"),
        ([0, 1], "outputs\\[1\\] = 1"),
    ):
        with pytest.raises(ValueError, match=message):
            step.step(
                np.array([0], np.int64),
                np.array([1], np.int64),
                np.array([lengths[0]], np.int64),
                native._keys,
                native._values,
                logits,
                np.array(outputs, np.int64),
            )
    # A KV buffer of another dtype is refused, not converted into a copy that takes the writes.
    for keys, why in (
        ([k.astype(np.float64) for k in native._keys], "must be float32 or float16"),
        ([k.astype(np.float16) for k in native._keys], "must have keys\\[0\\]'s dtype"),
    ):
        with pytest.raises(ValueError, match=why):
            step.step(
                np.array([0], np.int64),
                np.array([1], np.int64),
                np.array([lengths[0]], np.int64),
                keys,
                native._values,
                logits,
            )
    np.testing.assert_array_equal(native._keys[0], before)
    assert not logits.any()


def test_a_token_is_the_same_bits_however_its_prompt_came(folder: Path, prompts: list[np.ndarray]):
    """prefill_graph: native: a prompt whole, in chunks (one of a single token), beside another
    slot's chunk, or token by token through decode computes the same keys, values and logits:
    the prefix cache and a reply's KV need no recomputation to be exact."""
    engine = OnnxDecoder(folder, max_slots=SLOTS, max_context=128, prefill_graph="native")
    assert engine.prefill_graph == "native" and engine.mixed_steps
    prompt = prompts[0]
    n = prompt.size

    def state(slot: int) -> tuple[np.ndarray, np.ndarray]:
        return engine._keys[7][slot, :, :n].copy(), engine._values[29][slot, :, :n].copy()

    whole = engine.prefill(0, prompt, 0)
    reference = state(0)
    ways = {}
    engine.prefill(1, prompt[:5], 0)
    engine.prefill(1, prompt[5:6], 5)
    ways["chunks"] = engine.prefill(1, prompt[6:], 6)
    engine.prefill(3, prompts[1], 0)
    engine.prefill(2, prompt[:9], 0)
    ways["beside another"] = engine.prefill_batch(
        [3, 2], [np.array([42, 43]), prompt[9:]], [prompts[1].size, 9]
    )[1]
    engine.prefill(4, prompt[:1], 0)
    for i in range(1, n):
        ways["decoded"] = engine.decode(np.array([4]), prompt[i : i + 1], np.array([i]))[0]
    for slot, (way, logits) in zip((1, 2, 4), ways.items(), strict=True):
        np.testing.assert_array_equal(logits, whole, err_msg=way)
        for got, want in zip(state(slot), reference, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=way)


def test_keys_and_values_are_half_precision_where_the_kernels_compute_every_step(folder: Path):
    """Float16 KV slots and prefix blocks where the native kernels compute prompts and decode
    steps (half the memory); float32 where a graph writes them."""
    mixed = OnnxDecoder(folder, max_slots=2, max_context=64)
    assert mixed.mixed_steps
    assert {a.dtype for a in mixed._keys + mixed._values} == {np.dtype(np.float16)}
    assert mixed.kv_bytes_per_token() == 2 * 30 * 3 * 64 * 2
    mixed.open_pool(4, 16)
    assert mixed._pool_keys[0].dtype == np.float16
    graph = OnnxDecoder(folder, max_slots=2, max_context=64, prefill_graph="model")
    assert not graph.mixed_steps
    assert {a.dtype for a in graph._keys + graph._values} == {np.dtype(np.float32)}
    assert graph.kv_bytes_per_token() == 2 * 30 * 3 * 64 * 4


def test_long_prompts_are_the_same_bits_in_runs_key_blocks_and_decode(
    folder: Path, prompts: list[np.ndarray]
):
    """Attention takes a prompt chunk in runs of up to 32 rows and keys and values in blocks of
    64 (q4_attention.cpp): a 150-token prompt whole, in chunks that cut runs and blocks anywhere,
    or its last 24 tokens decoded one by one, computes the same bits."""
    engine = OnnxDecoder(folder, max_slots=4, max_context=256, prefill_graph="native")
    assert engine.mixed_steps
    prompt = np.concatenate([prompts[0], *[prompts[2]] * 40])[:150]
    n = prompt.size

    def state(slot: int) -> list[np.ndarray]:
        return [engine._keys[i][slot, :, :n].copy() for i in (0, 29)] + [
            engine._values[i][slot, :, :n].copy() for i in (0, 29)
        ]

    whole = engine.prefill(0, prompt, 0)
    cuts = [0, 45, 46, 63, 65, 129, n]  # a lone token, either side of a key block's end
    for a, b in itertools.pairwise(cuts):
        chunked = engine.prefill(1, prompt[a:b], a)
    engine.prefill(2, prompt[: n - 24], 0)
    for i in range(n - 24, n):
        decoded = engine.decode(np.array([2]), prompt[i : i + 1], np.array([i]))[0]
    for slot, logits in ((1, chunked), (2, decoded)):
        np.testing.assert_array_equal(logits, whole, err_msg=f"slot {slot}")
        for got, want in zip(state(slot), state(0), strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"slot {slot}")


def _tiny_graph(folder: Path, heads: int, kv_heads: int, drop: str = "") -> dict[str, object]:
    """A one-layer int4 llama graph's weights (zeros) in `folder`, and its manifest."""
    hidden, head_dim, inter, vocab = 64, 64, 64, 32
    shapes = {
        "qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_up_proj": (2 * inter, hidden),
        "down_proj": (hidden, inter),
    }
    arrays: dict[str, np.ndarray] = {}
    for name, (n, k) in [
        *((f"l0.{p}", s) for p, s in shapes.items()),
        ("lm_head", (vocab, hidden)),
    ]:
        arrays[f"{name}.weight_Q4"] = np.zeros((n, k // 32, 16), np.uint8)
        arrays[f"{name}.weight_scales"] = np.ones((n, k // 32), np.float32)
    for name in ("l0.attn_norm", "l0.ffn_norm", "final_norm"):
        arrays[name] = np.ones(hidden, np.float32)
    arrays["embed_tokens"] = np.zeros((vocab, hidden), np.float32)
    arrays["cos_cache"] = np.ones((64, head_dim // 2), np.float32)
    arrays["sin_cache"] = np.zeros((64, head_dim // 2), np.float32)
    arrays.pop(drop, None)
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "final_norm"], ["y"], epsilon=1e-5),
        helper.make_node(
            "MatMulNBits",
            ["y", "lm_head.weight_Q4", "lm_head.weight_scales"],
            ["logits"],
            domain="com.microsoft",
            K=hidden,
            N=vocab,
            bits=4,
            block_size=32,
        ),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    onnx.save(
        helper.make_model(helper.make_graph(nodes, "g", [], [], inits)), folder / "model.onnx"
    )
    return {
        "name": "tiny",
        "quantization": "int4",
        "graph": "gqa-shared-kv",
        "num_layers": 1,
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
    }


@pytest.mark.parametrize(
    ("heads", "kv_heads", "drop", "why"),
    [
        (8, 1, "", "8 query heads over 1 KV heads"),  # as TinyLlama-1.1B's 32 over 4
        (4, 1, "l0.ffn_norm", "l0.ffn_norm"),  # a graph without a weight the step reads
    ],
)
def test_a_graph_the_kernels_cannot_compute_decodes_through_onnx_runtime(
    tmp_path: Path, heads: int, kv_heads: int, drop: str, why: str
):
    manifest = _tiny_graph(tmp_path, heads, kv_heads, drop)
    if not drop:  # known from the manifest: resources count no native copy
        assert not native_decode.native_decodes(manifest, "auto")
    # Resources count what the loader will do: no native copy, float32 keys and values.
    assert not native_decode.native_will_decode(tmp_path, manifest, "auto")
    assert native_decode.kv_value_bytes(tmp_path, manifest, "auto", "auto") == 4
    assert native_decode.load_native_decode(tmp_path, manifest, "auto", 1) is None
    with pytest.raises(ValueError, match=f"decode_kernel='native' cannot run .*{why}"):
        native_decode.load_native_decode(tmp_path, manifest, "native", 1)
    # The same shapes with a supported grouping load.
    if drop:
        manifest = _tiny_graph(tmp_path, heads, kv_heads)
        assert native_decode.native_will_decode(tmp_path, manifest, "auto")
        assert native_decode.kv_value_bytes(tmp_path, manifest, "auto", "auto") == 2
        assert native_decode.load_native_decode(tmp_path, manifest, "auto", 1) is not None


@pytest.fixture(scope="module")
def borrowing(folder: Path) -> OnnxDecoder:
    engine = OnnxDecoder(folder, max_slots=4, max_context=256, prefill_graph="native")
    assert engine.borrows_prefixes
    return engine


@pytest.mark.parametrize("shared", [4, 60, 64, 100, 150])
def test_a_chunk_reading_its_prefix_from_another_slot_computes_the_same_bits(
    borrowing: OnnxDecoder, prompts: list[np.ndarray], shared: int
):
    """A follower's chunk reads its first `shared` positions from the slot whose rows compute
    them in the same call (key blocks of 64: the boundary inside one, at one, past one), and
    gets the logits and keys and values of its own positions that computing its whole prompt
    in its own slot gives; once settled, its slot holds the prefix too, and decodes on alike."""
    engine = borrowing
    lead = np.concatenate([prompts[2]] * 40)[: shared + 10]
    # Its own rows: more than one attention run of 32.
    mine = np.concatenate([lead[:shared], prompts[0], prompts[1], prompts[3], prompts[0]])
    n = mine.size
    assert n - shared > 32

    def kv(slot: int, a: int, b: int) -> list[np.ndarray]:
        return [buf[slot, :, a:b].copy() for buf in (*engine._keys, *engine._values)]

    for slot in range(4):
        engine.release(slot)
    alone = engine.prefill(1, mine, 0)
    for buf in (*engine._keys, *engine._values):
        buf[2] = np.nan  # whatever the follower's slot held, it is not read
    logits = engine.prefill_batch([0, 2], [lead, mine[shared:]], [0, shared], [None, (0, shared)])
    np.testing.assert_array_equal(logits[1], alone)
    for got, want in zip(kv(2, shared, n), kv(1, shared, n), strict=True):
        np.testing.assert_array_equal(got, want)
    # Not settled by hand: the decode copies the prefix into slot 2 before it writes there.
    token, at = prompts[3][:1], np.array([n])
    np.testing.assert_array_equal(
        engine.decode(np.array([2]), token, at), engine.decode(np.array([1]), token, at)
    )
    for got, want in zip(kv(2, 0, n + 1), kv(1, 0, n + 1), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_prefix_read_elsewhere_is_settled_before_its_lender_is_reused(
    borrowing: OnnxDecoder, prompts: list[np.ndarray]
):
    """The lender's slot released and written again by another prompt from position 0: the
    follower still gets the prefix as it was (copied before that write)."""
    engine = borrowing
    for slot in range(4):
        engine.release(slot)
    lead = np.concatenate([prompts[0], prompts[2]])
    mine = np.concatenate([lead[:12], prompts[1]])
    engine.prefill(1, mine, 0)
    engine.prefill_batch([0, 2], [lead, mine[12:]], [0, 12], [None, (0, 12)])
    engine.release(0)
    engine.prefill(0, prompts[3], 0)  # slot 0 reused: its first positions overwritten
    for buf in (*engine._keys, *engine._values):
        np.testing.assert_array_equal(buf[2, :, : mine.size], buf[1, :, : mine.size])


def test_a_borrowed_prefix_is_settled_before_the_pool_saves_or_loads_there(
    borrowing: OnnxDecoder, prompts: list[np.ndarray]
):
    engine = borrowing
    engine.open_pool(8, 4)
    for slot in range(4):
        engine.release(slot)
    lead = np.concatenate([prompts[0], prompts[2]])
    mine = np.concatenate([lead[:12], prompts[1]])
    engine.prefill(1, mine, 0)
    for buf in (*engine._keys, *engine._values):
        buf[2] = np.nan
    engine.prefill_batch([0, 2], [lead, mine[12:]], [0, 12], [None, (0, 12)])
    engine.save_blocks([0, 1], 2, 4)  # positions 4..12 of slot 2: copied there first
    engine.load_blocks(3, [0, 1])
    for buf in (*engine._keys, *engine._values):
        np.testing.assert_array_equal(buf[3, :, :8], buf[1, :, 4:12])


def test_a_prefix_that_could_not_be_copied_fails_its_slot_alone(
    borrowing: OnnxDecoder, prompts: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
):
    engine = borrowing
    for slot in range(4):
        engine.release(slot)
    lead, mine = np.concatenate([prompts[0], prompts[2]]), np.concatenate([prompts[0], prompts[1]])
    engine.prefill_batch([0, 2], [lead, mine[8:]], [0, 8], [None, (0, 8)])

    def broken(*args: object) -> None:
        raise RuntimeError("no memory")

    monkeypatch.setattr(kv_pool, "kv_copy_prefix", broken)
    with pytest.raises(RuntimeError, match="no memory"):
        engine.settle()
    monkeypatch.undo()
    token = prompts[3][:1]
    with pytest.raises(ValueError, match="slot 2 lost the prefix it read from another slot"):
        engine.decode(np.array([2]), token, np.array([mine.size]))
    engine.decode(np.array([0]), token, np.array([lead.size]))  # the others go on
    engine.prefill(2, mine, 0)  # written again from 0: usable again
    engine.decode(np.array([2]), token, np.array([mine.size]))


def test_prefixes_are_refused_by_name(
    borrowing: OnnxDecoder, graph: OnnxDecoder, prompts: list[np.ndarray]
):
    engine = borrowing
    for slot in range(4):
        engine.release(slot)
    lead, mine = prompts[2], prompts[0]
    cases = [
        ([0, 2], [lead, mine], [0, 3], [None, (0, 4)], "up to where its chunk starts"),
        ([0, 2], [lead, mine], [0, 2], [None, (2, 2)], "another slot's first positions"),
        ([0, 2], [lead, mine], [0, 3], [None, (1, 3)], "which holds 0 after this call"),
        (
            [3, 0, 2],
            [lead, mine, mine],
            [0, 3, 3],
            [None, (3, 3), (0, 3)],
            "cannot lend one in the same call",
        ),
        ([0, 2], [lead, mine], [0, 3], [None], "1 entries for 2 rows"),
    ]
    for slots, chunks, starts, prefixes, why in cases:
        with pytest.raises(ValueError, match=why):
            engine.prefill_batch(slots, chunks, starts, prefixes)
    assert not graph.borrows_prefixes
    with pytest.raises(ValueError, match="only where the native kernels compute every step"):
        graph.prefill_batch([0, 2], [lead, mine], [0, 3], [None, (0, 3)])
    # The step itself checks what it is given, too.
    steps = engine._native
    assert steps is not None
    rows = np.array([0, 2, 2], np.int64)
    tokens, positions = np.array([5, 6, 7], np.int64), np.array([0, 3, 4], np.int64)
    logits = np.empty((3, engine.vocab_size), np.float32)

    def step(lenders: list[int] | None, lengths: list[int] | None) -> None:
        steps.decoder.step(
            rows,
            tokens,
            positions,
            steps._keys,
            steps._values,
            logits,
            None,
            None if lenders is None else np.array(lenders, np.int64),
            None if lengths is None else np.array(lengths, np.int64),
        )

    for lenders, lengths, why in [
        ([-1, 0, 0], None, "come together"),
        ([-1, 0, 0], [0, 4, 4], "prefix length 4 must be in 1..3"),
        ([-1, 0, 0], [0, 3, 2], "must name the same prefix"),
        ([-1, 2, 2], [0, 3, 3], "must be another slot in range"),
        ([-1, -3, -3], [0, 3, 3], "must be -1"),
    ]:
        with pytest.raises(ValueError, match=why):
            step(lenders, lengths)
    rows, tokens, positions = rows[1:], tokens[1:], np.array([3, 3], np.int64)
    rows[0] = 0  # slot 0 reads slot 1's first 3 positions, slot 2 reads slot 0's
    with pytest.raises(ValueError, match="slot 0 reads its own prefix elsewhere: it cannot lend"):
        step([1, 0], [3, 3])
