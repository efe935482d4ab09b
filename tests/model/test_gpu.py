"""On a real GPU (gpu_check.sh): the XLA attention paths and a training step.

pallax has no Mosaic GPU attention kernels yet; these check that what a GPU
user runs today (the XLA paths under implementation=None) is right there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallax.kernels import (
    attention_reference,
    decode_attention,
    decode_attention_reference,
    dot_product_attention,
)
from pallax.model import PRESETS, data
from pallax.model.train import TrainConfig, init_state, make_train_step
from pallax.sharding import MeshConfig, make_mesh
from pallax.testing import assert_allclose

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_attention_on_gpu_matches_reference(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 1000, 8, 128), jnp.float32).astype(dtype)
    kv = jax.random.normal(keys[1], (2, 1000, 1, 128), jnp.float32).astype(dtype)
    out = dot_product_attention(q, kv, kv, is_causal=True)
    with jax.default_matmul_precision("highest"):
        ref = attention_reference(q, kv, kv, is_causal=True)
    assert_allclose(out, ref, reduction_length=1000 * 128)


def test_decode_on_gpu_matches_reference():
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (8, 8, 128))
    cache = jax.random.normal(keys[1], (8, 4096, 1, 128))
    lengths = jnp.arange(8, dtype=jnp.int32) * 500 + 1
    with jax.default_matmul_precision("highest"):
        out = decode_attention(q, cache, cache, lengths)
        ref = decode_attention_reference(q, cache, cache, lengths)
    assert_allclose(out, ref, reduction_length=4096 * 128)


def test_training_step_on_gpu_lowers_the_loss():
    config, tc = PRESETS["tiny"], TrainConfig(total_steps=30, warmup_steps=3)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    state = init_state(config, tc, mesh, jax.random.key(0))
    step = make_train_step(config, tc, mesh)
    iterator = data.DataIterator(data.PackedRows.build(128), 16)
    losses = []
    for _ in range(30):
        state, metrics = step(state, next(iterator))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1.0, losses
