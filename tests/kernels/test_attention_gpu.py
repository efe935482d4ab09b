"""dot_product_attention's Mosaic GPU kernel compiled for a real Hopper GPU (run by
gpu_check.sh): the wgmma path, which JAX's GPU interpreter cannot run, against the
reference; the CPU suite runs the rest of the kernel in the interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallax.kernels import AttentionBlockSizes, attention_reference, dot_product_attention
from pallax.testing import assert_allclose

pytestmark = pytest.mark.gpu


def _inputs(b, t, s, n, k, h, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, s, k, h), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, s, k, h), jnp.float32).astype(jnp.bfloat16)
    ct = jax.random.normal(keys[3], (b, t, n, h), jnp.float32).astype(jnp.bfloat16)
    return q, kk, v, ct


@pytest.mark.parametrize("block_kv", [64, 128])
@pytest.mark.parametrize(
    "b, t, s, n, k, h, causal",
    [
        (1, 2048, 2048, 8, 1, 128, True),
        (2, 512, 512, 16, 16, 64, False),
        (1, 1000, 1500, 8, 2, 128, True),
        (2, 300, 777, 4, 4, 64, False),
    ],
    ids=["mqa-causal-2k", "mha-h64", "gqa-ragged-causal", "odd-lengths"],
)
def test_compiled_forward_and_gradients(b, t, s, n, k, h, causal, block_kv):
    q, kk, v, ct = _inputs(b, t, s, n, k, h)
    blocks = AttentionBlockSizes(64, block_kv)

    def ours(q, k, v):
        return dot_product_attention(
            q, k, v, is_causal=causal, implementation="pallas_mosaic_gpu", block_sizes=blocks
        )

    out, vjp = jax.vjp(ours, q, kk, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, is_causal=causal), q, kk, v)
    assert_allclose(out, ref, reduction_length=s * h)
    for got, want in zip(vjp(ct), ref_vjp(ct), strict=True):
        assert_allclose(got, want, reduction_length=s * h * t * n)


def test_compiled_with_every_option_and_gradients():
    b, t, s, n, k, h = 2, 700, 900, 8, 2, 128
    q, kk, v, _ = _inputs(b, t, s, n, k, h, seed=1)
    keys = jax.random.split(jax.random.key(2), 2)
    kwargs = dict(
        is_causal=True,
        local_window_size=(200, 0),
        segment_ids=(
            jnp.sort(jax.random.randint(keys[0], (b, t), 0, 3), axis=1),
            jnp.sort(jax.random.randint(keys[1], (b, s), 0, 3), axis=1),
        ),
        logits_soft_cap=20.0,
        query_seq_lengths=jnp.array([700, 333]),
        key_value_seq_lengths=jnp.array([900, 512]),
    )
    bias = jax.random.normal(keys[0], (1, n, t, s), jnp.float32)
    kwargs["mask"] = jax.random.bernoulli(keys[1], 0.9, (b, 1, t, s))
    ct = jax.random.normal(keys[1], q.shape, jnp.float32).astype(q.dtype)

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v, bias: fn(q, k, v, bias=bias, **kwargs), q, kk, v, bias)
        return out, vjp(ct)

    out, grads = run(
        lambda *a, **kw: dot_product_attention(*a, implementation="pallas_mosaic_gpu", **kw)
    )
    ref, ref_grads = run(attention_reference)
    assert_allclose(out, ref, reduction_length=s * h)
    for got, want in zip(grads, ref_grads, strict=True):  # dq, dk, dv, dbias
        assert_allclose(got, want, reduction_length=s * h * t * n)
