"""Memory-efficient attention in XLA: tiles of [block_q, block_kv], online softmax.

Forward: for each query block (``lax.map``), a scan over key/value blocks keeps
the running max, sum and output in f32, so only a [N, block_q, block_kv] logits
tile exists at a time. Backward (``custom_vjp``): recomputes each tile from the
saved log-sum-exp, as FlashAttention-2 does: a scan over key/value blocks whose
inner scan over query blocks accumulates dK/dV for the block and adds into dQ
(and d_bias, when given). Peak temporary memory is O(T * H * N + tile), linear
in the sequence length. Query heads are grouped per KV head ([B, T, K, G, H]),
so K/V are never repeated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallax.kernels._dispatch import InterpretConfig
from pallax.kernels.attention.masks import MaskSpec, allowed, tile_of


@dataclasses.dataclass(frozen=True)
class Options:
    """Static options of every attention backend (the XLA path ignores ``interpret``
    and ``vmem_limit_bytes``, the Mosaic TPU kernels' scoped VMEM limit; None: the
    compiler's default)."""

    scale: float
    spec: MaskSpec
    soft_cap: float | None
    block_q: int
    block_kv: int
    interpret: InterpretConfig | None = None
    vmem_limit_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class _Dims:
    b: int
    t: int
    s: int
    k: int
    g: int
    h: int
    bq: int
    bk: int
    tp: int
    sp: int


def _dims(q, k, options):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = min(options.block_q, t), min(options.block_kv, s)
    return _Dims(b, t, s, kh, n // kh, h, bq, bk, -(-t // bq) * bq, -(-s // bk) * bk)


def _pad_axis(x, axis, size):
    if x is None or x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _group_heads(x4, d: _Dims):
    """[B', N|1, T', S'] -> [B', K|1, G|1, T', S']."""
    if x4 is None:
        return None
    if x4.shape[1] == 1:
        return x4[:, :, None]
    return x4.reshape(x4.shape[0], d.k, d.g, *x4.shape[2:])


def _tile(q_blk, k_blk, bias, mask, aux, i, j, d: _Dims, options: Options):
    """Capped logits [B, K, G, bq, bk] (f32) of tile (i, j) and the mask that applies."""
    q_len, kv_len, q_seg, kv_seg = aux
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
    s = s * options.scale
    if bias is not None:
        s = s + tile_of(bias, i * d.bq, d.bq, j * d.bk, d.bk).astype(jnp.float32)
    if options.soft_cap is not None:
        s = options.soft_cap * jnp.tanh(s / options.soft_cap)
    q_pos = (i * d.bq + jnp.arange(d.bq))[:, None]
    k_pos = (j * d.bk + jnp.arange(d.bk))[None, :]
    seg = lambda x, start, size: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    ok = allowed(
        options.spec,
        q_pos,
        k_pos,
        q_len=None if q_len is None else q_len[:, None, None, None, None],
        kv_len=None if kv_len is None else kv_len[:, None, None, None, None],
        q_seg=None if q_seg is None else seg(q_seg, i * d.bq, d.bq)[:, None, None, :, None],
        kv_seg=None if kv_seg is None else seg(kv_seg, j * d.bk, d.bk)[:, None, None, None, :],
    )
    ok &= k_pos < d.s  # padding keys
    if mask is not None:
        ok &= tile_of(mask, i * d.bq, d.bq, j * d.bk, d.bk)
    return s, ok


def _prepare(q, k, v, bias, mask, aux, d: _Dims):
    q_len, kv_len, q_seg, kv_seg = aux
    qg = _pad_axis(q, 1, d.tp).reshape(d.b, d.tp, d.k, d.g, d.h)
    k, v = _pad_axis(k, 1, d.sp), _pad_axis(v, 1, d.sp)
    bias = _group_heads(_pad_axis(_pad_axis(bias, 2, d.tp), 3, d.sp), d)
    mask = _group_heads(_pad_axis(_pad_axis(mask, 2, d.tp), 3, d.sp), d)
    aux = (q_len, kv_len, _pad_axis(q_seg, 1, d.tp), _pad_axis(kv_seg, 1, d.sp))
    return qg, k, v, bias, mask, aux


def _forward(q, k, v, bias, mask, aux, options: Options):
    d = _dims(q, k, options)
    qg, k, v, bias, mask, aux = _prepare(q, k, v, bias, mask, aux, d)

    def q_block(i):
        q_blk = jax.lax.dynamic_slice_in_dim(qg, i * d.bq, d.bq, axis=1)  # [B, bq, K, G, H]

        def kv_step(carry, j):
            run_max, run_sum, acc = carry  # [B,K,G,bq], [B,K,G,bq], [B,K,G,bq,H]
            k_blk = jax.lax.dynamic_slice_in_dim(k, j * d.bk, d.bk, axis=1)  # [B, bk, K, H]
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * d.bk, d.bk, axis=1)
            s, ok = _tile(q_blk, k_blk, bias, mask, aux, i, j, d, options)
            s = jnp.where(ok, s, -jnp.inf)
            new_max = jnp.maximum(run_max, jnp.max(s, axis=-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            p = jnp.exp(s - safe_max[..., None])  # 0 where masked
            alpha = jnp.exp(run_max - safe_max)  # 0 while nothing was seen
            run_sum = alpha * run_sum + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bkgqs,bskh->bkgqh", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32
            )
            return (new_max, run_sum, alpha[..., None] * acc + pv), None

        shape = (d.b, d.k, d.g, d.bq)
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, d.h)))
        (run_max, run_sum, acc), _ = jax.lax.scan(kv_step, init, jnp.arange(d.sp // d.bk))
        seen = run_sum > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, run_sum, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, run_max + jnp.log(jnp.where(seen, run_sum, 1.0)), -jnp.inf)
        return out, lse  # [B,K,G,bq,H], [B,K,G,bq]

    out, lse = jax.lax.map(q_block, jnp.arange(d.tp // d.bq))  # [nq, B, K, G, bq, (H)]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(d.b, d.tp, d.k * d.g, d.h)[:, : d.t]
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(d.b, d.k, d.g, d.tp)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def attention(q, k, v, bias, mask, aux, options: Options):
    """q [B,T,N,H], k/v [B,S,K,H]; bias/mask [B|1, N|1, T|1, S|1] or None;
    aux = (q_len [B] | None, kv_len [B] | None, q_seg [B,T] | None, kv_seg [B,S] | None)."""
    return _forward(q, k, v, bias, mask, aux, options)[0]


def _fwd(q, k, v, bias, mask, aux, options):
    out, lse = _forward(q, k, v, bias, mask, aux, options)
    return out, (q, k, v, bias, mask, aux, out, lse)


def _bwd(options, residuals, dout):
    q, k, v, bias, mask, aux, out, lse = residuals
    d = _dims(q, k, options)
    bias_shape = None if bias is None else bias.shape
    qg, kp, vp, bias_g, mask_g, aux_p = _prepare(q, k, v, bias, mask, aux, d)
    dog = _pad_axis(dout, 1, d.tp).reshape(d.b, d.tp, d.k, d.g, d.h)
    og = _pad_axis(out, 1, d.tp).reshape(d.b, d.tp, d.k, d.g, d.h)
    delta = jnp.einsum("btkgh,btkgh->bkgt", dog.astype(jnp.float32), og.astype(jnp.float32))
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def kv_block(carry, j):
        dq, dbias = carry
        k_blk = jax.lax.dynamic_slice_in_dim(kp, j * d.bk, d.bk, axis=1)
        v_blk = jax.lax.dynamic_slice_in_dim(vp, j * d.bk, d.bk, axis=1)

        def q_step(inner, i):
            dk_blk, dv_blk, dq, dbias = inner
            q_blk = jax.lax.dynamic_slice_in_dim(qg, i * d.bq, d.bq, axis=1)
            do_blk = jax.lax.dynamic_slice_in_dim(dog, i * d.bq, d.bq, axis=1)
            lse_blk = jax.lax.dynamic_slice_in_dim(lse_safe, i * d.bq, d.bq, axis=3)
            delta_blk = jax.lax.dynamic_slice_in_dim(delta, i * d.bq, d.bq, axis=3)
            s, ok = _tile(q_blk, k_blk, bias_g, mask_g, aux_p, i, j, d, options)
            p = jnp.where(ok, jnp.exp(s - lse_blk[..., None]), 0.0)  # [B,K,G,bq,bk]
            dv_blk += jnp.einsum("bkgqs,bqkgh->bskh", p, do_blk.astype(jnp.float32))
            dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None])
            if options.soft_cap is not None:
                ds = ds * (1.0 - jnp.square(s / options.soft_cap))
            if dbias is not None:
                dbias = _add_bias_grad(dbias, ds, i, j, d)
            ds = ds * options.scale
            dq_blk = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_blk.astype(jnp.float32))
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq,
                jax.lax.dynamic_slice_in_dim(dq, i * d.bq, d.bq, axis=1) + dq_blk,
                i * d.bq,
                axis=1,
            )
            dk_blk += jnp.einsum("bkgqs,bqkgh->bskh", ds, q_blk.astype(jnp.float32))
            return (dk_blk, dv_blk, dq, dbias), None

        zeros = jnp.zeros((d.b, d.bk, d.k, d.h), jnp.float32)
        (dk_blk, dv_blk, dq, dbias), _ = jax.lax.scan(
            q_step, (zeros, zeros, dq, dbias), jnp.arange(d.tp // d.bq)
        )
        return (dq, dbias), (dk_blk, dv_blk)

    dbias0 = None if bias is None else jnp.zeros(bias_g.shape, jnp.float32)
    (dq, dbias), (dk, dv) = jax.lax.scan(
        kv_block, (jnp.zeros(qg.shape, jnp.float32), dbias0), jnp.arange(d.sp // d.bk)
    )
    unblock = lambda x: x.transpose(1, 0, 2, 3, 4).reshape(d.b, d.sp, d.k, d.h)[:, : d.s]
    dq = dq.reshape(d.b, d.tp, d.k * d.g, d.h)[:, : d.t].astype(q.dtype)
    dk, dv = unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)
    if dbias is not None:
        dbias = dbias.reshape(dbias.shape[0], -1, *dbias.shape[3:])
        dbias = dbias[:, :, : bias_shape[2], : bias_shape[3]].astype(bias.dtype)
    return dq, dk, dv, dbias, None, None


def _add_bias_grad(dbias, ds, i, j, d: _Dims):
    """Adds the tile's d_logits [B,K,G,bq,bk], reduced over bias's broadcast dims."""
    reduce_axes = tuple(ax for ax, size in enumerate(dbias.shape) if size == 1)
    tile = jnp.sum(ds, axis=reduce_axes, keepdims=True)
    starts = [
        0,
        0,
        0,
        i * d.bq if dbias.shape[3] != 1 else 0,
        j * d.bk if dbias.shape[4] != 1 else 0,
    ]
    current = jax.lax.dynamic_slice(dbias, starts, tile.shape)
    return jax.lax.dynamic_update_slice(dbias, current + tile, starts)


attention.defvjp(_fwd, _bwd)
