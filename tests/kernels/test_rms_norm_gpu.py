"""rms_norm's Mosaic GPU kernel compiled for a real Hopper GPU (run by gpu_check.sh).

The CPU suite runs the same kernel in the GPU interpreter; this checks the
compiled kernel (TMA, WGMMA-layout reductions) against the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallax.kernels import RmsNormBlockSizes, rms_norm, rms_norm_reference
from pallax.testing import assert_allclose

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "shape, block_cols",
    [
        ((8192, 4096), None),
        ((4, 1000, 2048), None),
        ((37, 128), None),
        ((200, 384), 64),
        ((65, 256), 256),
    ],
    ids=["8192x4096", "4x1000x2048", "37x128-short", "200x384-cols64", "65x256-one-chunk"],
)
def test_compiled_kernel_matches_reference(shape, block_cols, dtype):
    kx, ks, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    scale = jax.random.normal(ks, shape[-1:], jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, shape, jnp.float32).astype(dtype)
    blocks = RmsNormBlockSizes(64, block_cols)
    y, vjp = jax.vjp(
        lambda x, s: rms_norm(x, s, implementation="pallas_mosaic_gpu", block_sizes=blocks),
        x,
        scale,
    )
    ref_y, ref_vjp = jax.vjp(rms_norm_reference, x, scale)
    assert_allclose(y, ref_y, reduction_length=shape[-1])
    for got, want in zip(vjp(ct), ref_vjp(ct), strict=True):
        assert_allclose(got, want, reduction_length=x.size)


def test_default_implementation_on_gpu_is_the_kernel():
    x = jnp.ones((128, 256), jnp.bfloat16)
    text = jax.jit(lambda x, s: rms_norm(x, s)).lower(x, jnp.ones((256,), jnp.bfloat16)).as_text()
    assert "mosaic_gpu" in text
