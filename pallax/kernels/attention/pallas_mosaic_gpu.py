"""Flash attention forward as a Mosaic GPU (Hopper) kernel, and what the backward shares.

Layout: the G = N / K query heads that share a KV head are packed into the rows
of one tile, position-major ([B, K, T * G, H], row = t * G + g), so a CTA reads
each K/V block once for the whole group and never materialises repeated K/V
heads. Grid (B, K, row blocks of 64): one warpgroup per CTA owns 64 rows
(64 / G positions) in the WGMMA register layout and walks the K/V blocks it
needs (causal / window / lengths give the range; other blocks are neither
copied nor computed). K/V blocks are TMA-copied into two swizzled SMEM slots,
the next block loading while this one is used:

  S = Q K^T     wgmma, f32 accumulator [64, block_kv]
  mask          (causal, window, lengths, segments: masks.allowed on iotas), soft cap
  online softmax in f32 (row max, rescale, row sum in the WGMMA row layout)
  O += P V      wgmma with P (bf16/f16) from registers

The output and the log-sum-exp are written per 64-row block; the backward
kernels (``pallas_mosaic_gpu_bwd.py``) recompute the tiles from them.

The same kernel runs in JAX's GPU interpreter with the two matmuls computed by
``dot_general`` on the loaded tiles (the interpreter cannot run wgmma): the
copies, block ranges, masks and softmax bookkeeping are tested on CPU; the
wgmma path is verified on a real GPU (tests marked ``gpu``).

Bias and mask arrays are packed like the queries ([B|1, K, T*G, S]: broadcast
over heads, a copy; the mask as int8) and streamed as [64, block_kv] f32 / int8
tiles in swizzled SMEM beside K/V (layout inference finds no WGMMA-layout load
for an unswizzled bf16 mask tile); K/V are then padded to whole blocks, since a
swizzled tile's key offset must be a multiple of its width. Per-row and per-column
values (positions, segments, statistics) stay vectors until a step broadcasts them:
the [64, block_kv] tiles live at once are what decides whether ptxas spills.

Not taken by this kernel (``unsupported_reason``; ``implementation=None`` then
uses XLA): float32 inputs, head sizes not a multiple of 64, groups G that do not
divide 64, and configurations whose forward, dq or dkv kernel would need more
than the 227 KiB of SMEM of a Hopper CTA (counted from the kernels' own
allocations, ``smem_needs``: e.g. H=256 with block_kv=128, or H=256 with a bias).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels._mgpu import SMEM_BYTES, lookup, smem_bytes, tma_table_shape
from pallax.kernels.attention import _sharded, pallas_mosaic_gpu_bwd, xla
from pallax.kernels.attention._mgpu_tiles import (
    BLOCK_Q,
    COL,
    LSE_PAD,
    ROW,
    WG,
    Static,
    along,
    copy_in,
    interpret_params,
    iota,
    kv_block_range,
    logit_tiles,
    matmul,
    pack,
    query_positions,
    smem,
    unpack_rows,
)
from pallax.kernels.attention.masks import allowed


def unsupported_reason(q_shape, k_shape, dtype, *, bias, mask, block_kv: int) -> str | None:
    n, h, kh = q_shape[2], q_shape[3], k_shape[2]
    g = n // kh
    if jnp.dtype(dtype) not in map(jnp.dtype, (jnp.bfloat16, jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} must be bfloat16 or float16 (wgmma)"
    if h % 64 or h > 256:
        return f"the head size H={h} must be a multiple of 64, at most 256"
    if BLOCK_Q % g:
        return f"the group size N/K={g} must divide {BLOCK_Q}"
    if block_kv not in (64, 128):
        return f"block_kv={block_kv} must be 64 or 128"
    on = dict(bias=bias is not None, mask=mask is not None)
    needs = smem_needs(q_shape[0], h, block_kv, dtype, **on)
    over = [f"{name} {need} B" for name, need in needs.items() if need > SMEM_BYTES]
    if not over:
        return None
    extras = " and ".join(name for name, x in on.items() if x)
    fix = "implementation='xla'"
    if block_kv != 64 and max(smem_needs(q_shape[0], h, 64, dtype, **on).values()) <= SMEM_BYTES:
        fix = "block_sizes=AttentionBlockSizes(64, 64)"
    return (
        f"H={h}, block_kv={block_kv}{' with ' + extras if extras else ''} needs more SMEM "
        f"than the {SMEM_BYTES} B (227 KiB) of a Hopper CTA ({', '.join(over)}); use {fix}"
    )


def smem_needs(b: int, h: int, block_kv: int, dtype, *, bias: bool, mask: bool) -> dict:
    """Dynamic SMEM bytes of the forward, dq and dkv kernels for batch ``b`` (the
    lengths table), from the allocations the kernels make."""
    bwd = pallas_mosaic_gpu_bwd
    return {
        "forward": smem_bytes(
            _scratch(b, h, block_kv, dtype, bias=bias, mask=mask),
            reduction_bytes=_reduction_bytes(block_kv),
        ),
        "dq": smem_bytes(bwd.dq_scratch(b, h, dtype, bias=bias, mask=mask)),
        "dkv": smem_bytes(bwd.dkv_scratch(b, h, dtype, bias=bias, mask=mask)),
    }


def _reduction_bytes(bk: int) -> int:
    """SMEM for the row reductions of a [64, bk] tile (f32 per column and warp)."""
    return 4 * 4 * bk


def _scratch(b: int, h: int, bk: int, dtype, *, bias: bool, mask: bool) -> tuple:
    """The forward's SMEM, in the order of ``scoped``'s arguments."""
    return (
        plgpu.SMEM(tma_table_shape(2 * b), jnp.int32),  # (q_len, kv_len) per sequence
        smem((BLOCK_Q, h), dtype),  # Q, then the output
        smem((2, bk, h), dtype),  # K, two slots
        smem((2, bk, h), dtype),  # V
        plgpu.SMEM((BLOCK_Q,), jnp.int32),  # query segments
        plgpu.SMEM((2, bk), jnp.int32),  # key segments
        logit_tiles(bias, (2, BLOCK_Q, bk), jnp.float32),
        logit_tiles(mask, (2, BLOCK_Q, bk), jnp.int8),
        plgpu.SMEM((BLOCK_Q,), jnp.float32),  # log-sum-exp
        plgpu.Barrier(num_barriers=13),
    )


def _kernel(st: Static):
    bk, h = st.bk, st.h

    def body(lens_gmem, q_gmem, k_gmem, v_gmem, qseg_gmem, kvseg_gmem, bias_gmem, mask_gmem,
             out_gmem, lse_gmem):  # fmt: skip
        b = jax.lax.axis_index("b")
        kh = jax.lax.axis_index("k")
        row0 = jax.lax.axis_index("rows") * BLOCK_Q
        bb = b if st.bias_batch else 0

        def scoped(lens_smem, q_smem, k_smem, v_smem, qseg_smem, kvseg_smem, bias_smem, mask_smem,
                   lse_smem, bars):  # fmt: skip
            # bars: 0 lengths, 1 q, 2 q segments; per slot: 3+ K, 5+ V, 7+ kv segments,
            # 9+ bias, 11+ mask.
            rows = pl.ds(row0, BLOCK_Q)
            copy_in(
                [
                    (lens_gmem.at[0], lens_smem),
                    (q_gmem.at[b, kh, rows], q_smem),
                    (qseg_gmem.at[b, rows], qseg_smem) if st.segments else None,
                ],
                bars,
            )
            q_len, kv_len = lookup(lens_smem, 2 * b), lookup(lens_smem, 2 * b + 1)
            first, last = kv_block_range(st, row0, q_len, kv_len)

            def start_of(j):  # the last block is moved back to end at S (masked below)
                return jnp.minimum(j * bk, st.s - bk)

            def issue(j, slot):
                keys = pl.ds(start_of(j), bk)
                plgpu.copy_gmem_to_smem(k_gmem.at[b, keys, kh], k_smem.at[slot], bars.at[3 + slot])
                plgpu.copy_gmem_to_smem(v_gmem.at[b, keys, kh], v_smem.at[slot], bars.at[5 + slot])
                if st.segments:
                    plgpu.copy_gmem_to_smem(
                        kvseg_gmem.at[b, keys], kvseg_smem.at[slot], bars.at[7 + slot]
                    )
                tile = (bb, kh, rows, keys)
                if st.bias:
                    plgpu.copy_gmem_to_smem(
                        bias_gmem.at[tile], bias_smem.at[slot], bars.at[9 + slot]
                    )
                if st.mask:
                    plgpu.copy_gmem_to_smem(
                        mask_gmem.at[tile], mask_smem.at[slot], bars.at[11 + slot]
                    )

            @pl.when(first <= last)
            def _prefetch():
                issue(first, 0)

            # Positions and segments stay row / column vectors until broadcast in a step.
            rows_of = functools.partial(along, shape=(BLOCK_Q, bk), axis=0)
            cols_of = functools.partial(along, shape=(BLOCK_Q, bk), axis=1)
            q_pos = query_positions(st.g, row0, 0)

            def step(j, carry):
                acc, m, denom = carry
                slot = jax.lax.rem(j - first, 2)

                @pl.when(j < last)
                def _next():  # the other slot was released by the barrier ending step j - 1
                    issue(j + 1, 1 - slot)

                plgpu.barrier_wait(bars.at[3 + slot])
                s = matmul(  # [64, bk] f32
                    st.interpret, q_smem, k_smem.at[slot], a_in_smem=True, transpose_b=True,
                    shape=(BLOCK_Q, bk),
                )  # fmt: skip
                s = s * st.scale
                if st.bias:
                    plgpu.barrier_wait(bars.at[9 + slot])
                    s = s + plgpu.load(bias_smem.at[slot], layout=WG).astype(jnp.float32)
                if st.soft_cap is not None:
                    s = st.soft_cap * jnp.tanh(s / st.soft_cap)
                k_pos = cols_of(start_of(j) + iota(bk, 1))
                q_seg = kv_seg = None
                if st.segments:
                    plgpu.barrier_wait(bars.at[7 + slot])
                    q_seg = rows_of(plgpu.load(qseg_smem, layout=ROW))
                    kv_seg = cols_of(plgpu.load(kvseg_smem.at[slot], layout=COL))
                ok = allowed(
                    st.spec, rows_of(q_pos), k_pos, q_len=q_len, kv_len=kv_len, q_seg=q_seg,
                    kv_seg=kv_seg,
                )  # fmt: skip
                ok = ok & (k_pos >= j * bk)  # rows of a moved-back block seen before
                s = jnp.where(ok, s, -jnp.inf)
                if st.mask:  # apart from ok: fewer [64, bk] predicates live at once
                    plgpu.barrier_wait(bars.at[11 + slot])
                    s = jnp.where(plgpu.load(mask_smem.at[slot], layout=WG) != 0, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - jax.lax.broadcast_in_dim(m_safe, s.shape, (0,)))
                alpha = jnp.exp(m - m_safe)
                denom = alpha * denom + jnp.sum(p, axis=1)
                acc = acc * jax.lax.broadcast_in_dim(alpha, acc.shape, (0,))
                plgpu.barrier_wait(bars.at[5 + slot])
                p = p.astype(q_smem.dtype)
                acc = matmul(st.interpret, p, v_smem.at[slot], a_in_smem=False, acc=acc)
                plgpu.commit_smem()  # all threads are done with this slot before it refills
                return acc, m_new, denom

            init = (
                plgpu.layout_cast(jnp.zeros((BLOCK_Q, h), jnp.float32), WG),
                plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), ROW),
                plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), ROW),
            )
            acc, m, denom = jax.lax.fori_loop(first, last + 1, step, init)
            live = denom > 0
            inv = jnp.where(live, 1.0 / jnp.where(live, denom, 1.0), 0.0)
            out = acc * jax.lax.broadcast_in_dim(inv, acc.shape, (0,))
            q_smem[...] = out.astype(q_smem.dtype)  # the Q tile becomes the output tile
            lse_smem[...] = jnp.where(live, m + jnp.log(jnp.where(live, denom, 1.0)), LSE_PAD)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_gmem.at[b, kh, rows])
            plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[b, kh, rows])
            plgpu.wait_smem_to_gmem(0)

        return scoped

    return body


def forward(q, k, v, bias, mask, aux, options: xla.Options):
    """(out [B, T, N, H], lse [B, K, rows_p] f32 per packed row)."""
    b, t, n, h = q.shape
    kh, bk = k.shape[2], options.block_kv
    # Swizzled bias/mask tiles need key offsets that are multiples of the tile width:
    # with them K/V are padded to whole blocks (the last block is never moved back).
    multiple = bk if bias is not None or mask is not None else 8
    pk = pack(q, k, v, aux, s_multiple=multiple, s_min=bk, bias=bias, mask=mask)
    rows_p = pk.q_rows.shape[2]
    bias_t, mask_t = pk.tiles()
    st = Static(
        n // kh, h, pk.k.shape[1], bk, options.spec, options.scale, options.soft_cap,
        pk.segments, options.interpret is not None, bias is not None, mask is not None,
        max(bias_t.shape[0], mask_t.shape[0]) > 1,
    )  # fmt: skip
    body = _kernel(st)

    scratch = _scratch(b, h, bk, q.dtype, bias=st.bias, mask=st.mask)

    def kernel(*refs):
        pl.run_scoped(body(*refs), *scratch)

    out, lse = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, kh, rows_p, h), q.dtype),
            jax.ShapeDtypeStruct((b, kh, rows_p), jnp.float32),
        ),
        grid=(b, kh, rows_p // BLOCK_Q),
        grid_names=("b", "k", "rows"),
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=_reduction_bytes(bk)),
        interpret=interpret_params(options),
    )(pk.lens, pk.q_rows, pk.k, pk.v, pk.q_seg, pk.kv_seg, bias_t, mask_t)
    return unpack_rows(out, t, n), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def attention(q, k, v, bias, mask, aux, options: xla.Options):
    """q [B,T,N,H], k/v [B,S,K,H]; bias/mask [B|1, N|1, T|1, S|1] or None;
    aux = (q_len, kv_len, q_seg, kv_seg), as for the other backends. The kernels run per
    shard of sharded inputs (``_sharded``)."""
    return _sharded.forward(_forward_grouped, q, k, v, bias, mask, aux, options, gpu=True)[0]


def _forward_grouped(q, k, v, bias, mask, aux, options):
    """``forward`` with the log-sum-exp as [B, K, G, T, 1] (the per-shard layout of
    ``_sharded``: a device holding some of a group's heads holds their rows)."""
    out, lse = forward(q, k, v, bias, mask, aux, options)
    b, t, n, _ = q.shape
    kh = k.shape[2]
    lse = lse[:, :, : t * (n // kh)].reshape(b, kh, t, n // kh)
    return out, jnp.swapaxes(lse, 2, 3)[..., None]


def _backward_grouped(q, k, v, bias, mask, aux, out, lse, dout, options):
    b, kh, g, t, _ = lse.shape
    rows = jnp.swapaxes(lse[..., 0], 2, 3).reshape(b, kh, t * g)
    rows_p = -(-t * g // BLOCK_Q) * BLOCK_Q  # padded rows are masked: any value
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, rows_p - t * g)))
    return pallas_mosaic_gpu_bwd.backward(q, k, v, bias, mask, aux, out, rows, dout, options)


def _fwd(q, k, v, bias, mask, aux, options):
    out, lse = _sharded.forward(_forward_grouped, q, k, v, bias, mask, aux, options, gpu=True)
    return out, (q, k, v, bias, mask, aux, out, lse)


def _bwd(options, residuals, dout):
    q, k, v, bias, mask, aux, out, lse = residuals
    dq, dk, dv, dbias = _sharded.backward(
        _backward_grouped, q, k, v, bias, mask, aux, out, lse, dout, options, gpu=True
    )
    return dq, dk, dv, dbias, None, None


attention.defvjp(_fwd, _bwd)
