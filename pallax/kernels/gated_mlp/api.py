"""The public gated MLP: checks, dispatch."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallax.kernels import _dispatch
from pallax.kernels.gated_mlp import pallas_tpu, xla
from pallax.kernels.gated_mlp.activations import ACTIVATIONS
from pallax.kernels.gated_mlp.config import GatedMlpBlockSizes, default_block_sizes

_AVAILABLE = ("xla", "pallas_tpu")


def gated_mlp(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    activation: str = "gelu_tanh",
    implementation: str | None = None,
    block_sizes: GatedMlpBlockSizes | None = None,
) -> jax.Array:
    """``(act(x @ w_gate) * (x @ w_up)) @ w_down`` (GeGLU / SwiGLU), f32 accumulation.

    Args:
      x: [..., D]; w_gate, w_up: [D, F]; w_down: [F, D]. Floating.
      activation: 'gelu_tanh' (Gemma's GeGLU), 'gelu' (exact) or 'silu' (SwiGLU).
      implementation: None, 'xla' or 'pallas_tpu'. There is no Mosaic GPU kernel
        yet: on GPU, None uses the XLA path (whose backward also recomputes).
      block_sizes: row and F tile sizes for 'pallas_tpu'.

    Returns:
      [..., D] in x.dtype. The backward of every implementation recomputes the
      [.., F] activations from x instead of storing them.
    """
    _check_args(x, w_gate, w_up, w_down, activation, block_sizes)
    mode = _dispatch.resolve("gated_mlp", implementation, available=_AVAILABLE)
    if mode.implementation == "pallas_tpu" and block_sizes is None:
        block_sizes = default_block_sizes(
            rows=math.prod(x.shape[:-1]),
            dim=x.shape[-1],
            ff=w_gate.shape[1],
            dtype=x.dtype,
            device_kind=_dispatch.device_kind(),
        )
    return _gated_mlp(
        x,
        w_gate,
        w_up,
        w_down,
        activation=activation,
        mode=mode,
        block_sizes=block_sizes if mode.implementation == "pallas_tpu" else None,
    )


@functools.partial(jax.jit, static_argnames=("activation", "mode", "block_sizes"))
def _gated_mlp(x, w_gate, w_up, w_down, *, activation, mode, block_sizes):
    x_td = x.reshape(-1, x.shape[-1])
    if mode.implementation == "xla":
        y_td = xla.gated_mlp(x_td, w_gate, w_up, w_down, activation)
    else:
        options = pallas_tpu.Options(activation, block_sizes, mode.interpret)
        y_td = pallas_tpu.gated_mlp(x_td, w_gate, w_up, w_down, options)
    return y_td.reshape(x.shape)


def _check_args(x, w_gate, w_up, w_down, activation, block_sizes) -> None:
    name = "gated_mlp"
    arrays = dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    for arg, value in arrays.items():
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"{name}: {arg} must be an array, got {type(value).__name__}")
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name}: {arg} must be floating, got {arg}.dtype={value.dtype}")
    if x.ndim < 1 or w_gate.ndim != 2 or w_up.ndim != 2 or w_down.ndim != 2:
        raise ValueError(
            f"{name}: expected x [..., D], w_gate/w_up [D, F], w_down [F, D]; got "
            + ", ".join(f"{k}.shape={v.shape}" for k, v in arrays.items())
        )
    d, f = w_gate.shape
    if x.shape[-1] != d or w_up.shape != (d, f) or w_down.shape != (f, d):
        raise ValueError(
            f"{name}: shapes do not agree: x.shape={x.shape}, w_gate.shape={w_gate.shape}, "
            f"w_up.shape={w_up.shape}, w_down.shape={w_down.shape} "
            f"(expected [..., {d}], [{d}, {f}], [{d}, {f}], [{f}, {d}])"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if block_sizes is not None and not isinstance(block_sizes, GatedMlpBlockSizes):
        raise TypeError(f"{name}: block_sizes must be GatedMlpBlockSizes or None")
