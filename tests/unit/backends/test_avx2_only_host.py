"""The default decode steps on an AVX2-only host (emulated: tests/avx2_host.py): the native
kernels choose their AVX2 code by themselves, compute prompts and decode steps there, and give
the same bits as `decode_kernel: avx2` on this machine (which the other tests hold to the
machine's best code): no AVX-512 instruction is reached where the CPU has none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from backends._kernels import q4_best_kernel
from backends.onnx_runtime import OnnxDecoder
from tests.avx2_host import needs_qemu, run_as_avx2_host

pytestmark = [needs_qemu, pytest.mark.skipif(not q4_best_kernel(), reason="the CPU has no AVX2")]

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
    "import numpy as np\n",
    "Name three fruits.",
]
NEXT = np.arange(5, 5 + len(PROMPTS))
"""The tokens each prompt's slot decodes next (the script below uses the same)."""

DECODE = """
import json, sys
import numpy as np
from backends._kernels import q4_best_kernel
from backends.onnx_runtime import OnnxDecoder

folder, given, out = sys.argv[1:]
prompts = [ids for _, ids in sorted(np.load(given).items())]
engine = OnnxDecoder(folder, max_slots=4, max_context=128)  # the defaults choose
first = np.stack([engine.prefill(slot, ids, 0) for slot, ids in enumerate(prompts)])
lengths = np.array([ids.size for ids in prompts])
step = engine.decode(np.arange(len(prompts)), np.arange(5, 5 + len(prompts)), lengths)
np.savez(out, first=first, step=step, keys=engine._keys[7], values=engine._values[29])
print(json.dumps({
    "best": q4_best_kernel(), "tile": engine._native.decoder.kernel,
    "decode": engine.decode_kernel, "prompts": engine.prefill_graph,
}))
"""


def test_an_avx2_only_cpu_decodes_natively_to_the_same_bits(
    prepared_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = prepared_models["smollm2-135m-instruct"]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = [np.array(tokenizer.encode(p).ids, np.int64) for p in PROMPTS]
    np.savez(tmp_path / "prompts.npz", **{f"p{i}": ids for i, ids in enumerate(prompts)})

    chosen = json.loads(
        run_as_avx2_host(DECODE, str(folder), str(tmp_path / "prompts.npz"), str(tmp_path / "out"))
    )
    assert chosen == {"best": "avx2", "tile": "avx2", "decode": "native", "prompts": "native"}

    here = OnnxDecoder(folder, max_slots=4, max_context=128, decode_kernel="avx2")
    first = np.stack([here.prefill(slot, ids, 0) for slot, ids in enumerate(prompts)])
    step = here.decode(np.arange(len(prompts)), NEXT, np.array([ids.size for ids in prompts]))
    there = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(there["first"], first)
    np.testing.assert_array_equal(there["step"], step)
    np.testing.assert_array_equal(there["keys"], here._keys[7])
    np.testing.assert_array_equal(there["values"], here._values[29])
