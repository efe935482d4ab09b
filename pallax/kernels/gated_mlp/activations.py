"""The gate activations with their derivatives, in f32, shared by every backend.

Backends recompute the activation in the backward pass from the pre-activation
instead of storing it, so each needs act(g) and act'(g) together.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ACTIVATIONS = ("gelu_tanh", "gelu", "silu")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation(name: str, g: jax.Array) -> jax.Array:
    if name == "gelu_tanh":
        return jax.nn.gelu(g, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(g, approximate=False)
    if name == "silu":
        return jax.nn.silu(g)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_and_grad(name: str, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(act(g), act'(g)) for f32 g, written out so kernels need no autodiff."""
    if name == "silu":
        s = jax.nn.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        t = jnp.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * g * g)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner
    if name == "gelu":
        cdf = 0.5 * (1.0 + jax.lax.erf(g * (1.0 / math.sqrt(2.0))))
        return g * cdf, cdf + g * jnp.exp(-0.5 * g * g) * _INV_SQRT_2PI
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
