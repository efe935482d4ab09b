"""Tolerances that follow where the rounding error comes from.

A kernel's result differs from a reference by (a) the rounding of the output
to its dtype and (b) a different summation order in f32 accumulators, whose
error grows like sqrt(reduction length) for random-sign terms. So

    rtol = 2 * eps(dtype) + 4 * eps(f32) * sqrt(reduction_length)

and, because sums of mixed-sign terms can cancel to near zero, the absolute
tolerance is the same fraction of the largest expected magnitude.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def tolerance(dtype, reduction_length: int = 1) -> float:
    """Relative tolerance for a result of ``dtype`` reduced over ``reduction_length`` terms."""
    out_eps = float(jnp.finfo(dtype).eps)
    acc_eps = float(jnp.finfo(jnp.float32).eps)
    return 2 * out_eps + 4 * acc_eps * math.sqrt(max(reduction_length, 1))


def assert_allclose(
    actual, expected, *, dtype=None, reduction_length: int = 1, err_msg: str = ""
) -> None:
    """Asserts ``actual`` ≈ ``expected`` within :func:`tolerance`.

    dtype defaults to the coarser of the two arrays' dtypes. Both are compared in f64.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: {actual.shape=} {expected.shape=} {err_msg}")
    if dtype is None:
        dtype = max((actual.dtype, expected.dtype), key=lambda d: float(jnp.finfo(d).eps))
    rtol = tolerance(dtype, reduction_length)
    expected64 = expected.astype(np.float64)
    scale = float(np.max(np.abs(expected64), initial=0.0))
    np.testing.assert_allclose(
        actual.astype(np.float64),
        expected64,
        rtol=rtol,
        atol=rtol * max(1.0, scale),
        err_msg=f"{err_msg} (dtype={jnp.dtype(dtype)}, reduction_length={reduction_length})",
    )
