"""
irouter's CPU kernels for the backends: the int4 decoder step, KV block copies.
"""

from collections.abc import Sequence
from typing import Annotated

import numpy
from numpy.typing import NDArray


def q4_best_kernel() -> str:
    """
    The int4 decode kernel this CPU runs: 'amx-int8' (the VNNI tile, and AMX for rows in groups of 16), 'avx512-vnni', 'avx2', or '' (none).
    """

class Q4Decoder:
    """
    A llama decoder's decode step over MatMulNBits int4 weights (native/include/irouter/q4_decoder.h); each row's result independent of the others and of the thread count.
    """

    def __init__(self, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, vocab: int, eps: float, cos: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], sin: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], embedding: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], norms: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], codes: Sequence[Annotated[NDArray[numpy.uint8], dict(order='C', device='cpu', writable=False)]], scales: Sequence[Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)]], threads: int, kernel: str = '') -> None:
        """
        Copies every array. kernel: 'amx-int8', 'avx512-vnni', 'avx2' or '' for the CPU's best.
        """

    def step(self, slots: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], tokens: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], positions: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], keys: Sequence[Annotated[NDArray, dict(order='C', device='cpu')]], values: Sequence[Annotated[NDArray, dict(order='C', device='cpu')]], logits: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu')], outputs: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)] | None = None, prefix_slots: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)] | None = None, prefix_lengths: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)] | None = None) -> None:
        """
        Row r: tokens[r] at positions[r] of KV slot slots[r] (earlier positions computed there or by earlier rows: a prompt chunk is rows of one slot at consecutive positions); writes its keys and values (float32, or float16: rounded so), and logits[j] of row outputs[j] (every row's without outputs). Row r with prefix_slots[r] >= 0 (-1: none) reads positions 0..prefix_lengths[r]-1 from that slot instead of its own (computed there, or by its rows in this call), the same bits as if its own held them; a slot's rows name one prefix.
        """

    @property
    def kernel(self) -> str: ...

def kv_load_blocks(slot_buffers: Sequence[Annotated[NDArray, dict(order='C', device='cpu')]], pool_buffers: Sequence[Annotated[NDArray, dict(order='C', device='cpu')]], slot: int, blocks: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)]) -> None:
    """
    Copy pool blocks blocks[0..n) into positions 0..n * block_size of `slot` in every slot buffer (slot_buffers[i] from pool_buffers[i]; slot buffers (slots, heads, context, head_dim), pool buffers (blocks, heads, block_size, head_dim), one dtype).
    """

def kv_save_blocks(slot_buffers: Sequence[Annotated[NDArray, dict(order='C', device='cpu')]], pool_buffers: Sequence[Annotated[NDArray, dict(order='C', device='cpu')]], slot: int, start: int, blocks: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)]) -> None:
    """
    Copy positions start..start + n * block_size of `slot` into pool blocks blocks[0..n) (shapes as kv_load_blocks).
    """

def kv_copy_prefix(buffers: Sequence[Annotated[NDArray, dict(order='C', device='cpu')]], from_slot: int, to: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], n: int) -> None:
    """
    Copy positions 0..n of slot from_slot into the same positions of each slot in `to`, in every slot buffer (slots, heads, context, head_dim), all of one shape and dtype.
    """
