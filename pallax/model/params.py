"""Parameters: a pytree of arrays and the matching pytree of logical axis names.

Layer weights are stacked along a leading 'layers' axis so the blocks run
under one ``lax.scan`` (compile time independent of depth).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.model.config import Config


def param_axes(config: Config) -> dict:
    """Logical axes of every parameter (see pallax.sharding.DEFAULT_RULES)."""
    layers = {
        "attn_norm": ("layers", "act_embed"),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "act_embed"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("act_embed",)}
    if not config.tie_embeddings:
        axes["unembed"] = ("embed", "vocab")
    return axes


def _shapes(config: Config) -> dict:
    c = config
    layers = {
        "attn_norm": (c.n_layers, c.d_model),
        "wq": (c.n_layers, c.d_model, c.n_heads, c.head_dim),
        "wk": (c.n_layers, c.d_model, c.n_kv_heads, c.head_dim),
        "wv": (c.n_layers, c.d_model, c.n_kv_heads, c.head_dim),
        "wo": (c.n_layers, c.n_heads, c.head_dim, c.d_model),
        "mlp_norm": (c.n_layers, c.d_model),
        "w_gate": (c.n_layers, c.d_model, c.d_ff),
        "w_up": (c.n_layers, c.d_model, c.d_ff),
        "w_down": (c.n_layers, c.d_ff, c.d_model),
    }
    shapes = {"embed": (c.vocab_size, c.d_model), "layers": layers, "final_norm": (c.d_model,)}
    if not c.tie_embeddings:
        shapes["unembed"] = (c.d_model, c.vocab_size)
    return shapes


# Fan-in of each weight: its contracted axes (after the leading 'layers' axis).
_FAN_IN = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


def init_params(config: Config, key: jax.Array) -> dict:
    """Normal(0, 1/fan_in) weights and embeddings, zero norm scales (the model uses
    Gemma's (1 + scale) norms)."""
    shapes = _shapes(config)
    dtype = jnp.dtype(config.param_dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys, strict=True):
        name = path[-1].key
        if name.endswith("norm"):
            out.append(jnp.zeros(shape, dtype))
        elif name == "embed":
            # std 1/sqrt(D): the input scaling by sqrt(D) gives unit-variance activations,
            # and the tied output projection gives unit-variance initial logits.
            out.append(jax.random.normal(k, shape, dtype) * shape[1] ** -0.5)
        elif name == "unembed":
            out.append(jax.random.normal(k, shape, dtype) * shape[0] ** -0.5)
        else:
            fan_in = 1
            for dim in shape[1 : 1 + _FAN_IN[name]]:
                fan_in *= dim
            out.append(jax.random.normal(k, shape, dtype) * fan_in**-0.5)
    return jax.tree.unflatten(treedef, out)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
