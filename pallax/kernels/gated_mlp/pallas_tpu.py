"""The gated MLP as Mosaic TPU kernels; the [T, F] hidden exists only as VMEM tiles.

  forward   grid (row blocks i, F blocks f):  g = x_i @ Wg_f, u = x_i @ Wu_f,
            h = act(g) * u, y_i += h @ Wd_f   (f32 accumulator, F axis "arbitrary")
  dx        grid (i, f):  recompute g, u; dh = dy_i @ Wd_f.T; dg = dh * u * act'(g),
            du = dh * act(g); dx_i += dg @ Wg_f.T + du @ Wu_f.T
  dW        grid (f, i):  the same tile; dWg_f += x_i.T @ dg, dWu_f += x_i.T @ du,
            dWd_f += h.T @ dy_i   (row axis "arbitrary")

x is read once per F block and never written back as [T, F]: the backward
recomputes both projections (2 extra matmuls per kernel) rather than storing
any [T, F] activation. Ragged edges are masked inside: rows past T (x and dy)
and F columns past F (of Wg, Wu and rows of Wd) are zeroed before they reach a
matmul, since their contents are unspecified.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.kernels._dispatch import InterpretConfig, tpu_interpret_params
from pallax.kernels._partition import Rule, like_operands, per_shard
from pallax.kernels.gated_mlp.activations import activation_and_grad
from pallax.kernels.gated_mlp.config import GatedMlpBlockSizes

_NT = (((1,), (1,)), ((), ()))  # a [m, k] x b [n, k] -> [m, n]
_TN = (((0,), (0,)), ((), ()))  # a [k, m] x b [k, n] -> [m, n]


@dataclasses.dataclass(frozen=True)
class Options:
    activation: str
    block_sizes: GatedMlpBlockSizes
    interpret: InterpretConfig | None


def _masked_tiles(x_ref, wg_ref, wu_ref, wd_ref, dy_ref, i, f, *, rows, ff):
    bm, bf = x_ref.shape[0], wg_ref.shape[1]
    x, wg, wu, wd = x_ref[...], wg_ref[...], wu_ref[...], wd_ref[...]
    dy = None if dy_ref is None else dy_ref[...]
    if rows % bm:
        row_ok = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < rows
        x = jnp.where(row_ok, x, 0)
        dy = None if dy is None else jnp.where(row_ok, dy, 0)
    if ff % bf:
        col_ok = f * bf + jax.lax.broadcasted_iota(jnp.int32, (1, bf), 1) < ff
        wg, wu = jnp.where(col_ok, wg, 0), jnp.where(col_ok, wu, 0)
        wd = jnp.where(f * bf + jax.lax.broadcasted_iota(jnp.int32, (bf, 1), 0) < ff, wd, 0)
    return x, wg, wu, wd, dy


def _tile(x, wg, wu, activation):
    gate = jnp.dot(x, wg, preferred_element_type=jnp.float32)  # [bm, bf]
    up = jnp.dot(x, wu, preferred_element_type=jnp.float32)  # [bm, bf]
    act, dact = activation_and_grad(activation, gate)
    return up, act, dact


def _forward_kernel(x_ref, wg_ref, wu_ref, wd_ref, y_ref, acc, *, activation, rows, ff):
    i, f = pl.program_id(0), pl.program_id(1)

    @pl.when(f == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    x, wg, wu, wd, _ = _masked_tiles(x_ref, wg_ref, wu_ref, wd_ref, None, i, f, rows=rows, ff=ff)
    up, act, _ = _tile(x, wg, wu, activation)
    acc[...] += jnp.dot((act * up).astype(wd.dtype), wd, preferred_element_type=jnp.float32)

    @pl.when(f == pl.num_programs(1) - 1)
    def _finish():
        y_ref[...] = acc[...].astype(y_ref.dtype)


def _grads_of_tile(x, wg, wu, wd, dy, activation):
    up, act, dact = _tile(x, wg, wu, activation)
    dhidden = jax.lax.dot_general(dy, wd, _NT, preferred_element_type=jnp.float32)  # [bm, bf]
    return act * up, dhidden * up * dact, dhidden * act  # hidden, d_gate, d_up


def _dx_kernel(x_ref, wg_ref, wu_ref, wd_ref, dy_ref, dx_ref, acc, *, activation, rows, ff):
    i, f = pl.program_id(0), pl.program_id(1)

    @pl.when(f == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    x, wg, wu, wd, dy = _masked_tiles(x_ref, wg_ref, wu_ref, wd_ref, dy_ref, i, f, rows=rows, ff=ff)
    _, dgate, dup = _grads_of_tile(x, wg, wu, wd, dy, activation)
    acc[...] += jax.lax.dot_general(
        dgate.astype(wg.dtype), wg, _NT, preferred_element_type=jnp.float32
    )
    acc[...] += jax.lax.dot_general(
        dup.astype(wu.dtype), wu, _NT, preferred_element_type=jnp.float32
    )

    @pl.when(f == pl.num_programs(1) - 1)
    def _finish():
        dx_ref[...] = acc[...].astype(dx_ref.dtype)


def _dw_kernel(
    x_ref,
    wg_ref,
    wu_ref,
    wd_ref,
    dy_ref,
    dwg_ref,
    dwu_ref,
    dwd_ref,
    acc_g,
    acc_u,
    acc_d,
    *,
    activation,
    rows,
    ff,
):
    f, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        for acc in (acc_g, acc_u, acc_d):
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

    x, wg, wu, wd, dy = _masked_tiles(x_ref, wg_ref, wu_ref, wd_ref, dy_ref, i, f, rows=rows, ff=ff)
    hidden, dgate, dup = _grads_of_tile(x, wg, wu, wd, dy, activation)
    acc_g[...] += jax.lax.dot_general(
        x, dgate.astype(x.dtype), _TN, preferred_element_type=jnp.float32
    )  # [D, bf]
    acc_u[...] += jax.lax.dot_general(
        x, dup.astype(x.dtype), _TN, preferred_element_type=jnp.float32
    )
    acc_d[...] += jax.lax.dot_general(
        hidden.astype(dy.dtype), dy, _TN, preferred_element_type=jnp.float32
    )  # [bf, D]

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dwg_ref[...] = acc_g[...].astype(dwg_ref.dtype)
        dwu_ref[...] = acc_u[...].astype(dwu_ref.dtype)
        dwd_ref[...] = acc_d[...].astype(dwd_ref.dtype)


def _specs(bm, bf, dim, row_axis, ff_axis):
    r = lambda *g: g[row_axis]
    c = lambda *g: g[ff_axis]
    rows = pl.BlockSpec((bm, dim), lambda *g: (r(*g), 0))
    w_in = pl.BlockSpec((dim, bf), lambda *g: (0, c(*g)))
    w_out = pl.BlockSpec((bf, dim), lambda *g: (c(*g), 0))
    return rows, w_in, w_out


def _call(kernel, out_shape, grid, in_specs, out_specs, scratch, options, name, flops, nbytes):
    interpret = tpu_interpret_params(options.interpret)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
        interpret=interpret,
        name=name,
    )


def _forward(x, w_gate, w_up, w_down, options: Options):
    (rows, dim), ff = x.shape, w_gate.shape[1]
    bm, bf = options.block_sizes.block_rows, options.block_sizes.block_ff
    grid = (pl.cdiv(rows, bm), pl.cdiv(ff, bf))
    row_spec, w_in, w_out = _specs(bm, bf, dim, 0, 1)
    kernel = functools.partial(_forward_kernel, activation=options.activation, rows=rows, ff=ff)
    weights = w_gate.nbytes + w_up.nbytes + w_down.nbytes
    return _call(
        kernel,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid,
        [row_spec, w_in, w_in, w_out],
        row_spec,
        [pltpu.VMEM((bm, dim), jnp.float32)],
        options,
        "pallax_gated_mlp_fwd",
        6 * rows * dim * ff,
        2 * x.nbytes + weights * grid[0],
    )(x, w_gate, w_up, w_down)


def _backward(x, w_gate, w_up, w_down, dy, options: Options):
    (rows, dim), ff = x.shape, w_gate.shape[1]
    bm, bf = options.block_sizes.block_rows, options.block_sizes.block_ff
    n_rows, n_ff = pl.cdiv(rows, bm), pl.cdiv(ff, bf)
    statics = dict(activation=options.activation, rows=rows, ff=ff)
    weights = w_gate.nbytes + w_up.nbytes + w_down.nbytes
    args = (x, w_gate, w_up, w_down, dy)

    row_spec, w_in, w_out = _specs(bm, bf, dim, 0, 1)
    dx = _call(
        functools.partial(_dx_kernel, **statics),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        (n_rows, n_ff),
        [row_spec, w_in, w_in, w_out, row_spec],
        row_spec,
        [pltpu.VMEM((bm, dim), jnp.float32)],
        options,
        "pallax_gated_mlp_dx",
        10 * rows * dim * ff,
        3 * x.nbytes + weights * n_rows,
    )(*args)

    row_spec, w_in, w_out = _specs(bm, bf, dim, 1, 0)
    dwg, dwu, dwd = _call(
        functools.partial(_dw_kernel, **statics),
        (
            jax.ShapeDtypeStruct(w_gate.shape, w_gate.dtype),
            jax.ShapeDtypeStruct(w_up.shape, w_up.dtype),
            jax.ShapeDtypeStruct(w_down.shape, w_down.dtype),
        ),
        (n_ff, n_rows),
        [row_spec, w_in, w_in, w_out, row_spec],
        (w_in, w_in, w_out),
        [
            pltpu.VMEM((dim, bf), jnp.float32),
            pltpu.VMEM((dim, bf), jnp.float32),
            pltpu.VMEM((bf, dim), jnp.float32),
        ],
        options,
        "pallax_gated_mlp_dw",
        12 * rows * dim * ff,
        2 * x.nbytes * n_ff + 2 * weights,
    )(*args)
    return dx, dwg, dwu, dwd


# Rows shard over any axes; d_ff over any (Megatron: each device computes the
# partial output of its F slice, summed across them); d_model must be whole.
_UNSHARDABLE = (("d", "d_model"),)
_NAMES = ("x", "w_gate", "w_up", "w_down")
FORWARD_RULE = Rule("gated_mlp", ("r d", "d f", "d f", "f d"), ("r d",), _NAMES, _UNSHARDABLE)
BACKWARD_RULE = Rule(
    "gated_mlp (backward)",
    ("r d", "d f", "d f", "f d", "r d"),
    ("r d", "d f", "d f", "f d"),  # dx summed over F's devices, dW over the rows'
    (*_NAMES, "dy"),
    _UNSHARDABLE,
)


def _sharded_forward(x, w_gate, w_up, w_down, options):
    fn = lambda *args: (_forward(*args, options),)
    return per_shard(
        fn, FORWARD_RULE, x, w_gate, w_up, w_down, interpret=options.interpret, tpu=True
    )[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gated_mlp(x, w_gate, w_up, w_down, options: Options):
    """x [T, D], w_gate/w_up [D, F], w_down [F, D] -> [T, D] in x.dtype."""
    return _sharded_forward(x, w_gate, w_up, w_down, options)


def _fwd(x, w_gate, w_up, w_down, options):
    return _sharded_forward(x, w_gate, w_up, w_down, options), (x, w_gate, w_up, w_down)


def _bwd(options, residuals, dy):
    fn = lambda *args: _backward(*args, options)
    grads = per_shard(fn, BACKWARD_RULE, *residuals, dy, interpret=options.interpret, tpu=True)
    return like_operands(grads, residuals)


gated_mlp.defvjp(_fwd, _bwd)
