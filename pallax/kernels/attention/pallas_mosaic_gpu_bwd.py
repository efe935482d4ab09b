"""Flash attention backward as Mosaic GPU (Hopper) kernels (the custom VJP is in
``pallas_mosaic_gpu.py``).

Both kernels recompute the probabilities of a tile from the forward's per-row
log-sum-exp, with delta = rowsum(dO * O) computed by XLA beforehand:

  dq kernel, grid (B, K, 64-row query blocks), walking K/V blocks:
      S = Q K^T, P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K
  dkv kernel, grid (B, K, 64-row K/V blocks), walking query blocks, in transposed
  form so that every wgmma operand is an SMEM tile or a register tile:
      S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q
  With H = 256 the two f32 accumulators [64, H] alone would need all 255 registers
  of a thread: CTAs share a key block (``dkv_parts``), each recomputing S^T and dP^T
  and owning 128 columns of dK and dV (64 for H = 192, or when a soft cap comes
  with bias or mask tiles).

A query block holds all the query heads of the group (the packed rows), so dK
and dV are summed over the heads of the group inside the kernel. Blocks that the
masks leave empty are neither copied nor computed. The streamed operands are
double-buffered through TMA, as in the forward. K/V are padded to a multiple of
64 rows so that each dkv CTA owns whole rows of dK and dV.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels._mgpu import lookup, tma_table_shape
from pallax.kernels.attention import _mgpu_tiles as tiles
from pallax.kernels.attention import xla
from pallax.kernels.attention.masks import allowed

B = tiles.BLOCK_Q  # 64: rows of every tile (query rows and key rows)
_WG, _ROW, _COL = tiles.WG, tiles.ROW, tiles.COL


def _dq_kernel(st: tiles.BwdStatic, fst: tiles.Static):
    def body(lens, q_g, k_g, v_g, do_g, lse_g, delta_g, qseg_g, kvseg_g, bias_g, mask_g, _bt,
             _mt, dq_g, dbias_g):  # fmt: skip
        b, kh = jax.lax.axis_index("b"), jax.lax.axis_index("k")
        row0 = jax.lax.axis_index("rows") * B
        bb = b if st.bias_batch else 0

        def scoped(lens_s, q_s, do_s, k_s, v_s, lse_s, delta_s, qseg_s, kvseg_s, bias_s, mask_s,
                   dbias_s, bars):  # fmt: skip
            # bars: 0 lengths, 1 q, 2 do, 3 lse, 4 delta, 5 q seg; per slot 6+ K, 8+ V,
            # 10+ kv seg, 12+ bias, 14+ mask
            rows = pl.ds(row0, B)
            tiles.copy_in(
                [
                    (lens.at[0], lens_s),
                    (q_g.at[b, kh, rows], q_s),
                    (do_g.at[b, kh, rows], do_s),
                    (lse_g.at[b, kh, rows], lse_s),
                    (delta_g.at[b, kh, rows], delta_s),
                    (qseg_g.at[b, rows], qseg_s) if st.segments else None,
                ],
                bars,
            )
            q_len, kv_len = lookup(lens_s, 2 * b), lookup(lens_s, 2 * b + 1)
            first, last = tiles.kv_block_range(fst, row0, q_len, kv_len)

            def issue(j, slot):
                keys = pl.ds(j * B, B)
                plgpu.copy_gmem_to_smem(k_g.at[b, keys, kh], k_s.at[slot], bars.at[6 + slot])
                plgpu.copy_gmem_to_smem(v_g.at[b, keys, kh], v_s.at[slot], bars.at[8 + slot])
                if st.segments:
                    plgpu.copy_gmem_to_smem(
                        kvseg_g.at[b, keys], kvseg_s.at[slot], bars.at[10 + slot]
                    )
                tile = (bb, kh, rows, keys)
                if st.bias:
                    plgpu.copy_gmem_to_smem(bias_g.at[tile], bias_s.at[slot], bars.at[12 + slot])
                if st.mask:
                    plgpu.copy_gmem_to_smem(mask_g.at[tile], mask_s.at[slot], bars.at[14 + slot])

            @pl.when(first <= last)
            def _prefetch():
                issue(first, 0)

            rows_of = functools.partial(tiles.along, shape=(B, B), axis=0)
            cols_of = functools.partial(tiles.along, shape=(B, B), axis=1)
            per_row = lambda ref: rows_of(plgpu.load(ref, layout=_ROW))

            def step(j, dq):
                # Per-row values are reloaded or recomputed each step, not held as [64, 64]
                # tiles across the loop (32 registers each).
                slot = jax.lax.rem(j - first, 2)

                @pl.when(j < last)
                def _next():
                    issue(j + 1, 1 - slot)

                plgpu.barrier_wait(bars.at[6 + slot])
                raw = tiles.matmul(
                    st.interpret, q_s, k_s.at[slot], a_in_smem=True, transpose_b=True, shape=(B, B)
                )
                bias = None
                if st.bias:
                    plgpu.barrier_wait(bars.at[12 + slot])
                    bias = plgpu.load(bias_s.at[slot], layout=_WG).astype(jnp.float32)
                s = tiles.logits(st, raw, bias)
                kv_seg = None
                if st.segments:
                    plgpu.barrier_wait(bars.at[10 + slot])
                    kv_seg = cols_of(plgpu.load(kvseg_s.at[slot], layout=_COL))
                q_pos = rows_of(tiles.query_positions(st.g, row0, 0))
                ok = allowed(
                    st.spec, q_pos, cols_of(j * B + tiles.iota(B, 1)), q_len=q_len,
                    kv_len=kv_len, q_seg=per_row(qseg_s) if st.segments else None, kv_seg=kv_seg,
                )  # fmt: skip
                p = jnp.where(ok, jnp.exp(s - per_row(lse_s)), 0.0)
                if st.mask:  # applied apart from ok: fewer [64, 64] predicates live at once
                    plgpu.barrier_wait(bars.at[14 + slot])
                    p = jnp.where(plgpu.load(mask_s.at[slot], layout=_WG) != 0, p, 0.0)
                weight = tiles.logit_grad_weight(st, p, s)
                plgpu.barrier_wait(bars.at[8 + slot])
                dp = tiles.matmul(
                    st.interpret, do_s, v_s.at[slot], a_in_smem=True, transpose_b=True, shape=(B, B)
                )
                dz = weight * (dp - per_row(delta_s))
                if st.bias:  # the tile's dL/dbias; the previous tile's store must have read
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    dbias_s[...] = dz
                ds = (dz * st.scale).astype(q_s.dtype)
                dq = tiles.matmul(st.interpret, ds, k_s.at[slot], a_in_smem=False, acc=dq)
                plgpu.commit_smem()  # every thread is done with the slot before it refills
                if st.bias:
                    plgpu.copy_smem_to_gmem(dbias_s, dbias_g.at[b, kh, rows, pl.ds(j * B, B)])
                return dq

            zeros = plgpu.layout_cast(jnp.zeros((B, st.h), jnp.float32), _WG)
            dq = jax.lax.fori_loop(first, last + 1, step, zeros)
            q_s[...] = dq.astype(q_s.dtype)  # the Q tile becomes the dQ tile
            if st.bias:  # tiles no query of this block attends to get a zero dbias
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                dbias_s[...] = plgpu.layout_cast(jnp.zeros((B, B), jnp.float32), _WG)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, dq_g.at[b, kh, rows])
            if st.bias:

                def zero_tile(j, carry):
                    @pl.when((j < first) | (j > last))
                    def _store():
                        plgpu.copy_smem_to_gmem(dbias_s, dbias_g.at[b, kh, rows, pl.ds(j * B, B)])

                    return carry

                jax.lax.fori_loop(0, st.kv_blocks, zero_tile, None)
            plgpu.wait_smem_to_gmem(0)

        return scoped

    return body


def _dkv_kernel(st: tiles.BwdStatic):
    def body(lens, q_g, k_g, v_g, do_g, lse_g, delta_g, qseg_g, kvseg_g, _b, _m, bias_t_g,
             mask_t_g, dk_g, dv_g):  # fmt: skip
        b, kh = jax.lax.axis_index("b"), jax.lax.axis_index("k")
        block, part = jnp.divmod(jax.lax.axis_index("keys"), st.dkv_parts)
        k0 = block * B
        hp = st.h // st.dkv_parts  # the columns of dK and dV this CTA owns
        cols = slice(None) if st.dkv_parts == 1 else pl.ds(part * hp, hp)
        bb = b if st.bias_batch else 0

        def scoped(lens_s, k_s, v_s, kvseg_s, q_s, do_s, lse_s, delta_s, qseg_s, bias_s, mask_s,
                   bars):  # fmt: skip
            # bars: 0 lengths, 1 K, 2 V, 3 kv seg; per slot 4+ q, 6+ do, 8+ lse, 10+ delta,
            # 12+ q seg, 14+ bias^T, 16+ mask^T
            keys = pl.ds(k0, B)
            tiles.copy_in(
                [
                    (lens.at[0], lens_s),
                    (k_g.at[b, keys, kh], k_s),
                    (v_g.at[b, keys, kh], v_s),
                    (kvseg_g.at[b, keys], kvseg_s) if st.segments else None,
                ],
                bars,
            )
            q_len, kv_len = lookup(lens_s, 2 * b), lookup(lens_s, 2 * b + 1)
            first, last = tiles.q_block_range(st, k0, q_len, kv_len)

            def issue(i, slot):
                rows = pl.ds(i * B, B)
                plgpu.copy_gmem_to_smem(q_g.at[b, kh, rows], q_s.at[slot], bars.at[4 + slot])
                plgpu.copy_gmem_to_smem(do_g.at[b, kh, rows], do_s.at[slot], bars.at[6 + slot])
                plgpu.copy_gmem_to_smem(lse_g.at[b, kh, rows], lse_s.at[slot], bars.at[8 + slot])
                plgpu.copy_gmem_to_smem(
                    delta_g.at[b, kh, rows], delta_s.at[slot], bars.at[10 + slot]
                )
                if st.segments:
                    plgpu.copy_gmem_to_smem(qseg_g.at[b, rows], qseg_s.at[slot], bars.at[12 + slot])
                tile = (bb, kh, keys, rows)
                if st.bias:
                    plgpu.copy_gmem_to_smem(bias_t_g.at[tile], bias_s.at[slot], bars.at[14 + slot])
                if st.mask:
                    plgpu.copy_gmem_to_smem(mask_t_g.at[tile], mask_s.at[slot], bars.at[16 + slot])

            @pl.when(first <= last)
            def _prefetch():
                issue(first, 0)

            rows_of = functools.partial(tiles.along, shape=(B, B), axis=0)
            cols_of = functools.partial(tiles.along, shape=(B, B), axis=1)
            per_col = lambda ref: cols_of(plgpu.load(ref, layout=_COL))

            def step(i, carry):
                dk, dv = carry
                slot = jax.lax.rem(i - first, 2)

                @pl.when(i < last)
                def _next():
                    issue(i + 1, 1 - slot)

                for base in (4, 6, 8, 10):
                    plgpu.barrier_wait(bars.at[base + slot])
                raw_t = tiles.matmul(
                    st.interpret, k_s, q_s.at[slot], a_in_smem=True, transpose_b=True, shape=(B, B)
                )
                bias_t = None
                if st.bias:
                    plgpu.barrier_wait(bars.at[14 + slot])
                    bias_t = plgpu.load(bias_s.at[slot], layout=_WG).astype(jnp.float32)
                s_t = tiles.logits(st, raw_t, bias_t)
                # rows: keys; columns: query rows (recomputed each step, not held in registers)
                q_pos = cols_of(tiles.query_positions(st.g, i * B, 1))
                q_seg = kv_seg = None
                if st.segments:
                    plgpu.barrier_wait(bars.at[12 + slot])
                    q_seg = per_col(qseg_s.at[slot])
                    kv_seg = rows_of(plgpu.load(kvseg_s, layout=_ROW))
                ok = allowed(
                    st.spec, q_pos, rows_of(k0 + tiles.iota(B, 0)), q_len=q_len, kv_len=kv_len,
                    q_seg=q_seg, kv_seg=kv_seg,
                )  # fmt: skip
                p_t = jnp.where(ok, jnp.exp(s_t - per_col(lse_s.at[slot])), 0.0)
                if st.mask:
                    plgpu.barrier_wait(bars.at[16 + slot])
                    p_t = jnp.where(plgpu.load(mask_s.at[slot], layout=_WG) != 0, p_t, 0.0)
                weight_t = tiles.logit_grad_weight(st, p_t, s_t)
                dv = tiles.matmul(
                    st.interpret, p_t.astype(k_s.dtype), do_s.at[slot, :, cols], a_in_smem=False,
                    acc=dv,
                )  # fmt: skip
                dp_t = tiles.matmul(
                    st.interpret, v_s, do_s.at[slot], a_in_smem=True, transpose_b=True, shape=(B, B)
                )
                dz_t = weight_t * (dp_t - per_col(delta_s.at[slot]))
                ds_t = (dz_t * st.scale).astype(k_s.dtype)
                dk = tiles.matmul(
                    st.interpret, ds_t, q_s.at[slot, :, cols], a_in_smem=False, acc=dk
                )
                plgpu.commit_smem()  # every thread is done with the slot before it refills
                return dk, dv

            zeros = plgpu.layout_cast(jnp.zeros((B, hp), jnp.float32), _WG)
            dk, dv = jax.lax.fori_loop(first, last + 1, step, (zeros, zeros))
            k_s.at[:, :hp][...] = dk.astype(k_s.dtype)  # K and V become dK and dV
            v_s.at[:, :hp][...] = dv.astype(v_s.dtype)
            plgpu.commit_smem()
            # TMA reads contiguous SMEM: H / dkv_parts columns of a tiled [64, H] tile are
            # contiguous 8 rows at a time.
            chunk = B if st.dkv_parts == 1 else 8
            for r in range(0, B, chunk):
                rows, out = pl.ds(r, chunk), pl.ds(k0 + r, chunk)
                plgpu.copy_smem_to_gmem(k_s.at[rows, :hp], dk_g.at[b, kh, out, cols])
                plgpu.copy_smem_to_gmem(v_s.at[rows, :hp], dv_g.at[b, kh, out, cols])
            plgpu.wait_smem_to_gmem(0)

        return scoped

    return body


def dkv_parts(h: int, heavy: bool) -> int:
    """dkv CTAs per key block: each owns at most 128 columns of dK and dV (whole 64-column
    SMEM tiles), so that the two f32 accumulators fit in registers beside a step's tiles;
    at most 64 when a step is ``heavy`` (a soft cap with bias or mask tiles: more
    [64, 64] tiles and predicates live at once, and ptxas spilled at 128)."""
    cols = 64 if heavy else 128
    return max(1, h // cols) if h % cols == 0 else h // 64


def dq_scratch(b: int, h: int, dtype, *, bias: bool, mask: bool) -> tuple:
    """The dq kernel's SMEM, in the order of its ``scoped``'s arguments."""
    return (
        plgpu.SMEM(tma_table_shape(2 * b), jnp.int32),  # (q_len, kv_len) per sequence
        tiles.smem((B, h), dtype),  # Q, then dQ
        tiles.smem((B, h), dtype),  # dO
        tiles.smem((2, B, h), dtype),  # K, two slots
        tiles.smem((2, B, h), dtype),  # V
        plgpu.SMEM((B,), jnp.float32),  # log-sum-exp
        plgpu.SMEM((B,), jnp.float32),  # delta
        plgpu.SMEM((B,), jnp.int32),  # query segments
        plgpu.SMEM((2, B), jnp.int32),  # key segments
        tiles.logit_tiles(bias, (2, B, B), jnp.float32),
        tiles.logit_tiles(mask, (2, B, B), jnp.int8),
        tiles.logit_tiles(bias, (B, B), jnp.float32),  # the dbias tile
        plgpu.Barrier(num_barriers=16),
    )


def dkv_scratch(b: int, h: int, dtype, *, bias: bool, mask: bool) -> tuple:
    """The dkv kernel's SMEM, in the order of its ``scoped``'s arguments."""
    return (
        plgpu.SMEM(tma_table_shape(2 * b), jnp.int32),
        tiles.smem((B, h), dtype),  # K, then dK
        tiles.smem((B, h), dtype),  # V, then dV
        plgpu.SMEM((B,), jnp.int32),  # key segments
        tiles.smem((2, B, h), dtype),  # Q, two slots
        tiles.smem((2, B, h), dtype),  # dO
        plgpu.SMEM((2, B), jnp.float32),  # log-sum-exp
        plgpu.SMEM((2, B), jnp.float32),  # delta
        plgpu.SMEM((2, B), jnp.int32),  # query segments
        tiles.logit_tiles(bias, (2, B, B), jnp.float32),  # transposed
        tiles.logit_tiles(mask, (2, B, B), jnp.int8),
        plgpu.Barrier(num_barriers=18),
    )


def _dbias_to(dbias_rows, bias, t, s, n):
    """[B, K, rows_p, s_pad] f32 -> bias's shape, summed over its broadcast axes."""
    d = jnp.swapaxes(tiles.unpack_rows(dbias_rows[..., :s], t, n), 1, 2)  # [B, N, T, S]
    axes = tuple(ax for ax in range(4) if bias.shape[ax] == 1)
    return jnp.sum(d, axis=axes, keepdims=True).astype(bias.dtype)


