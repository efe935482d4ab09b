"""What the three Mosaic TPU attention kernels share: layout, index maps, the tile.

Layout inside the kernels: q, dq, o, do as [B, K, G, T, H] (the G query heads
that share KV head k are adjacent), k, v, dk, dv as [B, K, S, H]. One grid step
holds the whole group, so a K/V block is fetched once for all G heads and the
logits tile is [G * block_q, block_kv].

Fully masked blocks cost neither compute nor DMA: compute is guarded by
``pl.when``, and the index maps clamp the streamed block index into the range a
row (or column) of blocks can attend to, so a skipped step asks for the block
already in VMEM and Pallas issues no copy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallax.kernels.attention.masks import MaskSpec, allowed

NT = (((1,), (1,)), ((), ()))  # [m, k] x [n, k] -> [m, n]
TN = (((0,), (0,)), ((), ()))  # [k, m] x [k, n] -> [m, n]
NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n] -> [m, n]


@dataclasses.dataclass(frozen=True)
class Static:
    """Shapes and options the kernels are specialised on."""

    t: int
    s: int
    g: int
    h: int
    bq: int
    bk: int
    scale: float
    spec: MaskSpec
    soft_cap: float | None
    has_bias: bool
    has_mask: bool
    has_segments: bool

    @property
    def nq(self) -> int:
        return -(-self.t // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.s // self.bk)

    def kv_range(self, i):
        """First and last key blocks that query block i can attend to (traced ints).

        Operands are non-negative, so truncating ``lax.div`` is floor division (and,
        unlike ``//``, lowers to plain integer division in Mosaic)."""
        div = jax.lax.div
        first, last = jnp.int32(0), jnp.int32(self.nk - 1)
        q_start, q_end = i * self.bq, (i + 1) * self.bq - 1
        if self.spec.causal:
            last = jnp.minimum(last, div(q_end, self.bk))
        if self.spec.window is not None:
            left, right = self.spec.window
            first = jnp.maximum(first, div(jnp.maximum(q_start - left, 0), self.bk))
            last = jnp.minimum(last, div(q_end + right, self.bk))
        return first, last

    def q_range(self, j):
        """First and last query blocks that can attend to key block j."""
        div = jax.lax.div
        first, last = jnp.int32(0), jnp.int32(self.nq - 1)
        k_start, k_end = j * self.bk, (j + 1) * self.bk - 1
        if self.spec.causal:
            first = jnp.maximum(first, div(k_start, self.bq))
        if self.spec.window is not None:
            left, right = self.spec.window
            first = jnp.maximum(first, div(jnp.maximum(k_start - right, 0), self.bq))
            last = jnp.minimum(last, div(k_end + left, self.bq))
        return first, last


def clamp(index, lo, hi):
    """index clipped into [lo, hi]; for an empty range (lo > hi) the always-valid hi."""
    return jnp.minimum(jnp.maximum(index, jnp.minimum(lo, hi)), hi)


def tile(st: Static, refs: dict, b, i, j):
    """Logits [G*bq, bk] (f32, scaled, biased, capped), the bool mask of tile (i, j),
    and q [G*bq, H] with rows past T zeroed.

    refs: q [G, bq, H]; k [bk, H]; lengths (SMEM [B, 2]); optional bias and mask
    tiles [G|1, bq|1, bk|1]; q_seg [bq, 1], kv_seg [1, bk].
    """
    rows = st.g * st.bq
    q = refs["q"][...].reshape(rows, st.h)
    k = refs["k"][...]
    if st.s % st.bk:  # rows past S hold unspecified data; keep them out of the matmul
        k_row = j * st.bk + jax.lax.broadcasted_iota(jnp.int32, (st.bk, 1), 0)
        k = jnp.where(k_row < st.s, k, 0)
    if st.t % st.bq:
        q_row = i * st.bq + jax.lax.broadcasted_iota(jnp.int32, (st.g, st.bq, 1), 1)
        q = jnp.where(q_row.reshape(rows, 1) < st.t, q, 0)
    s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * st.scale
    if st.has_bias:
        bias = jnp.broadcast_to(refs["bias"][...].astype(jnp.float32), (st.g, st.bq, st.bk))
        s = s + bias.reshape(rows, st.bk)
    if st.soft_cap is not None:
        s = st.soft_cap * jnp.tanh(s / st.soft_cap)
    q_pos = i * st.bq + jax.lax.broadcasted_iota(jnp.int32, (st.bq, st.bk), 0)
    k_pos = j * st.bk + jax.lax.broadcasted_iota(jnp.int32, (st.bq, st.bk), 1)
    lengths = refs["lengths"]
    ok = allowed(
        st.spec,
        q_pos,
        k_pos,
        q_len=lengths[b, 0],
        kv_len=lengths[b, 1],
        q_seg=refs["q_seg"][...] if st.has_segments else None,
        kv_seg=refs["kv_seg"][...] if st.has_segments else None,
    )
    ok = jnp.broadcast_to(ok, (st.g, st.bq, st.bk))
    if st.has_mask:
        ok = ok & (jnp.broadcast_to(refs["mask"][...], (st.g, st.bq, st.bk)) != 0)
    return s, ok.reshape(rows, st.bk), q


def rows_of(st: Static, ref, i):
    """A [G, bq, X] tile as [G*bq, X], rows past T zeroed (their contents are unspecified)."""
    x = ref[...]
    x = x.reshape(st.g * st.bq, x.shape[-1])
    if st.t % st.bq == 0:
        return x
    row = i * st.bq + jax.lax.broadcasted_iota(jnp.int32, (st.g, st.bq, 1), 1)
    return jnp.where(row.reshape(st.g * st.bq, 1) < st.t, x, 0)


def masked_value(st: Static, v, j):
    """v [bk, H] with rows past S zeroed (p = 0 there, but 0 * NaN is NaN)."""
    if st.s % st.bk == 0:
        return v
    row = j * st.bk + jax.lax.broadcasted_iota(jnp.int32, (st.bk, 1), 0)
    return jnp.where(row < st.s, v, 0)
