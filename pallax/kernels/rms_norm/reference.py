"""The plain-JAX definition of RMSNorm that every implementation is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(
    x: jax.Array, scale: jax.Array, *, eps: float = 1e-6, scale_offset: float = 0.0
) -> jax.Array:
    """``x / sqrt(mean(x**2, -1) + eps) * (scale + scale_offset)``, statistics in f32.

    x: [..., D]; scale: [D]. Returns x.dtype. Gradients come from autodiff.
    """
    x_f32 = x.astype(jnp.float32)
    mean_sq = jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True)
    y = x_f32 * jax.lax.rsqrt(mean_sq + eps) * (scale.astype(jnp.float32) + scale_offset)
    return y.astype(x.dtype)
