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
over heads, a copy) and streamed as [64, block_kv] tiles beside K/V; with them
block_kv must be 64 (SMEM). Not taken by this kernel (``unsupported_reason``;
``implementation=None`` then uses XLA): float32 inputs, head sizes not a multiple
of 64, groups G that do not divide 64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels._mgpu import lookup
from pallax.kernels.attention import pallas_mosaic_gpu_bwd, xla
from pallax.kernels.attention._mgpu_tiles import (
    BLOCK_Q,
    COL,
    LSE_PAD,
    ROW,
    WG,
    Static,
    copy_in,
    interpret_params,
    kv_block_range,
    matmul,
    pack,
    smem,
    unpack_rows,
)
from pallax.kernels.attention.masks import allowed


def unsupported_reason(q_shape, k_shape, dtype, *, bias, mask, block_kv: int) -> str | None:
    n, h, kh = q_shape[2], q_shape[3], k_shape[2]
    g = n // kh
    if (bias is not None or mask is not None) and block_kv != 64:
        return f"with bias or mask arrays block_kv must be 64 (SMEM), got {block_kv}"
    if jnp.dtype(dtype) not in map(jnp.dtype, (jnp.bfloat16, jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} must be bfloat16 or float16 (wgmma)"
    if h % 64 or h > 256:
        return f"the head size H={h} must be a multiple of 64, at most 256"
    if BLOCK_Q % g:
        return f"the group size N/K={g} must divide {BLOCK_Q}"
    if block_kv not in (64, 128):
        return f"block_kv={block_kv} must be 64 or 128"
    return None


def _kernel(st: Static):
    bk, h, shift = st.bk, st.h, st.g.bit_length() - 1

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

            q_pos = jax.lax.shift_right_logical(
                row0 + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, bk), 0, layout=WG), shift
            )
            q_seg = None
            if st.segments:
                q_seg_rows = plgpu.load(qseg_smem, layout=ROW)
                q_seg = jax.lax.broadcast_in_dim(q_seg_rows, (BLOCK_Q, bk), (0,))

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
                k_pos = start_of(j) + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, bk), 1, layout=WG)
                kv_seg = None
                if st.segments:
                    plgpu.barrier_wait(bars.at[7 + slot])
                    kv_seg_cols = plgpu.load(kvseg_smem.at[slot], layout=COL)
                    kv_seg = jax.lax.broadcast_in_dim(kv_seg_cols, (BLOCK_Q, bk), (1,))
                ok = allowed(
                    st.spec, q_pos, k_pos, q_len=q_len, kv_len=kv_len, q_seg=q_seg, kv_seg=kv_seg
                )
                ok = ok & (k_pos >= j * bk)  # rows of a moved-back block seen before
                if st.mask:
                    plgpu.barrier_wait(bars.at[11 + slot])
                    ok = ok & (plgpu.load(mask_smem.at[slot], layout=WG) != 0)
                s = jnp.where(ok, s, -jnp.inf)
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
    pk = pack(q, k, v, aux, s_multiple=8, s_min=bk, bias=bias, mask=mask)
    rows_p = pk.q_rows.shape[2]
    bias_t, mask_t = pk.tiles()
    st = Static(
        n // kh, h, pk.k.shape[1], bk, options.spec, options.scale, options.soft_cap,
        pk.segments, options.interpret is not None, bias is not None, mask is not None,
        max(bias_t.shape[0], mask_t.shape[0]) > 1,
    )  # fmt: skip
    body = _kernel(st)

    def kernel(*refs):
        pl.run_scoped(
            body(*refs),
            plgpu.SMEM(pk.lens.shape[1:], jnp.int32),
            smem((BLOCK_Q, h), q.dtype),
            smem((2, bk, h), k.dtype),
            smem((2, bk, h), v.dtype),
            plgpu.SMEM((BLOCK_Q,), jnp.int32),
            plgpu.SMEM((2, bk), jnp.int32),
            plgpu.SMEM((2, BLOCK_Q, bk) if st.bias else (8,), jnp.float32),
            plgpu.SMEM((2, BLOCK_Q, bk) if st.mask else (8,), q.dtype),
            plgpu.SMEM((BLOCK_Q,), jnp.float32),
            plgpu.Barrier(num_barriers=13),
        )

    out, lse = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, kh, rows_p, h), q.dtype),
            jax.ShapeDtypeStruct((b, kh, rows_p), jnp.float32),
        ),
        grid=(b, kh, rows_p // BLOCK_Q),
        grid_names=("b", "k", "rows"),
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=4 * 4 * bk),
        interpret=interpret_params(options),
    )(pk.lens, pk.q_rows, pk.k, pk.v, pk.q_seg, pk.kv_seg, bias_t, mask_t)
    return unpack_rows(out, t, n), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def attention(q, k, v, bias, mask, aux, options: xla.Options):
    """q [B,T,N,H], k/v [B,S,K,H]; bias/mask [B|1, N|1, T|1, S|1] or None;
    aux = (q_len, kv_len, q_seg, kv_seg), as for the other backends."""
    return forward(q, k, v, bias, mask, aux, options)[0]


def _fwd(q, k, v, bias, mask, aux, options):
    out, lse = forward(q, k, v, bias, mask, aux, options)
    return out, (q, k, v, bias, mask, aux, out, lse)


def _bwd(options, residuals, dout):
    q, k, v, bias, mask, aux, out, lse = residuals
    dq, dk, dv, dbias = pallas_mosaic_gpu_bwd.backward(
        q, k, v, bias, mask, aux, out, lse, dout, options
    )
    return dq, dk, dv, dbias, None, None


attention.defvjp(_fwd, _bwd)