def backward(q, k, v, bias, mask, aux, out, lse, dout, options: xla.Options):
    """(dq, dk, dv, dbias) from the forward's output and packed-row log-sum-exp."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    pk = tiles.pack(q, k, v, aux, s_multiple=B, s_min=B, bias=bias, mask=mask)
    rows_p, s_pad = pk.q_rows.shape[2], pk.k.shape[1]
    do_rows = tiles.pack_rows(dout, kh, rows_p)
    out_rows = tiles.pack_rows(out, kh, rows_p).astype(jnp.float32)
    delta = jnp.einsum("bkrh,bkrh->bkr", do_rows.astype(jnp.float32), out_rows)
    bias_p, mask_p = pk.tiles()
    transposed = lambda x: jnp.swapaxes(x, 2, 3)  # [.., rows_p, s_pad] -> [.., s_pad, rows_p]
    st = tiles.BwdStatic(
        n // kh, h, options.spec, options.scale, options.soft_cap, pk.segments,
        options.interpret is not None, rows_p, bias is not None, mask is not None,
        max(bias_p.shape[0], mask_p.shape[0]) > 1, s_pad // B,
        dkv_parts(h, options.soft_cap is not None and (bias is not None or mask is not None)),
    )  # fmt: skip
    fst = tiles.Static(
        st.g, h, s_pad, B, options.spec, options.scale, options.soft_cap, pk.segments,
        st.interpret,
    )  # fmt: skip
    operands = (
        pk.lens, pk.q_rows, pk.k, pk.v, do_rows, lse, delta, pk.q_seg, pk.kv_seg,
        bias_p, mask_p,
        transposed(bias_p) if st.bias else bias_p,
        transposed(mask_p) if st.mask else mask_p,
    )  # fmt: skip
    params = dict(
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=4 * 4 * B),
        interpret=tiles.interpret_params(options),
    )
    dq_body, dq_smem = _dq_kernel(st, fst), dq_scratch(b, h, q.dtype, bias=st.bias, mask=st.mask)

    def dq_kernel(*refs):
        pl.run_scoped(dq_body(*refs), *dq_smem)

    dbias_shape = (b, kh, rows_p, s_pad) if st.bias else (1, 1, 1, 8)
    dq, dbias = plgpu.kernel(
        dq_kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, kh, rows_p, h), q.dtype),
            jax.ShapeDtypeStruct(dbias_shape, jnp.float32),
        ),
        grid=(b, kh, rows_p // B),
        grid_names=("b", "k", "rows"),
        **params,
    )(*operands)
    dkv_body, dkv_smem = _dkv_kernel(st), dkv_scratch(b, h, q.dtype, bias=st.bias, mask=st.mask)

    def dkv_kernel(*refs):
        pl.run_scoped(dkv_body(*refs), *dkv_smem)

    dk, dv = plgpu.kernel(
        dkv_kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, kh, s_pad, h), k.dtype),
            jax.ShapeDtypeStruct((b, kh, s_pad, h), v.dtype),
        ),
        grid=(b, kh, s_pad // B * st.dkv_parts),
        grid_names=("b", "k", "keys"),
        **params,
    )(*operands)
    unkv = lambda x: jnp.moveaxis(x, 1, 2)[:, :s]
    dbias = None if bias is None else _dbias_to(dbias, bias, t, s, n)
    return tiles.unpack_rows(dq, t, n), unkv(dk), unkv(dv), dbias
