"""Cheap, exact fingerprints of pytrees, for cross-replica SDC detection.

After the gradient all-reduce every data-parallel replica must hold
bit-identical gradients and parameters. A leaf's fingerprint is the wrapping
uint32 sum of its bit patterns (each element widened to 32 bits) together
with an index-weighted sum: a single flipped bit changes the first by +-2^k,
which is never 0 mod 2^32, so one flip is always detected; the second catches
swapped elements. Computing it is one pass over the data on the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _bits_u32(x: jax.Array) -> jax.Array:
    width = x.dtype.itemsize
    as_uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    if width == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, as_uint).astype(jnp.uint32).reshape(-1)


def leaf_fingerprint(x: jax.Array) -> jax.Array:
    """uint32[2]: (sum of bit patterns, index-weighted sum), both mod 2^32."""
    bits = _bits_u32(jnp.asarray(x))
    weights = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


def fingerprint(tree) -> jax.Array:
    """uint32[n_leaves, 2] for a pytree (jit-able)."""
    leaves = jax.tree.leaves(tree)
    return (
        jnp.stack([leaf_fingerprint(x) for x in leaves])
        if leaves
        else jnp.zeros((0, 2), jnp.uint32)
    )


def disagreeing_replicas(fingerprints) -> list[int]:
    """Replica indices whose fingerprint differs from the majority ([] when all agree).

    fingerprints: [replicas, n_leaves, 2]. With two replicas that disagree there is
    no majority: both are returned, and a replay (or a third device) must decide.
    """
    fps = np.asarray(fingerprints).reshape(len(fingerprints), -1)
    rows = [r.tobytes() for r in fps]
    counts = {row: rows.count(row) for row in set(rows)}
    best = max(counts.values())
    if best == len(rows):
        return []
    winners = [row for row, c in counts.items() if c == best]
    if len(winners) > 1:
        return list(range(len(rows)))
    return [i for i, row in enumerate(rows) if row != winners[0]]
