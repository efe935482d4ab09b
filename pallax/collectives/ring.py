"""Collective matmuls as ring schedules, for use inside ``shard_map``.

With n devices on ``axis_name`` the collective is decomposed into n - 1
``ppermute`` steps. Each step's send is independent of the matmul on the chunk
already present, so XLA's scheduler can run the transfer behind the compute
(``overlap_report`` checks that the compiled program allows it). The
bidirectional form splits each chunk in two halves that travel opposite ways
round the ring: each link direction carries half the bytes.

Shapes (per device, n = axis size):
  all_gather_matmul:      x [m, k],   w [k, n_w]   -> all_gather(x) @ w       [n*m, n_w]
  matmul_reduce_scatter:  x [n*m, k], w [k, n_w]   -> reduce_scatter(x @ w)   [m, n_w]

Both have a ``custom_vjp`` whose backward is again a pair of ring schedules:
the transpose of an all-gather-matmul is a matmul-reduce-scatter and vice versa,
and the weight gradient streams the gathered operand round the ring instead of
storing it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _shift(x: jax.Array, axis_name: str, offset: int) -> jax.Array:
    """Sends x to the device ``offset`` places further round the ring."""
    n = lax.axis_size(axis_name)
    return lax.ppermute(x, axis_name, [(i, (i + offset) % n) for i in range(n)])


def _halves(x: jax.Array, axis_name: str) -> tuple[jax.Array, jax.Array]:
    m = x.shape[0]
    if m % 2:
        raise ValueError(
            f"bidirectional=True splits each device's rows in two; x has {m} rows per device "
            f"on axis {axis_name!r}"
        )
    return x[: m // 2], x[m // 2 :]


def _ring_apply(x, axis_name: str, bidirectional: bool, consume, init):
    """Streams every device's ``x`` past this device and folds ``consume`` over them.

    ``consume(acc, chunk, source, half)`` sees each device's chunk (or half chunk)
    once; ``source`` is the device it came from and ``half`` is 0/1 (None when
    unidirectional). The send of step s+1's chunk is issued before the step-s
    compute, and nothing in the compute depends on it.
    """
    n = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    acc = init
    if not bidirectional:
        chunk = x
        for step in range(n):
            incoming = _shift(chunk, axis_name, +1) if step < n - 1 else None
            acc = consume(acc, chunk, (me - step) % n, None)
            chunk = incoming
        return acc
    right, left = _halves(x, axis_name)
    for step in range(n):
        last = step == n - 1
        next_right = None if last else _shift(right, axis_name, +1)
        next_left = None if last else _shift(left, axis_name, -1)
        acc = consume(acc, right, (me - step) % n, 0)
        acc = consume(acc, left, (me + step) % n, 1)
        right, left = next_right, next_left
    return acc


def _gather_matmul(x, w, axis_name, bidirectional):
    n = lax.axis_size(axis_name)
    m = x.shape[0]
    out = jnp.zeros((n * m, w.shape[1]), jnp.result_type(x, w))
    half = m // 2

    def consume(out, chunk, source, which):
        row = source * m + (0 if which in (None, 0) else half)
        return lax.dynamic_update_slice_in_dim(out, (chunk @ w).astype(out.dtype), row, axis=0)

    return _ring_apply(x, axis_name, bidirectional, consume, out)


def _matmul_scatter(x, w, axis_name, bidirectional):
    """reduce_scatter(x @ w) along rows: the partial sums travel the ring."""
    n = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    m = x.shape[0] // n
    dtype = jnp.result_type(x, w)

    def partial(block, lo, size):
        rows = lax.dynamic_slice_in_dim(x, block * m + lo, size, axis=0)
        return (rows @ w).astype(dtype)

    if not bidirectional:
        # Block b's sum starts on device b+1 and travels right to device b,
        # every device on the way adding its own partial product.
        acc = partial((me - 1) % n, 0, m)
        for step in range(1, n):
            contribution = partial((me - step - 1) % n, 0, m)  # independent of the transfer
            acc = _shift(acc, axis_name, +1) + contribution
        return acc
    if m % 2:
        raise ValueError(
            f"bidirectional=True splits each output block in two; the block has {m} rows "
            f"(x has {x.shape[0]} rows over {n} devices on axis {axis_name!r})"
        )
    h = m // 2
    # Top halves travel right (start on b+1), bottom halves travel left (start on b-1).
    top = partial((me - 1) % n, 0, h)
    bottom = partial((me + 1) % n, h, h)
    for step in range(1, n):
        top_contribution = partial((me - step - 1) % n, 0, h)
        bottom_contribution = partial((me + step + 1) % n, h, h)
        top = _shift(top, axis_name, +1) + top_contribution
        bottom = _shift(bottom, axis_name, -1) + bottom_contribution
    return jnp.concatenate([top, bottom], axis=0)


def _gathered_outer(x, y, axis_name, bidirectional, dtype):
    """all_gather(x).T @ all_gather(y) without gathering y: x streams, y is local-full.

    x: [m, a] per device; y: [n*m, b] (already full on every device) -> [a, b].
    """
    m = x.shape[0]
    half = m // 2

    def consume(acc, chunk, source, which):
        row = source * m + (0 if which in (None, 0) else half)
        rows = lax.dynamic_slice_in_dim(y, row, chunk.shape[0], axis=0)
        return acc + (chunk.T @ rows).astype(dtype)

    init = jnp.zeros((x.shape[1], y.shape[1]), dtype)
    return _ring_apply(x, axis_name, bidirectional, consume, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _all_gather_matmul(x, w, axis_name, bidirectional):
    return _gather_matmul(x, w, axis_name, bidirectional)


def _agm_fwd(x, w, axis_name, bidirectional):
    return _gather_matmul(x, w, axis_name, bidirectional), (x, w)


def _agm_bwd(axis_name, bidirectional, residuals, dy):
    x, w = residuals  # dy: [n*m, n_w]
    dx = _matmul_scatter(dy, w.T, axis_name, bidirectional).astype(x.dtype)
    dw = _gathered_outer(x, dy, axis_name, bidirectional, jnp.float32).astype(w.dtype)
    return dx, dw


_all_gather_matmul.defvjp(_agm_fwd, _agm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_reduce_scatter(x, w, axis_name, bidirectional):
    return _matmul_scatter(x, w, axis_name, bidirectional)


def _mrs_fwd(x, w, axis_name, bidirectional):
    return _matmul_scatter(x, w, axis_name, bidirectional), (x, w)


def _mrs_bwd(axis_name, bidirectional, residuals, dy):
    x, w = residuals  # dy: [m, n_w]
    dx = _gather_matmul(dy, w.T, axis_name, bidirectional).astype(x.dtype)
    dw = _gathered_outer(dy, x, axis_name, bidirectional, jnp.float32).T.astype(w.dtype)
    return dx, dw


_matmul_reduce_scatter.defvjp(_mrs_fwd, _mrs_bwd)


def _check(op, x, w, axis_name):
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"{op}: x and w must be 2-D, got x.shape={x.shape}, w.shape={w.shape}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"{op}: contraction mismatch: x.shape={x.shape}, w.shape={w.shape}")
    try:
        lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"{op}: axis_name={axis_name!r} is not a mesh axis of the enclosing shard_map"
        ) from e


def all_gather_matmul(x, w, *, axis_name: str, bidirectional: bool = False) -> jax.Array:
    """``all_gather(x, axis_name, tiled) @ w`` with the gather hidden behind the matmuls.

    Inside ``shard_map``. x: [m, k] (this device's rows), w: [k, n_w] -> [n*m, n_w].
    """
    _check("all_gather_matmul", x, w, axis_name)
    if bidirectional:
        _halves(x, axis_name)
    return _all_gather_matmul(x, w, axis_name, bidirectional)


def matmul_reduce_scatter(x, w, *, axis_name: str, bidirectional: bool = False) -> jax.Array:
    """``psum_scatter(x @ w, axis_name, tiled)`` with the reduction hidden behind the matmuls.

    Inside ``shard_map``. x: [n*m, k] (k is this device's slice of the
    contraction), w: [k, n_w] -> [m, n_w], this device's block of the summed rows.
    """
    _check("matmul_reduce_scatter", x, w, axis_name)
    n = lax.axis_size(axis_name)
    if x.shape[0] % n:
        raise ValueError(
            f"matmul_reduce_scatter: x has {x.shape[0]} rows, not divisible by the {n} devices "
            f"on axis {axis_name!r}"
        )
    return _matmul_reduce_scatter(x, w, axis_name, bidirectional)
