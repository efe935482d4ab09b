"""What the Mosaic GPU attention kernels share: the packed-row layout and its
operands, block ranges, swizzled SMEM tiles, and ``matmul`` (wgmma on hardware,
dot_general in the GPU interpreter)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels._mgpu import tma_table
from pallax.kernels.attention import xla
from pallax.kernels.attention.masks import MaskSpec

BLOCK_Q = 64  # rows per CTA: one warpgroup's WGMMA tile
WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
LSE_PAD = 1e30  # log-sum-exp of padded rows: exp(s - lse) = 0 in the backward


@dataclasses.dataclass(frozen=True)
class Static:
    g: int
    h: int
    s: int  # cache length after padding to >= block_kv
    bk: int
    spec: MaskSpec
    scale: float
    soft_cap: float | None
    segments: bool
    interpret: bool
    bias: bool = False
    mask: bool = False
    bias_batch: bool = True  # the packed bias/mask have a batch axis (else shared)


def kv_block_range(st: Static, row0, q_len, kv_len):
    """First and last K/V block (inclusive) that rows [row0, row0 + 64) attend to."""
    shift = st.g.bit_length() - 1
    pos_lo, pos_hi = row0 >> shift, (row0 + BLOCK_Q - 1) >> shift
    last_pos = kv_len - 1
    if st.spec.causal:
        last_pos = jnp.minimum(last_pos, pos_hi)
    first = jnp.int32(0)
    if st.spec.window is not None:
        left, right = st.spec.window
        last_pos = jnp.minimum(last_pos, pos_hi + right)
        first = jax.lax.div(jnp.maximum(pos_lo - left, 0), st.bk)
    last = jnp.where((last_pos < 0) | (pos_lo >= q_len), -1, jax.lax.div(last_pos, st.bk))
    return first, last


def matmul(interpret: bool, a, b, *, a_in_smem: bool, transpose_b=False, acc=None, shape=None):
    """``acc + a @ op(b)`` in f32: ``b`` an SMEM ref (``op`` = transpose when asked), ``a``
    an SMEM ref or a bf16/f16 register array in the WGMMA layout; ``shape`` of the
    product when there is no ``acc``. On hardware: wgmma. In the GPU interpreter
    (which has no wgmma): dot_general on the loaded tiles."""
    if interpret:
        a_val = plgpu.load(a, layout=WG) if a_in_smem else a
        b_val = plgpu.load(b, layout=WG)
        product = jax.lax.dot_general(
            a_val, b_val, _NT if transpose_b else _NN, preferred_element_type=jnp.float32
        )
        return product if acc is None else acc + product
    b_op = b.transpose((1, 0)) if transpose_b else b
    if acc is None:

        def fresh(acc_ref):
            plgpu.wgmma(acc_ref, a, b_op)
            return acc_ref[...]

        return pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b_op)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def iota(n: int, axis: int):
    """0..n-1 along the rows (axis 0) or columns (axis 1) of a WGMMA tile, as a vector in
    the row or column layout: a thread holds 2 or n / 4 of its values, where an iota
    over a [64, n] tile would take n / 2 registers."""
    return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=ROW if axis == 0 else COL)


def query_positions(g: int, row0, axis: int):
    """Positions of the 64 packed rows from row0 (a multiple of 64; row = t * G + g) as a
    row (axis 0) or column (axis 1) vector: row0 / G + iota / G, the per-thread part a
    pattern the compiler folds rather than registers it keeps across the loop."""
    shift = g.bit_length() - 1
    rows = jax.lax.shift_right_logical(iota(BLOCK_Q, axis), shift)
    return jax.lax.shift_right_logical(row0, shift) + rows


def along(x, shape, axis: int):
    """A row (axis 0) or column (axis 1) vector broadcast over a WGMMA tile of ``shape``."""
    return jax.lax.broadcast_in_dim(x, shape, (axis,))


def copy_in(copies, bars) -> None:
    """Copies [(GMEM ref, SMEM ref) or None, ...] in, on ``bars`` 0, 1, ..., and waits for
    them all (the operands a CTA loads once, before its pipeline starts)."""
    copies = [c for c in copies if c is not None]
    for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
    for i in range(len(copies)):
        plgpu.barrier_wait(bars.at[i])


def smem(shape, dtype):
    """A tiled, swizzled SMEM buffer: what TMA and wgmma want, and the only form of a
    [64, block_kv] bias/mask tile that layout inference solves for a WGMMA-layout load."""
    swizzle = min(128, shape[-1] * jnp.dtype(dtype).itemsize)  # bytes per 8-row tile row
    transforms = (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def logit_tiles(on: bool, shape, dtype):
    """Double-buffered bias (f32) or mask (int8) tiles, or a dummy when there are none."""
    return smem(shape, dtype) if on else plgpu.SMEM((8,), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Packed:
    """The kernels' operands: query heads of a group packed into rows, K/V padded."""

    q_rows: jax.Array  # [B, K, rows_p, H], row = t * G + g
    k: jax.Array  # [B, s_pad, K, H]
    v: jax.Array
    lens: jax.Array  # tma_table of (q_len, kv_len) per sequence
    q_seg: jax.Array  # [B, rows_p] (or a dummy)
    kv_seg: jax.Array  # [B, s_pad] (or a dummy)
    segments: bool
    bias: jax.Array | None = None  # [B|1, K, rows_p, s_pad]
    mask: jax.Array | None = None  # [B|1, K, rows_p, s_pad] int8, 1 = attend

    def tiles(self):
        """(bias, mask) operands: the packed arrays, or 1-element dummies."""
        dummy = jnp.zeros((1, 1, 1, 8), jnp.float32)
        return (
            dummy if self.bias is None else self.bias,
            dummy if self.mask is None else self.mask,
        )


