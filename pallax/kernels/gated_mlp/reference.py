"""The plain-JAX gated MLP (autodiff stores every intermediate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.kernels.gated_mlp.activations import activation


def gated_mlp_reference(x, w_gate, w_up, w_down, *, activation_name: str = "gelu_tanh"):
    """(act(x @ w_gate) * (x @ w_up)) @ w_down; x [..., D] -> [..., D] in x.dtype, f32 math."""
    hp = jax.lax.Precision.HIGHEST
    gate = jnp.einsum("...d,df->...f", x, w_gate, preferred_element_type=jnp.float32, precision=hp)
    up = jnp.einsum("...d,df->...f", x, w_up, preferred_element_type=jnp.float32, precision=hp)
    hidden = activation(activation_name, gate) * up
    out = jnp.einsum("...f,fd->...d", hidden, w_down.astype(jnp.float32), precision=hp)
    return out.astype(x.dtype)
