"""Flash attention as Mosaic TPU kernels: the forward kernel and the wiring.

Forward, grid (B, K, T/bq, S/bk), the last axis "arbitrary": online softmax
over key blocks with f32 running max, sum and output in VMEM scratch; writes
the output and the log-sum-exp the backward recomputes from. The backward
kernels are in ``pallas_tpu_bwd.py``; the shared tile math in ``_tpu_tiles.py``.

Sequence lengths travel as scalar prefetch ([B, 2] int32 in SMEM). Dense bias
and mask arrays are tiled like the logits; their broadcast dims stay size 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.kernels._dispatch import tpu_interpret_params
from pallax.kernels.attention import _tpu_tiles as tiles
from pallax.kernels.attention.masks import online_softmax_step
from pallax.kernels.attention.xla import Options


def static_of(q, k, bias, mask, segments, options: Options) -> tiles.Static:
    _, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    return tiles.Static(
        t=t,
        s=s,
        g=n // kh,
        h=h,
        bq=options.block_q,
        bk=options.block_kv,
        scale=options.scale,
        spec=options.spec,
        soft_cap=options.soft_cap,
        has_bias=bias is not None,
        has_mask=mask is not None,
        has_segments=segments,
    )


def grouped(x, kh):
    """[B, T, N, H] -> [B, K, G, T, H]."""
    b, t, n, h = x.shape
    return x.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)


def ungrouped(x):
    """[B, K, G, T, H] -> [B, T, N, H]."""
    b, kh, g, t, h = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, h)


def dense_to_tiles(x, kh):
    """[B|1, N|1, T|1, S|1] -> [B|1, K|1, G|1, T|1, S|1]."""
    if x is None:
        return None
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kh, x.shape[1] // kh, *x.shape[2:])


def inputs_and_specs(
    st: tiles.Static, q5, k4, v4, bias5, mask5, segs, *, kv_axis, q_axis, clamp_kv: bool, extra=()
):
    """Operands and BlockSpecs for a grid whose axes are (b, kh, <q_axis/kv_axis>...).

    kv_axis / q_axis: grid positions of the key-block and query-block indices.
    clamp_kv: whether the key block follows the query block's range (forward, dq)
    or the query block follows the key block's (dkv).
    """

    def blocks(grid):
        i, j = grid[q_axis], grid[kv_axis]
        if clamp_kv:
            j = tiles.clamp(j, *st.kv_range(i))
        else:
            i = tiles.clamp(i, *st.q_range(j))
        return grid[0], grid[1], i, j

    q_spec = pl.BlockSpec(
        (None, None, st.g, st.bq, st.h),
        lambda *g: (lambda b, kh, i, j: (b, kh, 0, i, 0))(*blocks(g)),
    )
    kv_spec = pl.BlockSpec(
        (None, None, st.bk, st.h), lambda *g: (lambda b, kh, i, j: (b, kh, j, 0))(*blocks(g))
    )
    names, operands, specs = ["q", "k", "v"], [q5, k4, v4], [q_spec, kv_spec, kv_spec]
    for name, x in (("bias", bias5), ("mask", mask5)):
        if x is None:
            continue

        def index(*g, x=x):
            b, kh, i, j = blocks(g)
            return (
                b if x.shape[0] > 1 else 0,
                kh if x.shape[1] > 1 else 0,
                0,
                i if x.shape[3] > 1 else 0,
                j if x.shape[4] > 1 else 0,
            )

        block = (
            None,
            None,
            x.shape[2],
            st.bq if x.shape[3] > 1 else 1,
            st.bk if x.shape[4] > 1 else 1,
        )
        names.append(name)
        operands.append(x)
        specs.append(pl.BlockSpec(block, index))
    if segs is not None:
        q_seg, kv_seg = segs  # [B, T, 1], [B, 1, S]
        names += ["q_seg", "kv_seg"]
        operands += [q_seg, kv_seg]
        specs += [
            pl.BlockSpec((None, st.bq, 1), lambda *g: (lambda b, kh, i, j: (b, i, 0))(*blocks(g))),
            pl.BlockSpec((None, 1, st.bk), lambda *g: (lambda b, kh, i, j: (b, 0, j))(*blocks(g))),
        ]
    for name, x, kind in extra:
        names.append(name)
        operands.append(x)
        if kind == "q_rows":  # [B, K, G, T, X] tiled like q
            specs.append(
                pl.BlockSpec(
                    (None, None, st.g, st.bq, x.shape[-1]),
                    lambda *g: (lambda b, kh, i, j: (b, kh, 0, i, 0))(*blocks(g)),
                )
            )
    return names, operands, specs


def _forward_kernel(lengths_ref, *refs, st: tiles.Static, names):
    refs_in = dict(zip(names, refs[: len(names)], strict=True))
    refs_in["lengths"] = lengths_ref
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[len(names) :]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    first, last = st.kv_range(i)

    @pl.when((j >= first) & (j <= last))
    def _compute():
        s, ok, _ = tiles.tile(st, refs_in, b, i, j)  # [G*bq, bk]
        v = tiles.masked_value(st, refs_in["v"][...], j)
        online_softmax_step(m_sc, l_sc, acc_sc, jnp.where(ok, s, -jnp.inf), v)

    @pl.when(j == st.nk - 1)
    def _finish():
        total = l_sc[...]
        seen = total > 0
        out = jnp.where(seen, acc_sc[...] / jnp.where(seen, total, 1.0), 0.0)
        o_ref[...] = out.reshape(st.g, st.bq, st.h).astype(o_ref.dtype)
        lse = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
        lse_ref[...] = lse.reshape(st.g, st.bq, 1)


def compiler_params(options: Options) -> pltpu.CompilerParams:
    """Grid (b, kh, outer block, inner block): the inner loop carries the accumulators."""
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=options.vmem_limit_bytes,
    )


def interpret_params(options: Options):
    return tpu_interpret_params(options.interpret)


def lengths_of(aux, b, t, s):
    q_len, kv_len = aux[0], aux[1]
    q_len = jnp.full((b,), t, jnp.int32) if q_len is None else jnp.clip(q_len, 0, t)
    kv_len = jnp.full((b,), s, jnp.int32) if kv_len is None else jnp.clip(kv_len, 0, s)
    return jnp.stack([q_len, kv_len], axis=1).astype(jnp.int32)  # [B, 2]


def segments_of(aux):
    if aux[2] is None:
        return None
    return aux[2][:, :, None], aux[3][:, None, :]  # [B, T, 1], [B, 1, S]


def forward(q, k, v, bias, mask, aux, options: Options):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    segs = segments_of(aux)
    st = static_of(q, k, bias, mask, segs is not None, options)
    q5, k4, v4 = grouped(q, kh), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    bias5 = dense_to_tiles(bias, kh)
    mask5 = None if mask is None else dense_to_tiles(mask.astype(jnp.int32), kh)
    names, operands, specs = inputs_and_specs(
        st, q5, k4, v4, bias5, mask5, segs, q_axis=2, kv_axis=3, clamp_kv=True
    )
    out_spec = pl.BlockSpec(
        (None, None, st.g, st.bq, st.h), lambda b, kh, i, j, *_: (b, kh, 0, i, 0)
    )
    lse_spec = pl.BlockSpec((None, None, st.g, st.bq, 1), lambda b, kh, i, j, *_: (b, kh, 0, i, 0))
    rows = st.g * st.bq
    o5, lse = pl.pallas_call(
        functools.partial(_forward_kernel, st=st, names=tuple(names)),
        out_shape=(
            jax.ShapeDtypeStruct(q5.shape, q.dtype),
            jax.ShapeDtypeStruct((b, kh, st.g, t, 1), jnp.float32),
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kh, st.nq, st.nk),
            in_specs=specs,
            out_specs=(out_spec, lse_spec),
            scratch_shapes=[
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, st.h), jnp.float32),
            ],
        ),
        compiler_params=compiler_params(options),
        cost_estimate=pl.CostEstimate(
            flops=4 * b * n * t * s * h,
            transcendentals=b * n * t * s,
            bytes_accessed=2 * q.nbytes + k.nbytes * st.nq * 2,
        ),
        interpret=interpret_params(options),
        name="pallax_flash_attention_fwd",
    )(lengths_of(aux, b, t, s), *operands)
    return ungrouped(o5), lse