def pack_rows(x, kh, rows_p):
    """[B, T, N, ...] -> [B, K, rows_p, ...] (zero rows appended)."""
    b, t, n = x.shape[:3]
    g = n // kh
    x = x.reshape(b, t, kh, g, *x.shape[3:])
    x = jnp.moveaxis(x, 2, 1).reshape(b, kh, t * g, *x.shape[4:])
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, rows_p - t * g)
    return jnp.pad(x, pad)


def unpack_rows(x, t, n):
    """[B, K, rows_p, ...] -> [B, T, N, ...]."""
    b, kh = x.shape[:2]
    x = x[:, :, : t * (n // kh)].reshape(b, kh, t, n // kh, *x.shape[3:])
    return jnp.moveaxis(x, 1, 2).reshape(b, t, n, *x.shape[4:])


def pack_logit_array(x, lead, n, t, s, kh, rows_p, s_pad, dtype):
    """bias / mask [B|1, N|1, T|1, S|1] -> [lead, K, rows_p, s_pad] (zero padded)."""
    x = jnp.broadcast_to(x, (lead, n, t, s)).astype(dtype)
    x = pack_rows(jnp.swapaxes(x, 1, 2), kh, rows_p)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, s_pad - s)))


def pack(q, k, v, aux, *, s_multiple: int, s_min: int, bias=None, mask=None) -> Packed:
    b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    # TMA into 8-row SMEM tiles needs S % 8 == 0 and one block must fit: pad (a copy
    # of K/V only for such S); the padded rows are masked by the lengths.
    s_pad = max(s_min, -(-s // s_multiple) * s_multiple)
    if s_pad != s:
        pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    rows_p = -(-t * g // BLOCK_Q) * BLOCK_Q
    q_len = jnp.full((b,), t, jnp.int32) if aux[0] is None else jnp.clip(aux[0], 0, t)
    kv_len = jnp.full((b,), s, jnp.int32) if aux[1] is None else jnp.clip(aux[1], 0, s)
    lens = tma_table(jnp.stack([q_len, kv_len], axis=1).reshape(1, 2 * b))
    segments = aux[2] is not None
    if segments:
        q_seg = jnp.pad(jnp.repeat(aux[2], g, axis=1), ((0, 0), (0, rows_p - t * g)))
        kv_seg = jnp.pad(aux[3], ((0, 0), (0, s_pad - s)))
    else:
        q_seg, kv_seg = jnp.zeros((1, BLOCK_Q), jnp.int32), jnp.zeros((1, s_pad), jnp.int32)
    lead = max(1 if x is None else x.shape[0] for x in (bias, mask))  # B, or 1 if shared
    logit = functools.partial(
        pack_logit_array, lead=lead, n=n, t=t, s=s, kh=kh, rows_p=rows_p, s_pad=s_pad
    )
    return Packed(
        pack_rows(q, kh, rows_p), k, v, lens, q_seg, kv_seg, segments,
        None if bias is None else logit(bias, dtype=jnp.float32),
        None if mask is None else logit(mask, dtype=jnp.int8),
    )  # fmt: skip


def interpret_params(options: xla.Options):
    interpret = options.interpret
    return (
        None if interpret is None else plgpu.InterpretGPUParams(detect_races=interpret.detect_races)
    )


@dataclasses.dataclass(frozen=True)
class BwdStatic:
    g: int
    h: int
    spec: object
    scale: float
    soft_cap: float | None
    segments: bool
    interpret: bool
    rows_p: int
    bias: bool = False
    mask: bool = False
    bias_batch: bool = True
    kv_blocks: int = 0
    dkv_parts: int = 1  # dkv CTAs per key block, each owning H / dkv_parts columns


def logits(st, raw, bias=None):
    s = raw * st.scale
    if bias is not None:
        s = s + bias
    if st.soft_cap is not None:
        s = st.soft_cap * jnp.tanh(s / st.soft_cap)
    return s


def logit_grad_weight(st, p, s):
    """w with dL/dz = w * (dP - delta) for the logits z = scale * q.k + bias (= dL/dbias;
    dL/d(q.k) is this times the scale): the probabilities p, times the soft cap's
    derivative at the capped logits s. Taken before dP is computed, so that s and p
    do not both stay live in registers beside it."""
    if st.soft_cap is None:
        return p
    return p * (1.0 - jnp.square(s / st.soft_cap))


def q_block_range(st, k0, q_len, kv_len):
    """First and last 64-row query block whose rows attend to keys [k0, k0 + 64)."""
    lowest = jnp.int32(0)  # the lowest query position that sees one of the keys
    if st.spec.causal:
        lowest = k0
    if st.spec.window is not None:
        left, right = st.spec.window
        lowest = jnp.maximum(lowest, k0 - right)
        highest = jnp.minimum(q_len - 1, k0 + BLOCK_Q - 1 + left)
    else:
        highest = q_len - 1
    first = jax.lax.div(jnp.maximum(lowest, 0) * st.g, BLOCK_Q)
    last = jax.lax.div((highest + 1) * st.g - 1, BLOCK_Q)
    last = jnp.where(
        (k0 >= kv_len) | (highest < 0), -1, jnp.minimum(last, st.rows_p // BLOCK_Q - 1)
    )
    return first, last
