"""RMSNorm as Mosaic TPU kernels: a forward kernel and a backward kernel.

Layout: x is flattened to [R, D]. The grid walks row blocks of
``block_rows``; each tile spans the whole feature axis, so a row's statistics
never leave VMEM. The last row block may be ragged: Pallas pads its reads and
masks its writes, and the backward masks the padded rows out of dscale.

The backward recomputes the row statistics from x (one extra reduction over D
on data already in VMEM) rather than writing and re-reading them from HBM.
dscale is reduced in two stages: each grid step writes the [1, D] partial sum
of its rows and XLA adds the ``num_blocks`` partials. The grid therefore stays
"parallel" (both TensorCores of a megacore chip share it) and the sum order is
fixed, so reruns are bit-identical.
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
from pallax.kernels.rms_norm import xla
from pallax.kernels.rms_norm.config import RmsNormBlockSizes


@dataclasses.dataclass(frozen=True)
class Options:
    eps: float
    scale_offset: float
    block_sizes: RmsNormBlockSizes
    interpret: InterpretConfig | None


def _scale_f32(scale_ref, scale_offset: float) -> jax.Array:
    return scale_ref[...].astype(jnp.float32) + scale_offset  # [1, D]


def _forward_kernel(x_ref, scale_ref, y_ref, *, eps: float, scale_offset: float):
    # x_ref, y_ref: [block_rows, D]; scale_ref: [1, D]
    y = xla.forward_rows(x_ref[...].astype(jnp.float32), _scale_f32(scale_ref, scale_offset), eps)
    y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(
    x_ref, scale_ref, dy_ref, dx_ref, dscale_ref, *, eps, scale_offset, rows, block_rows
):
    # x_ref, dy_ref, dx_ref: [block_rows, D]; scale_ref: [1, D]; dscale_ref: [1, D] (f32)
    dx, dscale_rows = xla.backward_rows(
        x_ref[...].astype(jnp.float32),
        _scale_f32(scale_ref, scale_offset),
        dy_ref[...].astype(jnp.float32),
        eps,
    )
    dx_ref[...] = dx.astype(dx_ref.dtype)
    if rows % block_rows:
        # Rows past the end of the last block hold unspecified data (NaN in the
        # interpreter): select them away rather than multiply by a mask.
        row = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(
            jnp.int32, (block_rows, 1), 0
        )
        dscale_rows = jnp.where(row < rows, dscale_rows, 0.0)
    dscale_ref[...] = jnp.sum(dscale_rows, axis=0, keepdims=True)


def _row_specs(block_rows: int, dim: int):
    row_block = pl.BlockSpec((block_rows, dim), lambda i: (i, 0))
    whole_scale = pl.BlockSpec((1, dim), lambda i: (0, 0))
    return row_block, whole_scale


def _forward(x: jax.Array, scale: jax.Array, options: Options) -> jax.Array:
    rows, dim = x.shape
    block_rows = options.block_sizes.block_rows
    row_block, whole_scale = _row_specs(block_rows, dim)
    kernel = functools.partial(_forward_kernel, eps=options.eps, scale_offset=options.scale_offset)
    itemsize = x.dtype.itemsize
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[row_block, whole_scale],
        out_specs=row_block,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=pl.CostEstimate(
            flops=4 * rows * dim,
            transcendentals=rows,
            bytes_accessed=2 * rows * dim * itemsize + dim * scale.dtype.itemsize,
        ),
        interpret=tpu_interpret_params(options.interpret),
        name="pallax_rms_norm_fwd",
    )(x, scale.reshape(1, dim))


def _backward(x, scale, dy, options: Options) -> tuple[jax.Array, jax.Array]:
    rows, dim = x.shape
    block_rows = options.block_sizes.block_rows
    num_blocks = pl.cdiv(rows, block_rows)
    row_block, whole_scale = _row_specs(block_rows, dim)
    kernel = functools.partial(
        _backward_kernel,
        eps=options.eps,
        scale_offset=options.scale_offset,
        rows=rows,
        block_rows=block_rows,
    )
    itemsize = x.dtype.itemsize
    dx, dscale_partial = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((num_blocks, 1, dim), jnp.float32),
        ),
        grid=(num_blocks,),
        in_specs=[row_block, whole_scale, row_block],
        out_specs=(row_block, pl.BlockSpec((None, 1, dim), lambda i: (i, 0, 0))),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=pl.CostEstimate(
            flops=10 * rows * dim,
            transcendentals=rows,
            bytes_accessed=3 * rows * dim * itemsize + (num_blocks + 1) * dim * 4,
        ),
        interpret=tpu_interpret_params(options.interpret),
        name="pallax_rms_norm_bwd",
    )(x, scale.reshape(1, dim), dy)
    dscale = jnp.sum(dscale_partial[:, 0, :], axis=0)  # [num_blocks, D] -> [D]
    return dx, dscale.astype(scale.dtype)


# Rows (every leading dimension) shard over any mesh axes; the kernels see each
# device's rows flattened to [R, D]. The normalised axis may be sharded too: the
# kernel needs whole rows, so such a shard computes XLA's row formula on its slice
# with the row sums all-reduced across the axis (no kernel, no gather).


def _rules(ndim: int) -> tuple[Rule, Rule]:
    x = " ".join(f"r{i}" for i in range(ndim - 1)) + " d"
    forward = Rule("rms_norm", (x, "d"), (x,), ("x", "scale"), with_plan=True)
    backward = Rule(  # dscale lacks the rows: summed over the devices that split them
        "rms_norm (backward)", (x, "d", x), (x, "d"), ("x", "scale", "dy"), with_plan=True
    )
    return forward, backward


def _row_sum(v, axes):
    """Sum over the last axis of the whole (possibly sharded) feature axis."""
    total = jnp.sum(v, axis=-1, keepdims=True)
    return jax.lax.psum(total, axes) if axes else total


def _split_forward(x, scale, options, axes):
    dim = x.shape[-1] * jax.lax.psum(1, axes)
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(_row_sum(x32 * x32, axes) / dim + options.eps)
    return (x32 * rstd * (scale.astype(jnp.float32) + options.scale_offset)).astype(x.dtype)


def _split_backward(x, scale, dy, options, axes):
    dim = x.shape[-1] * jax.lax.psum(1, axes)
    x32, dy32 = x.astype(jnp.float32), dy.astype(jnp.float32)
    rstd = jax.lax.rsqrt(_row_sum(x32 * x32, axes) / dim + options.eps)
    x_hat, g = x32 * rstd, dy32 * (scale.astype(jnp.float32) + options.scale_offset)
    dx = rstd * (g - x_hat * _row_sum(g * x_hat, axes) / dim)
    dscale = jnp.sum((dy32 * x_hat).reshape(-1, x.shape[-1]), axis=0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


def _sharded_forward(x, scale, options):
    def local(x, scale, *, plan):
        if plan.get("d"):
            return (_split_forward(x, scale, options, plan["d"]),)
        return (_forward(x.reshape(-1, x.shape[-1]), scale, options).reshape(x.shape),)

    return per_shard(local, _rules(x.ndim)[0], x, scale, interpret=options.interpret, tpu=True)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, options: Options) -> jax.Array:
    """x: [..., D], scale: [D] -> x's shape and dtype; the kernels run per shard of the
    rows, on each device's rows flattened to [R, D]."""
    return _sharded_forward(x, scale, options)


def _fwd(x, scale, options):
    return _sharded_forward(x, scale, options), (x, scale)


def _bwd(options, residuals, dy):
    x, scale = residuals

    def local(x, scale, dy, *, plan):
        if plan.get("d"):
            return _split_backward(x, scale, dy, options, plan["d"])
        dx, dscale = _backward(
            x.reshape(-1, x.shape[-1]), scale, dy.reshape(-1, dy.shape[-1]), options
        )
        return dx.reshape(x.shape), dscale

    grads = per_shard(local, _rules(x.ndim)[1], x, scale, dy, interpret=options.interpret, tpu=True)
    return like_operands(grads, (x, scale))


rms_norm.defvjp(_fwd, _bwd)
