"""Hypothesis strategies shared by the kernel tests."""

from __future__ import annotations

import jax.numpy as jnp
from hypothesis import strategies as st

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)


def dtypes():
    return st.sampled_from(FLOAT_DTYPES)


def leading_shapes(max_rows: int = 96):
    """Leading shapes with 0 to 3 axes whose product is at most ``max_rows``."""

    def ok(shape):
        n = 1
        for d in shape:
            n *= d
        return n <= max_rows

    return st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple).filter(ok)
