"""Small helpers shared by the Mosaic GPU kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tma_table(x: jax.Array) -> jax.Array:
    """int32 [A, W] -> [A, W' / C, C] (zero-padded), so that one TMA copies a row into
    SMEM: at most 256 elements along each dimension, whole 16-byte units."""
    width = x.shape[1]
    cols = 256 if width > 256 else -(-width // 4) * 4
    padded = -(-width // cols) * cols
    x = jnp.pad(x.astype(jnp.int32), ((0, 0), (0, padded - width)))
    return x.reshape(x.shape[0], padded // cols, cols)


def lookup(table_smem, i):
    """Element i of a row of ``tma_table`` in SMEM ([W' / C, C])."""
    cols = table_smem.shape[-1]
    return table_smem[jax.lax.div(i, cols), jax.lax.rem(i, cols)]
