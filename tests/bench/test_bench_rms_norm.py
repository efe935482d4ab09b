"""CI-sized rms_norm timings through pytest-benchmark (not performance claims on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallax.kernels import rms_norm, rms_norm_reference

_X = jax.random.normal(jax.random.key(0), (1024, 512), jnp.float32)
_S = jnp.ones((512,), jnp.float32)


@pytest.mark.parametrize(
    "name, fn",
    [
        ("pallax-xla", lambda x, s: rms_norm(x, s, implementation="xla")),
        ("jnp", rms_norm_reference),
    ],
)
def test_rms_norm_forward(benchmark, name, fn):
    f = jax.jit(fn)
    jax.block_until_ready(f(_X, _S))
    benchmark.extra_info["bytes"] = 2 * _X.size * _X.dtype.itemsize
    benchmark.pedantic(lambda: jax.block_until_ready(f(_X, _S)), rounds=5, warmup_rounds=1)
