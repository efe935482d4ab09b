"""apply_rope against an explicit rotation matrix, and the relative-position property."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallax.kernels import apply_rope, rope_reference
from pallax.testing import assert_allclose
from tests.strategies import dtypes


@given(
    b=st.integers(1, 2),
    t=st.integers(1, 9),
    n=st.integers(1, 3),
    h=st.sampled_from([2, 8, 64, 96]),
    fraction=st.sampled_from([1.0, 0.5, 0.25]),
    base=st.sampled_from([10000.0, 1e6]),
    dtype=dtypes(),
    seed=st.integers(0, 99),
)
def test_matches_rotation_matrix(b, t, n, h, fraction, base, dtype, seed):
    if round(fraction * h) % 2 or round(fraction * h) == 0:
        fraction = 1.0
    kx, kp = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (b, t, n, h), jnp.float32).astype(dtype)
    positions = jax.random.randint(kp, (b, t), 0, 40000)
    got = apply_rope(x, positions, base=base, rotary_fraction=fraction)
    want = rope_reference(x, positions, base=base, rotary_fraction=fraction)
    assert got.dtype == dtype
    # Angles up to 4e4 rad: f32 sin/cos arguments carry ~4e4 * 6e-8 = 2.4e-3 absolute error.
    assert_allclose(
        got, want, dtype=dtype if dtype == jnp.bfloat16 else jnp.float32, reduction_length=1 << 20
    )


def test_gradient_is_the_inverse_rotation():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
    positions = jnp.arange(5)[None]
    ct = jax.random.normal(jax.random.key(1), x.shape)
    _, vjp = jax.vjp(lambda x: apply_rope(x, positions), x)
    (dx,) = vjp(ct)
    # Rotations are orthogonal: the VJP rotates the cotangent back, by -position.
    assert_allclose(dx, apply_rope(ct, -positions), reduction_length=16)


@given(shift=st.integers(-1000, 1000), seed=st.integers(0, 99))
def test_scores_depend_only_on_position_differences(shift, seed):
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (1, 6, 4, 32))
    k = jax.random.normal(kk, (1, 6, 1, 32))  # MQA: one KV head
    pos = jnp.array([[0, 3, 7, 8, 20, 21]])

    def scores(offset):
        qr, kr = apply_rope(q, pos + offset), apply_rope(k, pos + offset)
        return jnp.einsum("btnh,bsh->bnts", qr, kr[:, :, 0])

    assert_allclose(scores(shift), scores(0), reduction_length=32 * 1000)


def test_composes_with_dot_product_attention():
    # Shifting every position by the same amount leaves attention's output unchanged.
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (2, 16, 4, 64))
    k = jax.random.normal(kk, (2, 16, 1, 64))
    v = jax.random.normal(kv, (2, 16, 1, 64))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def attend(offset):
        return jax.nn.dot_product_attention(
            apply_rope(q, pos + offset), apply_rope(k, pos + offset), v, is_causal=True
        )

    assert_allclose(attend(12345), attend(0), reduction_length=64 * 1000)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((jnp.ones((2, 3, 4)), jnp.zeros((2, 3), jnp.int32)), {}, ValueError, r"\[B, T, N, H\]"),
        (
            (jnp.ones((2, 3, 1, 8)), jnp.zeros((2, 4), jnp.int32)),
            {},
            ValueError,
            r"positions must have shape \(B, T\)=\(2, 3\), got \(2, 4\)",
        ),
        ((jnp.ones((2, 3, 1, 8)), jnp.zeros((2, 3))), {}, TypeError, "positions must be integers"),
        (
            (jnp.ones((2, 3, 1, 8), jnp.int32), jnp.zeros((2, 3), jnp.int32)),
            {},
            TypeError,
            "x must be floating",
        ),
        (
            (jnp.ones((2, 3, 1, 6)), jnp.zeros((2, 3), jnp.int32)),
            {"rotary_fraction": 0.5},
            ValueError,
            "positive even number",
        ),
        (
            (jnp.ones((2, 3, 1, 8)), jnp.zeros((2, 3), jnp.int32)),
            {"base": 0.0},
            ValueError,
            "base must be > 0",
        ),
        (
            (jnp.ones((2, 3, 1, 8)), jnp.zeros((2, 3), jnp.int32)),
            {"rotary_fraction": 1.5},
            ValueError,
            r"rotary_fraction must be in \(0, 1\]",
        ),
    ],
    ids=[
        "rank",
        "positions-shape",
        "positions-float",
        "x-int",
        "fraction-odd",
        "base",
        "fraction-range",
    ],
)
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_rope(*args, **kwargs)
