"""Decode attention as a Mosaic TPU kernel, over a contiguous or a paged cache.

Grid (B, K, splits, blocks per split), the last axis "arbitrary". A step holds
the Tq * G query rows of KV head k (all query heads of the group, all new
tokens), so each K/V block is read once per group. Online softmax in f32
scratch; each split writes its partial (acc, max, sum) and XLA combines the
splits (split-K keeps long caches parallel when B * K is small).

Blocks past ``lengths[b]`` (and before the window) are neither computed nor
copied: the cache index maps clamp into the needed range using the lengths
(and page table) delivered by scalar prefetch.

Contiguous cache [B, S, K, H] is viewed (no copy) as [B, S, K * H] so a block
[block_kv, H] of head k is a lane-aligned slice: H must be a multiple of 128
when K > 1. Paged cache [K, P, page_size, H] streams one page per step, the
page chosen by the scalar-prefetched page table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.kernels._dispatch import InterpretConfig, tpu_interpret_params
from pallax.kernels.attention.masks import MaskSpec, allowed, online_softmax_step
from pallax.kernels.decode_attention import _sharded

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Options:
    scale: float
    soft_cap: float | None
    window: tuple[int, int] | None
    block_kv: int
    num_splits: int
    interpret: InterpretConfig | None


@dataclasses.dataclass(frozen=True)
class _Static:
    tq: int
    g: int
    h: int
    bk: int
    s: int
    per_split: int
    options: Options


def _needed(st: _Static, length):
    """First and last cache blocks that the new tokens of a sequence attend to."""
    last = jnp.maximum(jax.lax.div(length + st.bk - 1, st.bk) - 1, 0)
    first = jnp.int32(0)
    if st.options.window is not None:
        left = st.options.window[0]
        first = jax.lax.div(jnp.maximum(length - st.tq - left, 0), st.bk)
    return jnp.minimum(first, last), last


def _kernel(
    lengths_ref,
    pages_ref,
    q_ref,
    k_ref,
    v_ref,
    acc_ref,
    m_ref,
    l_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    st: _Static,
):
    del pages_ref  # used by the index maps only
    b, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = lengths_ref[b]
    block = split * st.per_split + j
    first, last = _needed(st, length)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((block >= first) & (block <= last) & (length > 0))
    def _compute():
        rows = st.tq * st.g
        k_pos = block * st.bk + jax.lax.broadcasted_iota(jnp.int32, (rows, st.bk), 1)
        token = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (rows, st.bk), 0), st.g)
        q_pos = length - st.tq + token
        ok = allowed(MaskSpec(causal=True, window=st.options.window), q_pos, k_pos, kv_len=length)
        k, v = k_ref[...], v_ref[...]  # [bk, H]
        row_ok = block * st.bk + jax.lax.broadcasted_iota(jnp.int32, (st.bk, 1), 0) < st.s
        k, v = jnp.where(row_ok, k, 0), jnp.where(row_ok, v, 0)  # past S: unspecified
        s = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32)
        s = s * st.options.scale
        if st.options.soft_cap is not None:
            s = st.options.soft_cap * jnp.tanh(s / st.options.soft_cap)
        online_softmax_step(m_sc, l_sc, acc_sc, jnp.where(ok, s, -jnp.inf), v)

    @pl.when(j == st.per_split - 1)
    def _finish():
        acc_ref[...] = acc_sc[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]


def combine_splits(acc, row_max, row_sum):
    """Merge split partials: acc [B, K, n, R, H], max/sum [B, K, n, R, 1] -> [B, K, R, H]."""
    m_all = jnp.max(row_max, axis=2, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    w = jnp.where(jnp.isfinite(row_max), jnp.exp(row_max - m_safe), 0.0)
    total = jnp.sum(w * row_sum, axis=2)
    out = jnp.sum(w * acc, axis=2)
    return jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)


def _call(q, lengths, pages, k_arr, v_arr, kv_spec_fn, st: _Static, num_blocks: int):
    b, tq, n, h = q.shape
    kh = n // st.g
    rows = tq * st.g
    # [B, Tq, N, H] -> [B, K, Tq*G, H]: rows of a group, token-major (q is tiny).
    q_rows = q.reshape(b, tq, kh, st.g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    splits = st.options.num_splits

    def block_index(bi, split, j, lengths_ref):
        first, last = _needed(st, lengths_ref[bi])
        return jnp.minimum(jnp.maximum(split * st.per_split + j, first), last)

    kv_spec = kv_spec_fn(block_index)
    q_spec = pl.BlockSpec((None, None, rows, h), lambda bi, k, sp, j, *_: (bi, k, 0, 0))
    part = lambda last: pl.BlockSpec(
        (None, None, None, rows, last), lambda bi, k, sp, j, *_: (bi, k, sp, 0, 0)
    )
    interpret = tpu_interpret_params(st.options.interpret)
    acc, row_max, row_sum = pl.pallas_call(
        functools.partial(_kernel, st=st),
        out_shape=(
            jax.ShapeDtypeStruct((b, kh, splits, rows, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, rows, 1), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, rows, 1), jnp.float32),
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, splits, st.per_split),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=(part(h), part(1), part(1)),
            scratch_shapes=[
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, h), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=4 * b * n * tq * num_blocks * st.bk * h,
            transcendentals=b * n * tq * st.s,
            bytes_accessed=k_arr.nbytes + v_arr.nbytes + 2 * q.nbytes,
        ),
        interpret=interpret,
        name="pallax_decode_attention",
    )(lengths, pages, q_rows, k_arr, v_arr)
    out = combine_splits(acc, row_max, row_sum)  # [B, K, Tq*G, H]
    out = out.reshape(b, kh, tq, st.g, h).transpose(0, 2, 1, 3, 4).reshape(b, tq, n, h)
    return out.astype(q.dtype)


def decode_attention(q, key_cache, value_cache, lengths, options: Options):
    """Per shard of the batch and heads (``_sharded``); see :func:`_decode_local`."""
    return _sharded.decode(_decode_local, q, key_cache, value_cache, lengths, options, gpu=False)


def paged_decode_attention(q, key_pages, value_pages, lengths, page_indices, options: Options):
    """Per shard of the batch, heads and page pool (``_sharded``)."""
    args = (q, key_pages, value_pages, lengths, page_indices)
    return _sharded.paged(_paged_local, *args, options, gpu=False)


def _decode_local(q, key_cache, value_cache, lengths, options: Options):
    """q [B, Tq, N, H]; caches [B, S, K, H]; lengths [B] int32 (clamped to S)."""
    b, tq, n, h = q.shape
    s, kh = key_cache.shape[1], key_cache.shape[2]
    num_blocks = -(-s // options.block_kv)
    per_split = -(-num_blocks // options.num_splits)
    st = _Static(tq, n // kh, h, options.block_kv, s, per_split, options)
    k_flat = key_cache.reshape(b, s, kh * h)  # a view: [B, S, K*H]
    v_flat = value_cache.reshape(b, s, kh * h)

    def kv_spec(block_index):
        return pl.BlockSpec(
            (None, options.block_kv, h),
            lambda bi, k, sp, j, lengths_ref, pages_ref: (
                bi,
                block_index(bi, sp, j, lengths_ref),
                k,
            ),
        )

    pages = jnp.zeros((1,), jnp.int32)
    return _call(q, lengths, pages, k_flat, v_flat, kv_spec, st, num_blocks)


def _paged_local(q, key_pages, value_pages, lengths, page_indices, options: Options):
    """q [B, Tq, N, H]; pages [K, P, page, H]; page_indices [B, pages_per_seq]."""
    _, tq, n, h = q.shape
    kh, _, page, _ = key_pages.shape
    per_seq = page_indices.shape[1]
    options = dataclasses.replace(options, block_kv=page)
    per_split = -(-per_seq // options.num_splits)
    st = _Static(tq, n // kh, h, page, per_seq * page, per_split, options)

    def kv_spec(block_index):
        def index(bi, k, sp, j, lengths_ref, pages_ref):
            slot = jnp.minimum(block_index(bi, sp, j, lengths_ref), per_seq - 1)
            return k, pages_ref[bi * per_seq + slot], 0, 0

        return pl.BlockSpec((None, None, page, h), index)

    return _call(
        q,
        lengths,
        page_indices.reshape(-1).astype(jnp.int32),
        key_pages,
        value_pages,
        kv_spec,
        st,
        per_seq,
    )
