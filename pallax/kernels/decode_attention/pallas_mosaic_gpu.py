"""Decode attention as a Mosaic GPU (Hopper) kernel, over a contiguous or a paged cache.

Decode reads the KV cache once and does ~1 FLOP per byte per query row, far
below what needs tensor cores, so this kernel uses no wgmma: plain loads, FMAs
and reductions in the WGMMA register layout. That keeps it runnable in JAX's
GPU interpreter (tested on CPU), not only compilable.

Grid (B, K, splits): a CTA (one warpgroup) owns the R = Tq * G query rows of
KV head k (all query heads of the group, all new tokens), so each K/V block is
read from HBM once per group, and a range of the cache (split-K, so that B * K
small still fills the SMs). It walks its blocks of 64 cache rows, TMA-copied
GMEM -> SMEM into two slots (the next block loads while this one is used):

  per block, per query row r:  s = K_blk q_r                   [64]  (row sums)
                               online softmax over s (max, rescale, sum)
                               acc_r += p^T V_blk              [H]   (column sums)

acc_r lives in SMEM (registers hold one row's state at a time); the running
max and sum are scalars. Blocks past ``lengths[b]`` or before the window are
never copied. Each split writes (acc, max, sum) and XLA combines the splits
exactly as for the TPU kernel. A paged cache is read page by page through the
page table (one TMA per page, pages of 16..64 rows make up a 64-row block).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels._dispatch import InterpretConfig
from pallax.kernels._mgpu import lookup as _lookup
from pallax.kernels._mgpu import tma_table as _tma_table
from pallax.kernels.attention.masks import MaskSpec, allowed
from pallax.kernels.decode_attention import _sharded
from pallax.kernels.decode_attention.pallas_tpu import combine_splits

BLOCK = 64  # cache rows per step: one warpgroup's WGMMA-layout tile
MAX_ROWS = 16  # query rows (Tq * N / K) per CTA, each unrolled in the kernel
_STAT = 128  # width of the (max, sum) rows written per query row
_ROW = plgpu.Layout.WGMMA.reduce(1)  # [BLOCK] vector: one value per cache row
_COL = plgpu.Layout.WGMMA.reduce(0)  # [H] vector: one value per feature


@dataclasses.dataclass(frozen=True)
class Options:
    scale: float
    soft_cap: float | None
    window: tuple[int, int] | None
    num_splits: int
    interpret: InterpretConfig | None


def unsupported_reason(rows: int, head_dim: int, dtype, page_size: int | None = None):
    """Why this kernel cannot take these shapes (None if it can)."""
    if rows > MAX_ROWS:
        return f"Tq * N / K = {rows} query rows per KV head exceed {MAX_ROWS}"
    if head_dim % 64:
        return f"the head size H={head_dim} must be a multiple of 64"
    if jnp.dtype(dtype) not in map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} must be float32, bfloat16 or float16"
    if page_size is not None and (page_size % 16 or (BLOCK % page_size and page_size % BLOCK)):
        return f"page_size={page_size} must be 16, 32 or a multiple of {BLOCK}"
    return None


def default_num_splits(batch: int, kv_heads: int, num_blocks: int, sms: int = 132) -> int:
    """About two CTAs per SM of an H100 (132 SMs), never more splits than blocks."""
    return max(1, min(num_blocks, -(-2 * sms // (batch * kv_heads))))


@dataclasses.dataclass(frozen=True)
class _Static:
    tq: int
    g: int
    h: int
    s: int  # logical cache length (contiguous: S; paged: pages_per_sequence * page)
    num_blocks: int
    per_split: int
    page: int  # rows per TMA copy (contiguous: BLOCK)
    paged: bool
    options: Options


def _block_range(st: _Static, split, length):
    """First and last block (inclusive) that this split needs."""
    last = jnp.minimum(jax.lax.div(length + BLOCK - 1, BLOCK) - 1, (split + 1) * st.per_split - 1)
    first = split * st.per_split
    if st.options.window is not None:
        lowest = jnp.maximum(length - st.tq - st.options.window[0], 0)
        first = jnp.maximum(first, jax.lax.div(lowest, BLOCK))
    return first, last


def _kernel(st: _Static):
    rows, h, sub = st.tq * st.g, st.h, BLOCK // st.page
    spec = MaskSpec(causal=True, window=st.options.window)

    def body(lens_gmem, pages_gmem, q_gmem, k_gmem, v_gmem, acc_gmem, stat_gmem):
        b = jax.lax.axis_index("b")
        kh = jax.lax.axis_index("k")
        split = jax.lax.axis_index("split")

        def scoped(lens_smem, pages_smem, q_smem, k_smem, v_smem, acc_smem, stat_smem, bars):
            # bars: 0 lengths, 1 pages, 2 q, then per slot and sub-copy: K, then V.
            def k_bar(slot, i):
                return bars.at[3 + slot * sub + i]

            def v_bar(slot, i):
                return bars.at[3 + 2 * sub + slot * sub + i]

            plgpu.copy_gmem_to_smem(lens_gmem.at[0], lens_smem, bars.at[0])
            plgpu.copy_gmem_to_smem(pages_gmem.at[b if st.paged else 0], pages_smem, bars.at[1])
            plgpu.copy_gmem_to_smem(q_gmem.at[b, kh], q_smem, bars.at[2])
            for i in range(3):
                plgpu.barrier_wait(bars.at[i])
            length = _lookup(lens_smem, b)
            first, last = _block_range(st, split, length)

            def issue(j, slot):
                for i in range(sub):
                    if st.paged:
                        page = _lookup(pages_smem, j * sub + i)
                        k_src, v_src = k_gmem.at[kh, page], v_gmem.at[kh, page]
                    else:  # the last block is moved back to end at S (masked below)
                        start = jnp.minimum(j * BLOCK, st.s - BLOCK)
                        k_src = k_gmem.at[b, pl.ds(start, BLOCK), kh]
                        v_src = v_gmem.at[b, pl.ds(start, BLOCK), kh]
                    dst = pl.ds(i * st.page, st.page)
                    plgpu.copy_gmem_to_smem(k_src, k_smem.at[slot, dst], k_bar(slot, i))
                    plgpu.copy_gmem_to_smem(v_src, v_smem.at[slot, dst], v_bar(slot, i))

            zero_h = plgpu.layout_cast(jnp.zeros((h,), jnp.float32), _COL)
            for r in range(rows):
                acc_smem.at[r][...] = zero_h

            @pl.when(first <= last)
            def _prefetch():
                issue(first, 0)

            def step(j, carry):
                m, denom = list(carry[0]), list(carry[1])
                slot = jax.lax.rem(j - first, 2)

                @pl.when(j < last)
                def _next():  # the other slot was released by the barrier ending step j - 1
                    issue(j + 1, 1 - slot)

                for i in range(sub):
                    plgpu.barrier_wait(k_bar(slot, i))
                    plgpu.barrier_wait(v_bar(slot, i))
                k = plgpu.load(k_smem.at[slot], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                v = plgpu.load(v_smem.at[slot], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                offset = plgpu.broadcasted_iota(jnp.int32, (BLOCK,), 0, layout=_ROW)
                if st.paged:
                    k_pos = j * BLOCK + offset
                    fresh = k_pos >= 0
                else:
                    k_pos = jnp.minimum(j * BLOCK, st.s - BLOCK) + offset
                    fresh = k_pos >= j * BLOCK  # rows of a moved-back block seen before
                for r in range(rows):
                    q_pos = length - st.tq + r // st.g
                    ok = allowed(spec, q_pos, k_pos, kv_len=length) & fresh
                    q_r = plgpu.load(q_smem.at[r], layout=_COL).astype(jnp.float32)
                    s = jnp.sum(k * jax.lax.broadcast_in_dim(q_r, (BLOCK, h), (1,)), axis=1)
                    s = s * st.options.scale
                    if st.options.soft_cap is not None:
                        s = st.options.soft_cap * jnp.tanh(s / st.options.soft_cap)
                    s = jnp.where(ok, s, -jnp.inf)
                    m_new = jnp.maximum(m[r], jnp.max(s))
                    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    p = jnp.exp(s - m_safe)  # masked: exp(-inf) = 0
                    alpha = jnp.exp(m[r] - m_safe)
                    pv = jnp.sum(v * jax.lax.broadcast_in_dim(p, (BLOCK, h), (0,)), axis=0)
                    acc_r = plgpu.load(acc_smem.at[r], layout=_COL)
                    acc_smem.at[r][...] = alpha * acc_r + pv
                    m[r], denom[r] = m_new, alpha * denom[r] + jnp.sum(p)
                plgpu.commit_smem()  # all threads are done with this slot before it refills
                return tuple(m), tuple(denom)

            init = (
                tuple(jnp.float32(-jnp.inf) for _ in range(rows)),
                tuple(jnp.float32(0.0) for _ in range(rows)),
            )
            m, denom = jax.lax.fori_loop(first, last + 1, step, init)
            for r in range(rows):
                stat_smem.at[r, 0][...] = jnp.broadcast_to(m[r], (_STAT,))
                stat_smem.at[r, 1][...] = jnp.broadcast_to(denom[r], (_STAT,))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(acc_smem, acc_gmem.at[b, kh, split])
            plgpu.copy_smem_to_gmem(stat_smem, stat_gmem.at[b, kh, split])
            plgpu.wait_smem_to_gmem(0)

        return scoped

    return body


def _call(q, lengths, pages, k_arr, v_arr, st: _Static):
    b, tq, n, h = q.shape
    kh, rows, sub = n // st.g, tq * st.g, BLOCK // st.page
    splits = st.options.num_splits
    q_rows = q.reshape(b, tq, kh, st.g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    lens = _tma_table(lengths[None])
    body = _kernel(st)

    def kernel(lens_gmem, pages_gmem, q_gmem, k_gmem, v_gmem, acc_gmem, stat_gmem):
        pl.run_scoped(
            body(lens_gmem, pages_gmem, q_gmem, k_gmem, v_gmem, acc_gmem, stat_gmem),
            plgpu.SMEM(lens.shape[1:], jnp.int32),
            plgpu.SMEM(pages.shape[1:], jnp.int32),
            plgpu.SMEM((rows, h), q.dtype),
            plgpu.SMEM((2, BLOCK, h), k_arr.dtype),
            plgpu.SMEM((2, BLOCK, h), v_arr.dtype),
            plgpu.SMEM((rows, h), jnp.float32),
            plgpu.SMEM((rows, 2, _STAT), jnp.float32),
            plgpu.Barrier(num_barriers=3 + 4 * sub),
        )

    interpret = st.options.interpret
    acc, stats = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, kh, splits, rows, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, rows, 2, _STAT), jnp.float32),
        ),
        grid=(b, kh, splits),
        grid_names=("b", "k", "split"),
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=4 * 4 * max(h, BLOCK)),
        interpret=None
        if interpret is None
        else plgpu.InterpretGPUParams(detect_races=interpret.detect_races),
    )(lens, pages, q_rows, k_arr, v_arr)
    out = combine_splits(acc, stats[..., 0, :1], stats[..., 1, :1])  # [B, K, R, H]
    out = out.reshape(b, kh, tq, st.g, h).transpose(0, 2, 1, 3, 4).reshape(b, tq, n, h)
    return out.astype(q.dtype)


def decode_attention(q, key_cache, value_cache, lengths, options: Options):
    """Per shard of the batch and heads (``_sharded``); see :func:`_decode_local`."""
    return _sharded.decode(_decode_local, q, key_cache, value_cache, lengths, options, gpu=True)


def paged_decode_attention(q, key_pages, value_pages, lengths, page_indices, options: Options):
    """Per shard of the batch, heads and page pool (``_sharded``)."""
    args = (q, key_pages, value_pages, lengths, page_indices)
    return _sharded.paged(_paged_local, *args, options, gpu=True)


def _decode_local(q, key_cache, value_cache, lengths, options: Options):
    """q [B, Tq, N, H]; caches [B, S, K, H]; lengths [B] int32 (clamped to S)."""
    _b, tq, n, h = q.shape
    s, kh = key_cache.shape[1], key_cache.shape[2]
    if s < BLOCK:  # one block must fit; rows past S are masked by the lengths
        pad = ((0, 0), (0, BLOCK - s), (0, 0), (0, 0))
        key_cache, value_cache, s = jnp.pad(key_cache, pad), jnp.pad(value_cache, pad), BLOCK
    num_blocks = -(-s // BLOCK)
    splits = min(options.num_splits, num_blocks)
    st = _Static(
        tq, n // kh, h, s, num_blocks, -(-num_blocks // splits), BLOCK, False,
        dataclasses.replace(options, num_splits=splits),
    )  # fmt: skip
    pages = _tma_table(jnp.zeros((1, 4), jnp.int32))
    return _call(q, lengths, pages, key_cache, value_cache, st)


def _paged_local(q, key_pages, value_pages, lengths, page_indices, options: Options):
    """q [B, Tq, N, H]; pages [K, P, page, H]; page_indices [B, pages_per_seq]."""
    _, tq, n, h = q.shape
    kh, _, page, _ = key_pages.shape
    per_seq = page_indices.shape[1]
    if page > BLOCK:  # view each page as page / BLOCK pages of BLOCK rows
        ratio = page // BLOCK
        key_pages = key_pages.reshape(kh, -1, BLOCK, h)
        value_pages = value_pages.reshape(kh, -1, BLOCK, h)
        page_indices = (page_indices[:, :, None] * ratio + jnp.arange(ratio)).reshape(
            -1, per_seq * ratio
        )
        page, per_seq = BLOCK, per_seq * ratio
    sub = BLOCK // page
    num_blocks = -(-per_seq // sub)
    # Pad the table to whole blocks (padded entries are masked) and to TMA's units.
    table = jnp.pad(page_indices.astype(jnp.int32), ((0, 0), (0, num_blocks * sub - per_seq)))
    table = _tma_table(table)
    splits = min(options.num_splits, num_blocks)
    st = _Static(
        tq, n // kh, h, per_seq * page, num_blocks, -(-num_blocks // splits), page, True,
        dataclasses.replace(options, num_splits=splits),
    )  # fmt: skip
    return _call(q, lengths, table, key_pages, value_pages, st)
