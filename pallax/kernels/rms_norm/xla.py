"""RMSNorm as an XLA fusion with a hand-written backward.

The backward saves only the inputs and recomputes the row statistics (one
reduction over D), instead of autodiff's f32 intermediates. The row math here
is shared: the Pallas TPU kernels call ``forward_rows``/``backward_rows`` on
their VMEM tiles, and the Mosaic GPU path uses this backward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Options:
    eps: float
    scale_offset: float


def forward_rows(x_f32: jax.Array, scale_f32: jax.Array, eps: float) -> jax.Array:
    """x_f32: [R, D], scale_f32: [1, D] (offset included) -> y: [R, D] in f32."""
    mean_sq = jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True)  # [R, 1]
    return x_f32 * jax.lax.rsqrt(mean_sq + eps) * scale_f32


def backward_rows(
    x_f32: jax.Array, scale_f32: jax.Array, dy_f32: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """Returns (dx [R, D], per-row dscale contributions [R, D]), all f32.

    With r = rsqrt(mean(x²) + eps) and g = dy * scale:
      dx = r * g - x * r³ * mean(g * x),   dscale = Σ_rows dy * x * r.
    """
    dim = x_f32.shape[-1]
    rstd = jax.lax.rsqrt(jnp.sum(x_f32 * x_f32, axis=-1, keepdims=True) / dim + eps)  # [R, 1]
    x_hat = x_f32 * rstd
    g = dy_f32 * scale_f32
    dx = rstd * (g - x_hat * (jnp.sum(g * x_hat, axis=-1, keepdims=True) / dim))
    return dx, dy_f32 * x_hat


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, options: Options) -> jax.Array:
    """x: [R, D], scale: [D] -> [R, D] in x.dtype."""
    scale_f32 = scale.astype(jnp.float32)[None, :] + options.scale_offset
    return forward_rows(x.astype(jnp.float32), scale_f32, options.eps).astype(x.dtype)


def _fwd(x, scale, options):
    return rms_norm(x, scale, options), (x, scale)


def _bwd(options, residuals, dy):
    x, scale = residuals
    return rms_norm_backward(x, scale, dy, options)


def rms_norm_backward(x, scale, dy, options: Options) -> tuple[jax.Array, jax.Array]:
    """(dx [R, D] in x.dtype, dscale [D] in scale.dtype)."""
    scale_f32 = scale.astype(jnp.float32)[None, :] + options.scale_offset
    dx, dscale_rows = backward_rows(
        x.astype(jnp.float32), scale_f32, dy.astype(jnp.float32), options.eps
    )
    return dx.astype(x.dtype), jnp.sum(dscale_rows, axis=0).astype(scale.dtype)


rms_norm.defvjp(_fwd, _bwd)
