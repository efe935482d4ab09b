"""Small helpers shared by the Mosaic GPU kernels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

# Dynamic shared memory one CTA may use on sm_90 (227 KiB).
SMEM_BYTES = 227 * 1024


def tma_table_shape(width: int) -> tuple[int, int]:
    """The [W' / C, C] shape of one row of a ``tma_table`` of ``width`` entries."""
    cols = 256 if width > 256 else -(-width // 4) * 4
    return -(-width // cols), cols


def tma_table(x: jax.Array) -> jax.Array:
    """int32 [A, W] -> [A, W' / C, C] (zero-padded), so that one TMA copies a row into
    SMEM: at most 256 elements along each dimension, whole 16-byte units."""
    rows, cols = tma_table_shape(x.shape[1])
    x = jnp.pad(x.astype(jnp.int32), ((0, 0), (0, rows * cols - x.shape[1])))
    return x.reshape(x.shape[0], rows, cols)


def lookup(table_smem, i):
    """Element i of a row of ``tma_table`` in SMEM ([W' / C, C])."""
    cols = table_smem.shape[-1]
    return table_smem[jax.lax.div(i, cols), jax.lax.rem(i, cols)]


def smem_bytes(scratch, *, reduction_bytes: int = 0) -> int:
    """The dynamic SMEM a kernel asks for when its ``pl.run_scoped`` allocates ``scratch``
    (SMEM buffers and barriers), counted as Pallas and Mosaic GPU count it: every buffer
    and the reduction scratch (``reduction_bytes``, only if the body reduces) rounded up
    to 1 KiB, then 8 bytes per mbarrier."""
    kib = lambda n: -(-n // 1024) * 1024
    total, barriers = kib(reduction_bytes), 0
    for x in scratch:
        if isinstance(x, plgpu.Barrier):
            n = x.num_barriers
            barriers += math.prod(n) if isinstance(n, tuple | list) else n
        else:
            total += kib(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize)
    return total + 8 * barriers
