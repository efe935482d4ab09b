"""Which (query, key) pairs may attend: one definition for every backend.

Positions are absolute indices into the query axis [0, T) and key axis [0, S).
The structural masks are top-left aligned like ``jax.nn.dot_product_attention``:
causal allows key j <= query i; a window (left, right) allows
i - left <= j <= i + right. Lengths cut off queries i >= q_len and keys
j >= kv_len; segment ids allow only equal ids.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static part of the masking (what is present, not the arrays)."""

    causal: bool = False
    window: tuple[int, int] | None = None  # (left, right)

    def block_may_attend(self, q_start, q_end, k_start, k_end):
        """Whether any pair in a [q_start, q_end) x [k_start, k_end) block passes the
        causal/window masks (works on Python ints and traced ints alike)."""
        ok = True
        if self.causal:
            ok = jnp.logical_and(ok, k_start <= q_end - 1)
        if self.window is not None:
            left, right = self.window
            ok = jnp.logical_and(ok, k_end - 1 >= q_start - left)
            ok = jnp.logical_and(ok, k_start <= q_end - 1 + right)
        return ok


def allowed(spec: MaskSpec, q_pos, k_pos, *, q_len=None, kv_len=None, q_seg=None, kv_seg=None):
    """Boolean mask broadcast from q_pos [..., bq, 1] and k_pos [..., 1, bk].

    q_len / kv_len broadcast against the positions ([..., 1, 1]); q_seg is shaped
    like q_pos and kv_seg like k_pos.
    """
    conditions = []
    if spec.causal:
        conditions.append(k_pos <= q_pos)
    if spec.window is not None:
        left, right = spec.window
        conditions.append((k_pos >= q_pos - left) & (k_pos <= q_pos + right))
    if q_len is not None:
        conditions.append(q_pos < q_len)
    if kv_len is not None:
        conditions.append(k_pos < kv_len)
    if q_seg is not None:
        conditions.append(q_seg == kv_seg)
    shape = jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos))
    if not conditions:
        return jnp.ones(shape, bool)
    ok = conditions[0]
    for condition in conditions[1:]:  # no constant mask to start from: Mosaic GPU needs layouts
        ok = ok & condition
    full = jnp.broadcast_shapes(jnp.shape(ok), shape)
    return jnp.broadcast_to(ok, full) if jnp.shape(ok) != full else ok


def tile_of(array: jax.Array | None, q_start, bq: int, k_start, bk: int) -> jax.Array | None:
    """The [.., bq|1, bk|1] tile of a [.., T|1, S|1] array (broadcast dims stay size 1)."""
    if array is None:
        return None
    if array.shape[-2] != 1:
        array = jax.lax.dynamic_slice_in_dim(array, q_start, bq, axis=array.ndim - 2)
    if array.shape[-1] != 1:
        array = jax.lax.dynamic_slice_in_dim(array, k_start, bk, axis=array.ndim - 1)
    return array


def online_softmax_step(m_ref, l_ref, acc_ref, s, v):
    """One key block of the online softmax, on VMEM scratch refs (kernels) or arrays.

    s: masked logits [R, bk] f32 (-inf where masked); v: [bk, H]. The running max
    m [R, 1], sum l [R, 1] and output acc [R, H] are updated in place. A row that
    has seen only -inf keeps m = -inf and adds nothing.
    """
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    m_ref[...] = m_new


def normalize_window(window, op: str) -> tuple[int, int] | None:
    """``local_window_size`` as (left, right): an int w means (w, w), as in jax.nn."""
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, window)
    if window is None:
        return None
    if (
        not isinstance(window, tuple | list)
        or len(window) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in window)
    ):
        raise ValueError(
            f"{op}: local_window_size must be an int or a pair (left, right) of "
            f"non-negative ints, got {window!r}"
        )
    return int(window[0]), int(window[1])
