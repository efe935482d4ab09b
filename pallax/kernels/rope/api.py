"""Rotary position embeddings (RoPE), rotate-half convention.

For a head vector x of size H, the first ``R = rotary_fraction * H`` features
(R even) are rotated in pairs (x[i], x[i + R/2]) by the angle
``position * base ** (-2 i / R)`` for i in [0, R/2); features past R pass
through unchanged. This is the GPT-NeoX / Gemma / MaxText layout
("rotate_half"), not the interleaved (x[2i], x[2i+1]) one of the original
RoFormer code. Since a rotation by angle a followed by the transpose of a
rotation by b is a rotation by a - b, q·k after RoPE depends on positions
only through their difference.

RoPE is elementwise and memory-bound: XLA fuses it into the neighbouring
projections, so it has one implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(x, positions, base, rotary_fraction) -> int:
    if not hasattr(x, "shape") or x.ndim != 4:
        raise ValueError(
            f"apply_rope: x must be [B, T, N, H], got shape {getattr(x, 'shape', type(x))}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"apply_rope: x must be floating, got x.dtype={x.dtype}")
    b, t, _, h = x.shape
    if positions.shape != (b, t):
        raise ValueError(
            f"apply_rope: positions must have shape (B, T)={(b, t)}, got {positions.shape} "
            f"(x.shape={x.shape})"
        )
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"apply_rope: positions must be integers, got {positions.dtype}")
    if not base > 0:
        raise ValueError(f"apply_rope: base must be > 0, got {base}")
    if not 0.0 < rotary_fraction <= 1.0:
        raise ValueError(f"apply_rope: rotary_fraction must be in (0, 1], got {rotary_fraction}")
    rotary = round(rotary_fraction * h)
    if rotary % 2 or rotary == 0:
        raise ValueError(
            f"apply_rope: rotary_fraction * H = {rotary_fraction} * {h} = {rotary} rotated "
            "features; it must be a positive even number"
        )
    return rotary


def apply_rope(
    x: jax.Array, positions: jax.Array, *, base: float = 10000.0, rotary_fraction: float = 1.0
) -> jax.Array:
    """Rotates x [B, T, N, H] by positions [B, T] (int). Angles in f32; returns x.dtype."""
    rotary = _check(x, positions, base, rotary_fraction)
    return _rope(x, positions, base=float(base), rotary=rotary)


def _rope(x, positions, *, base: float, rotary: int):
    half = rotary // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary)  # [R/2]
    angle_bth = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, R/2]
    sin, cos = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
    x_f32 = x.astype(jnp.float32)
    first, second, rest = x_f32[..., :half], x_f32[..., half:rotary], x_f32[..., rotary:]
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin, rest], axis=-1)
    return out.astype(x.dtype)


def rope_reference(x, positions, *, base: float = 10000.0, rotary_fraction: float = 1.0):
    """RoPE as an explicit rotation matrix per position (slow; for tests)."""
    h = x.shape[-1]
    rotary = round(rotary_fraction * h)
    half = rotary // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    c, s = jnp.cos(angle), jnp.sin(angle)
    rot = jnp.zeros((*positions.shape, h, h), jnp.float32)
    idx = jnp.arange(half)
    rot = rot.at[..., idx, idx].set(c).at[..., idx + half, idx + half].set(c)
    rot = rot.at[..., idx, idx + half].set(-s).at[..., idx + half, idx].set(s)
    passthrough = jnp.arange(rotary, h)
    rot = rot.at[..., passthrough, passthrough].set(1.0)
    out = jnp.einsum("btij,btnj->btni", rot, x.astype(jnp.float32))
    return out.astype(x.dtype)
