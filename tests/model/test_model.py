"""The decoder: sizes, causality, incremental decoding, sharding, generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.model import (
    PRESETS,
    Config,
    count_params,
    decode_step,
    forward,
    generate,
    init_params,
    logits,
    loss,
    param_axes,
    prefill,
    transformer,
)
from pallax.sharding import MeshConfig, assert_sufficiently_sharded, make_mesh, named_shardings
from pallax.testing import assert_allclose

TINY = PRESETS["tiny"]


@pytest.mark.parametrize(
    "name, target, tolerance",
    [("nano1", 1.8e9, 0.03), ("nano2", 3.25e9, 0.03), ("small", 1e8, 0.1)],
)
def test_preset_sizes(name, target, tolerance):
    shapes = jax.eval_shape(lambda k: init_params(PRESETS[name], k), jax.random.key(0))
    assert abs(count_params(shapes) / target - 1) <= tolerance
    assert PRESETS[name].max_seq_len >= (32768 if name.startswith("nano") else 1)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_heads=4 must be a multiple of n_kv_heads=3"),
        (dict(d_model=0), "d_model must be a positive int"),
        (dict(activation="relu"), "activation must be one of"),
        (dict(remat="some"), "remat must be one of"),
        (dict(implementation="cuda"), "implementation must be None or one of"),
        (dict(dtype="float12"), "is not a dtype"),
        (dict(logits_soft_cap=0.0), "logits_soft_cap"),
    ],
)
def test_bad_configs(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)


def test_no_gradient_flows_from_future_tokens():
    params = init_params(TINY, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 10, TINY.d_model))
    t = 4

    def hidden_at_t(x):
        return jnp.sum(transformer.forward_embedded(params, x, TINY)[:, t])

    grads = np.asarray(jax.grad(hidden_at_t)(x))
    assert np.all(grads[:, t + 1 :] == 0)
    assert np.all(np.abs(grads[:, : t + 1]).sum(-1) > 0)


def test_segments_do_not_see_each_other():
    params = init_params(TINY, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 256)
    segments = jnp.array([[0] * 5 + [1] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    packed = forward(params, tokens, TINY, positions=positions, segment_ids=(segments, segments))
    alone = forward(params, tokens[:, 5:], TINY)
    assert_allclose(packed[:, 5:], alone, reduction_length=TINY.d_model * 12)


def test_incremental_decoding_matches_the_full_forward():
    params = init_params(TINY, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    full = logits(params, forward(params, tokens, TINY), TINY)  # [B, T, V]
    prompt = 5
    lengths = jnp.array([prompt, prompt])
    step_logits, cache = prefill(params, tokens[:, :prompt], lengths, TINY, 12)
    assert_allclose(step_logits, full[:, prompt - 1], reduction_length=TINY.d_model * 12)
    for position in range(prompt, 12):
        step_logits, cache = decode_step(params, cache, tokens[:, position], lengths, TINY)
        assert_allclose(step_logits, full[:, position], reduction_length=TINY.d_model * 12)
        lengths = lengths + 1


def test_generation_is_deterministic_and_respects_eos():
    params = init_params(TINY, jax.random.key(0))
    prompts = jax.random.randint(jax.random.key(1), (2, 6), 0, 256)
    greedy = generate(params, TINY, prompts, 5)
    assert greedy.shape == (2, 5)
    np.testing.assert_array_equal(greedy, generate(params, TINY, prompts, 5))
    # The greedy first token is the argmax of the full forward's last logits.
    last = logits(params, forward(params, prompts, TINY), TINY)[:, -1]
    np.testing.assert_array_equal(greedy[:, 0], jnp.argmax(last, -1))
    eos = int(greedy[0, 1])
    stopped = generate(params, TINY, prompts, 5, eos_id=eos)
    first = int(np.argmax(np.asarray(stopped[0]) == eos))
    assert np.all(np.asarray(stopped[0, first:]) == eos)
    sampled = generate(params, TINY, prompts, 5, temperature=1.0, top_k=5, rng=jax.random.key(3))
    np.testing.assert_array_equal(
        sampled, generate(params, TINY, prompts, 5, temperature=1.0, top_k=5, rng=jax.random.key(3))
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be > 0"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=1.0), "needs rng"),
        (dict(max_new_tokens=200), "exceeds config.max_seq_len"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    params = init_params(TINY, jax.random.key(0))
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(params, TINY, jnp.zeros((1, 4), jnp.int32), args.pop("max_new_tokens"), **args)


def test_sharded_forward_and_loss_equal_unsharded(cpu_devices):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=cpu_devices)
    params = init_params(TINY, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 256)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    shardings = named_shardings(param_axes(TINY), mesh, shapes=params)
    sharded = jax.device_put(params, shardings)
    assert_sufficiently_sharded(sharded["layers"], mesh, min_fraction=0.25)

    def step(p, b):
        return jax.value_and_grad(lambda p: loss(p, b, TINY)[0])(p)

    with jax.set_mesh(mesh):
        value, grads = jax.jit(step)(sharded, batch)
    ref_value, ref_grads = jax.jit(step)(params, batch)
    assert_allclose(value, ref_value, reduction_length=TINY.d_model * 16)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert_allclose(got, want, reduction_length=TINY.d_model * 64)


def test_remat_policies_give_the_same_gradients():
    params = init_params(TINY, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    grads = {}
    for policy in ("none", "full", "save_attention"):
        config = TINY.replace(remat=policy)
        grads[policy] = jax.grad(lambda p, c=config: loss(p, batch, c)[0])(params)
    for policy in ("full", "save_attention"):
        for got, want in zip(
            jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"]), strict=True
        ):
            assert_allclose(got, want, reduction_length=TINY.d_model * 16)


def test_tiny_config_is_the_default():
    assert Config() == TINY


def test_tensor_parallel_collective_matmuls_match_and_overlap(cpu_devices):
    from pallax.collectives import overlap_report

    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4), devices=cpu_devices)
    config = TINY.replace(tensor_parallel_collectives=True)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 256)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    sharded = jax.device_put(params, named_shardings(param_axes(config), mesh, shapes=params))

    def step(p, b, c):
        return jax.value_and_grad(lambda p: loss(p, b, c)[0])(p)

    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, b: step(p, b, config))
        value, grads = fn(sharded, batch)
        report = overlap_report(fn.lower(sharded, batch).compile())
    ref_value, ref_grads = jax.jit(lambda p, b: step(p, b, TINY))(params, batch)
    assert_allclose(value, ref_value, reduction_length=TINY.d_model * 16)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert_allclose(got, want, reduction_length=TINY.d_model * 64)
    # The rings' ppermutes (GSPMD adds its own resharding permutes, named otherwise).
    ring = [c for c in report.collectives if c.name.startswith("ppermute")]
    assert len(ring) >= 6 and all(c.independent_dots for c in ring), str(report)
