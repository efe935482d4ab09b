"""Flash attention backward as two Mosaic TPU kernels (FlashAttention-2 style).

Both recompute the probabilities of a tile from the forward's log-sum-exp:
p = exp(s - lse), dp = do @ v.T, ds = p * (dp - delta) with delta = rowsum(do * o)
(computed once in XLA), times the soft cap's derivative when there is one.

  dkv  grid (B, K, S/bk, T/bq), query blocks "arbitrary": dv += p.T @ do,
       dk += ds.T @ q * scale. The tile's rows are the G query heads of the
       group, so the contraction over rows sums dK/dV over the group in-kernel.
  dq   grid (B, K, T/bq, S/bk), key blocks "arbitrary": dq += ds @ k * scale;
       with a bias it also writes ds per tile, which XLA reduces to the bias's
       broadcast shape (that output is [B, N, T, S] f32: dense in T and S).

Masked blocks are skipped as in the forward, in compute and in DMA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.kernels.attention import _sharded
from pallax.kernels.attention import _tpu_tiles as tiles
from pallax.kernels.attention import pallas_tpu as fwd

_EXTRA = ("do", "lse", "delta")


def _tile_grads(st, refs, b, i, j):
    s, ok, q = tiles.tile(st, refs, b, i, j)  # [G*bq, bk], q [G*bq, H]
    lse = tiles.rows_of(st, refs["lse"], i)  # [G*bq, 1]
    delta = tiles.rows_of(st, refs["delta"], i)
    do = tiles.rows_of(st, refs["do"], i)  # [G*bq, H]
    v = tiles.masked_value(st, refs["v"][...], j)
    p = jnp.where(ok, jnp.exp(s - lse), 0.0)
    dp = jax.lax.dot_general(do, v, tiles.NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    if st.soft_cap is not None:
        ds = ds * (1.0 - jnp.square(s / st.soft_cap))
    # Last: masked entries may hold NaN (padding past T or S in bias or dp), and
    # a select, unlike a product with 0, removes it.
    ds = jnp.where(ok, ds, 0.0)
    return p, ds, q, do


def _split(refs, names, n_out):
    refs_in = dict(zip(names, refs[: len(names)], strict=True))
    return refs_in, refs[len(names) : len(names) + n_out], refs[len(names) + n_out :]


def _dkv_kernel(lengths_ref, *refs, st: tiles.Static, names):
    refs_in, (dk_ref, dv_ref), (dk_sc, dv_sc) = _split(refs, names, 2)
    refs_in["lengths"] = lengths_ref
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    first, last = st.q_range(j)

    @pl.when((i >= first) & (i <= last))
    def _compute():
        p, ds, q, do = _tile_grads(st, refs_in, b, i, j)
        dv_sc[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, tiles.TN, preferred_element_type=jnp.float32
        )
        dk_sc[...] += (
            jax.lax.dot_general(ds.astype(q.dtype), q, tiles.TN, preferred_element_type=jnp.float32)
            * st.scale
        )

    @pl.when(i == st.nq - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(lengths_ref, *refs, st: tiles.Static, names):
    n_out = 2 if st.has_bias else 1
    refs_in, outs, (dq_sc,) = _split(refs, names, n_out)
    refs_in["lengths"] = lengths_ref
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    first, last = st.kv_range(i)
    active = (j >= first) & (j <= last)

    @pl.when(active)
    def _compute():
        _, ds, _, _ = _tile_grads(st, refs_in, b, i, j)
        k = tiles.masked_value(st, refs_in["k"][...], j)
        dq_sc[...] += (
            jax.lax.dot_general(ds.astype(k.dtype), k, tiles.NN, preferred_element_type=jnp.float32)
            * st.scale
        )
        if st.has_bias:
            outs[1][...] = ds.reshape(st.g, st.bq, st.bk)

    if st.has_bias:

        @pl.when(jnp.logical_not(active))
        def _no_tile():
            outs[1][...] = jnp.zeros(outs[1].shape, jnp.float32)

    @pl.when(j == st.nk - 1)
    def _finish():
        outs[0][...] = dq_sc[...].reshape(st.g, st.bq, st.h).astype(outs[0].dtype)


def backward(q, k, v, bias, mask, aux, out, lse, dout, options: fwd.Options):
    """Returns (dq, dk, dv, dbias or None) for the forward's (out, lse [B,K,G,T,1])."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    segs = fwd.segments_of(aux)
    st = fwd.static_of(q, k, bias, mask, segs is not None, options)
    q5, k4, v4 = fwd.grouped(q, kh), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    do5 = fwd.grouped(dout, kh)
    delta = jnp.sum(
        do5.astype(jnp.float32) * fwd.grouped(out, kh).astype(jnp.float32), axis=-1, keepdims=True
    )  # [B, K, G, T, 1]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    bias5 = fwd.dense_to_tiles(bias, kh)
    mask5 = None if mask is None else fwd.dense_to_tiles(mask.astype(jnp.int32), kh)
    extra = [("do", do5, "q_rows"), ("lse", lse_safe, "q_rows"), ("delta", delta, "q_rows")]
    lengths = fwd.lengths_of(aux, b, t, s)
    params = dict(interpret=fwd.interpret_params(options))
    cost = pl.CostEstimate(
        flops=8 * b * n * t * s * h,
        transcendentals=b * n * t * s,
        bytes_accessed=3 * q.nbytes * st.nk + 2 * k.nbytes * st.nq,
    )

    names, operands, specs = fwd.inputs_and_specs(
        st, q5, k4, v4, bias5, mask5, segs, q_axis=3, kv_axis=2, clamp_kv=False, extra=extra
    )
    kv_out = pl.BlockSpec((None, None, st.bk, st.h), lambda b, kh, j, i, *_: (b, kh, j, 0))
    dk4, dv4 = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, names=tuple(names)),
        out_shape=(
            jax.ShapeDtypeStruct(k4.shape, k.dtype),
            jax.ShapeDtypeStruct(v4.shape, v.dtype),
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kh, st.nk, st.nq),
            in_specs=specs,
            out_specs=(kv_out, kv_out),
            scratch_shapes=[pltpu.VMEM((st.bk, st.h), jnp.float32)] * 2,
        ),
        compiler_params=fwd.compiler_params(options),
        cost_estimate=cost,
        name="pallax_flash_attention_dkv",
        **params,
    )(lengths, *operands)

    names, operands, specs = fwd.inputs_and_specs(
        st, q5, k4, v4, bias5, mask5, segs, q_axis=2, kv_axis=3, clamp_kv=True, extra=extra
    )
    q_out = pl.BlockSpec((None, None, st.g, st.bq, st.h), lambda b, kh, i, j, *_: (b, kh, 0, i, 0))
    out_shapes, out_specs = [jax.ShapeDtypeStruct(q5.shape, q.dtype)], [q_out]
    if bias is not None:
        out_shapes.append(jax.ShapeDtypeStruct((b, kh, st.g, t, s), jnp.float32))
        out_specs.append(
            pl.BlockSpec((None, None, st.g, st.bq, st.bk), lambda b, kh, i, j, *_: (b, kh, 0, i, j))
        )
    outs = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, names=tuple(names)),
        out_shape=tuple(out_shapes),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kh, st.nq, st.nk),
            in_specs=specs,
            out_specs=tuple(out_specs),
            scratch_shapes=[pltpu.VMEM((st.g * st.bq, st.h), jnp.float32)],
        ),
        compiler_params=fwd.compiler_params(options),
        cost_estimate=cost,
        name="pallax_flash_attention_dq",
        **params,
    )(lengths, *operands)
    dq = fwd.ungrouped(outs[0])
    dk, dv = dk4.transpose(0, 2, 1, 3), dv4.transpose(0, 2, 1, 3)
    dbias = None
    if bias is not None:
        ds = outs[1].reshape(b, n, t, s)  # d logits before scaling = d bias
        axes = tuple(ax for ax, size in enumerate(bias.shape) if size == 1)
        dbias = jnp.sum(ds, axis=axes, keepdims=True).astype(bias.dtype)
    return dq, dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def attention(q, k, v, bias, mask, aux, options: fwd.Options):
    """The Pallas TPU attention, same signature as ``xla.attention``; the kernels run
    per shard of sharded inputs (``_sharded``)."""
    return _sharded.forward(fwd.forward, q, k, v, bias, mask, aux, options)[0]


def _fwd(q, k, v, bias, mask, aux, options):
    out, lse = _sharded.forward(fwd.forward, q, k, v, bias, mask, aux, options)
    return out, (q, k, v, bias, mask, aux, out, lse)


def _bwd(options, residuals, dout):
    q, k, v, bias, mask, aux, out, lse = residuals
    dq, dk, dv, dbias = _sharded.backward(
        backward, q, k, v, bias, mask, aux, out, lse, dout, options
    )
    return dq, dk, dv, dbias, None, None


attention.defvjp(_fwd, _bwd)
