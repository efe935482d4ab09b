"""RMSNorm forward as a Mosaic GPU (Hopper) kernel.

Each CTA runs one warpgroup that owns 64 rows (``block_rows``) in the WGMMA
register layout, where a row reduction is a shuffle within four threads. The
feature axis is walked in chunks of ``block_cols`` columns, copied GMEM -> SMEM
with TMA:

  pass 1: sum of squares of every chunk, accumulated in f32 per row;
  pass 2: each chunk again, scaled by rsqrt(mean + eps) * scale, stored SMEM -> GMEM by TMA.

When one chunk spans the whole row (D == block_cols), pass 2 reuses the SMEM
tile and x is read from HBM once. Otherwise x is read twice: the second read of
a 64-row block usually hits L2, but the kernel then moves 3 bytes of HBM traffic
per 2 needed in the worst case. The copies are not yet double-buffered (one TMA
in flight per CTA); occupancy (several CTAs per SM) hides part of the latency.

Rows not divisible by 64: the last CTA's window is moved back to end at row R,
so it overlaps the previous block and writes identical values to the overlap
(rows are independent); inputs shorter than 64 rows are padded by the wrapper.
When R is not a multiple of 8 that window starts at a row offset that is not
either, and the SMEM tile cannot be tiled in 8-row units (TMA between tiled SMEM
and GMEM needs both the offset and R to be multiples of 8): the tile stays
untiled and is read into registers by Mosaic GPU's general (not bank-conflict-free)
load, the only one layout inference admits for it.

The backward is XLA's (``xla.rms_norm_backward``): a memory-bound fusion that
recomputes the statistics.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels._dispatch import InterpretConfig
from pallax.kernels._partition import Rule, per_shard
from pallax.kernels.rms_norm import xla
from pallax.kernels.rms_norm.config import GPU_BLOCK_ROWS, RmsNormBlockSizes


@dataclasses.dataclass(frozen=True)
class Options:
    eps: float
    scale_offset: float
    block_sizes: RmsNormBlockSizes
    interpret: InterpretConfig | None


def unsupported_reason(dim: int, dtype) -> str | None:
    """Why this kernel cannot take a [R, dim] input of ``dtype`` (None if it can)."""
    if dim % 64:
        return f"the feature axis x.shape[-1]={dim} must be a multiple of 64 (WGMMA tiles and TMA)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"x.dtype={jnp.dtype(dtype)} must be float32 or bfloat16"
    return None


def _forward_padded(x: jax.Array, scale: jax.Array, options: Options) -> jax.Array:
    rows, dim = x.shape  # rows >= GPU_BLOCK_ROWS
    block_rows = GPU_BLOCK_ROWS
    block_cols = options.block_sizes.block_cols
    num_chunks = dim // block_cols
    eps, offset = options.eps, options.scale_offset
    aligned = rows % 8 == 0  # else the x tile is untiled SMEM (see the docstring)
    row_layout = plgpu.Layout.WGMMA.reduce(1)  # [block_rows] vector, one value per row
    col_layout = plgpu.Layout.WGMMA.reduce(0)  # [block_cols] vector broadcast over rows

    def body(x_gmem, scale_gmem, y_gmem):
        # x_gmem, y_gmem: [R, D] in GMEM; scale_gmem: [D]
        first_row = jnp.minimum(jax.lax.axis_index("rows") * block_rows, rows - block_rows)

        def scoped(x_smem, scale_smem, barriers):
            # x_smem: [block_rows, block_cols]; scale_smem: [block_cols]
            def window(c):
                return (pl.ds(first_row, block_rows), pl.ds(c * block_cols, block_cols))

            def load_chunk(c):
                plgpu.copy_gmem_to_smem(x_gmem.at[window(c)], x_smem, barriers.at[0])
                plgpu.barrier_wait(barriers.at[0])
                tile = plgpu.load(x_smem, layout=plgpu.Layout.WGMMA, optimized=aligned)
                return tile.astype(jnp.float32)

            def sum_squares(c, acc):
                x_tile = load_chunk(c)  # [block_rows, block_cols] f32
                return acc + jnp.sum(x_tile * x_tile, axis=1)

            zeros = plgpu.layout_cast(jnp.zeros((block_rows,), jnp.float32), row_layout)
            if num_chunks == 1:
                x_tile = load_chunk(0)
                sum_sq = jnp.sum(x_tile * x_tile, axis=1) + zeros
            else:
                sum_sq = jax.lax.fori_loop(0, num_chunks, sum_squares, zeros)
            rstd = jax.lax.rsqrt(sum_sq / dim + eps)  # [block_rows]
            rstd = jax.lax.broadcast_in_dim(rstd, (block_rows, block_cols), (0,))

            def normalize(c, carry):
                tile = x_tile if num_chunks == 1 else load_chunk(c)
                plgpu.copy_gmem_to_smem(
                    scale_gmem.at[pl.ds(c * block_cols, block_cols)], scale_smem, barriers.at[1]
                )
                plgpu.barrier_wait(barriers.at[1])
                s = plgpu.load(scale_smem, layout=col_layout).astype(jnp.float32) + offset
                y = tile * rstd * jax.lax.broadcast_in_dim(s, (block_rows, block_cols), (1,))
                x_smem[...] = y.astype(x_smem.dtype)  # reuse the input tile as the output tile
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(x_smem, y_gmem.at[window(c)])
                # The next chunk's TMA load overwrites x_smem: the store must have read it.
                plgpu.wait_smem_to_gmem(0)
                return carry

            if num_chunks == 1:
                normalize(0, None)
            else:
                jax.lax.fori_loop(0, num_chunks, normalize, None)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((block_rows, block_cols), x.dtype),
            plgpu.SMEM((block_cols,), scale.dtype),
            plgpu.Barrier(num_barriers=2),
        )

    interpret = (
        plgpu.InterpretGPUParams(detect_races=options.interpret.detect_races)
        if options.interpret is not None
        else None
    )
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((rows, dim), x.dtype),
        grid=(pl.cdiv(rows, block_rows),),
        grid_names=("rows",),
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )
    return kernel(x, scale)


def _forward(x: jax.Array, scale: jax.Array, options: Options) -> jax.Array:
    rows = x.shape[0]
    if rows >= GPU_BLOCK_ROWS:
        return _forward_padded(x, scale, options)
    # Fewer rows than one warpgroup tile: pad (zero rows normalise to zero).
    x_padded = jnp.pad(x, ((0, GPU_BLOCK_ROWS - rows), (0, 0)))
    return _forward_padded(x_padded, scale, options)[:rows]


# Rows shard over any mesh axes; the normalised axis must be whole on each device.
FORWARD_RULE = Rule(
    "rms_norm", ("r d", "d"), ("r d",), ("x", "scale"), (("d", "the normalised feature axis"),)
)


def _sharded_forward(x, scale, options):
    fn = lambda x, scale: (_forward(x, scale, options),)
    return per_shard(fn, FORWARD_RULE, x, scale, interpret=options.interpret, gpu=True)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, options: Options) -> jax.Array:
    """x: [R, D], scale: [D] -> [R, D] in x.dtype; the kernel runs per shard of the rows
    (the backward is XLA's, partitioned by XLA)."""
    return _sharded_forward(x, scale, options)


def _fwd(x, scale, options):
    return _sharded_forward(x, scale, options), (x, scale)


def _bwd(options, residuals, dy):
    x, scale = residuals
    return xla.rms_norm_backward(
        x, scale, dy, xla.Options(eps=options.eps, scale_offset=options.scale_offset)
    )


rms_norm.defvjp(_fwd, _bwd)
