"""decode attention's Mosaic GPU kernel compiled for a real Hopper GPU (run by gpu_check.sh).

The CPU suite runs the same kernel in the GPU interpreter; this checks the
compiled kernel (TMA double buffering, cross-warp reductions) against the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallax.kernels import decode_attention, decode_attention_reference, paged_decode_attention
from pallax.kernels.decode_attention.reference import gather_pages
from pallax.testing import assert_allclose

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "b, s, n, k, tq, window",
    [(8, 8192, 8, 1, 1, None), (3, 1000, 8, 2, 2, None), (2, 4096, 4, 4, 1, 512)],
    ids=["mqa-8k", "gqa-ragged-tq2", "mha-window"],
)
def test_compiled_kernel_matches_reference(b, s, n, k, tq, window, dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, tq, n, 128), jnp.float32).astype(dtype)
    kc = jax.random.normal(keys[1], (b, s, k, 128), jnp.float32).astype(dtype)
    vc = jax.random.normal(keys[2], (b, s, k, 128), jnp.float32).astype(dtype)
    lengths = jnp.array([s, 1, 0, s // 2 + 3, 77, s - 1, 64, 65][:b], jnp.int32)
    out = decode_attention(
        q, kc, vc, lengths, local_window_size=window, implementation="pallas_mosaic_gpu"
    )
    ref = decode_attention_reference(q, kc, vc, lengths, local_window_size=window)
    assert_allclose(out, ref, reduction_length=s * 128)


@pytest.mark.parametrize("page", [16, 64, 128])
def test_compiled_paged_kernel_matches_reference(page):
    keys = jax.random.split(jax.random.key(1), 4)
    b, per_seq = 4, 4096 // page
    kp = jax.random.normal(keys[0], (1, b * per_seq + 3, page, 128), jnp.bfloat16)
    vp = jax.random.normal(keys[1], (1, b * per_seq + 3, page, 128), jnp.bfloat16)
    table = jax.random.permutation(keys[2], b * per_seq + 3)[: b * per_seq].reshape(b, per_seq)
    q = jax.random.normal(keys[3], (b, 8, 128), jnp.bfloat16)
    lengths = jnp.array([4096, 1, 2000, 0], jnp.int32)
    out = paged_decode_attention(q, kp, vp, lengths, table, implementation="pallas_mosaic_gpu")
    ref = decode_attention_reference(
        q[:, None], gather_pages(kp, table), gather_pages(vp, table), lengths
    )[:, 0]
    assert_allclose(out, ref, reduction_length=4096 * 128)
