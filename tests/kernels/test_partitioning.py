"""Every Pallas op runs its kernel per shard of sharded inputs (interpret mode on 8
CPU devices), under the three ways a sharding reaches it: GSPMD deciding after
tracing (Auto axes: custom partitioning), Explicit axes (shard_map from the
types) and a context mesh with a kernel layout from the rule table. The sharded
result equals the unsharded XLA path, forward and gradients, the kernel sits in a
partitioned region and the operands it was asked to keep sharded are never
all-gathered."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallax
from pallax.kernels import interpret_mode, kernel_layout
from pallax.sharding import DEFAULT_RULES
from pallax.testing import assert_allclose

MODES = ["auto", "explicit", "layout"]


def _mesh(shape, names, mode):
    kind = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def _random(i, shape, scale=1.0):
    return jax.random.normal(jax.random.key(i), shape, jnp.float32) * scale


def _run(mode, mesh, fn, args, specs, argnums):
    """(value, grads, compiled HLO) of fn on the sharded args, in interpret mode."""
    placed = [
        x if spec is None else jax.device_put(x, NamedSharding(mesh, spec))
        for x, spec in zip(args, specs, strict=True)
    ]

    def loss(*a):
        y = fn(*a)
        return jnp.sum(jnp.square(y.astype(jnp.float32))) if y.ndim else y

    grad = jax.grad(loss, argnums) if argnums else lambda *a: ()  # decode: inference only
    with interpret_mode():
        if mode == "explicit":
            with jax.set_mesh(mesh):
                return jax.jit(fn)(*placed), jax.jit(grad)(*placed), None
        if mode == "layout":
            with jax.set_mesh(mesh), kernel_layout(DEFAULT_RULES.mesh_axes):
                value, grads = jax.jit(fn)(*placed), jax.jit(grad)(*placed)
                lowered = jax.jit(fn).lower(*placed)
                hlo = jax.jit(grad).lower(*placed).compile().as_text()
            # The kernel sits in a manually partitioned region (a shard_map).
            assert "sdy.manual_computation" in lowered.as_text()
            return value, grads, hlo
        lowered = jax.jit(fn).lower(*placed)
        assert "CustomSPMDPartitioning" in lowered.as_text()  # the custom partitioner's call
        hlo = jax.jit(grad).lower(*placed).compile().as_text()
        return jax.jit(fn)(*placed), jax.jit(grad)(*placed), hlo


def _reference(fn, args, argnums):
    def loss(*a):
        y = fn(*a)
        return jnp.sum(jnp.square(y.astype(jnp.float32))) if y.ndim else y

    return fn(*args), jax.grad(loss, argnums)(*args)


def _gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of the all-gathers in compiled HLO."""
    shapes = []
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", line)
        if m:
            shapes.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


def _check(mode, mesh, kernel, reference, args, specs, argnums, never_gathered=()):
    value, grads, hlo = _run(mode, mesh, kernel, args, specs, argnums)
    want, want_grads = _reference(reference, args, argnums)
    assert_allclose(value, want, dtype=jnp.float32, reduction_length=args[0].shape[-1])
    for got, ref in zip(grads, want_grads, strict=True):
        assert_allclose(got, ref, dtype=jnp.float32, reduction_length=args[0].shape[-1] * 8)
    if hlo is not None:
        gathered = _gathered_shapes(hlo)
        for shape in never_gathered:
            assert shape not in gathered, f"{shape} all-gathered: {gathered}"


def _check_attention(mode, mesh, qkv, specs, options, never_gathered=()):
    """Causal attention with ``options``: the Pallas TPU kernel per shard vs XLA unsharded."""

    def attend(impl):
        return lambda q, k, v: pallax.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl, **options
        )

    _check(mode, mesh, attend("pallas_tpu"), attend("xla"), qkv, specs, (0, 1, 2), never_gathered)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_attention(mode, kv_heads):
    mesh = _mesh((2, 4), ("data", "tensor"), mode)
    b, t, n, h = 2, 256, 8, 64
    q, k, v = (
        _random(0, (b, t, n, h)),
        _random(1, (b, t, kv_heads, h)),
        _random(2, (b, t, kv_heads, h)),
    )
    segments = jnp.asarray(np.repeat([[0] * 100 + [1] * 156], b, 0), jnp.int32)
    kv_spec = P("data", None, "tensor") if kv_heads > 1 else P("data")

    _check_attention(
        mode,
        mesh,
        [q, k, v],
        [P("data", None, "tensor"), kv_spec, kv_spec],
        dict(segment_ids=(segments, segments)),
        never_gathered=[(b, t, n, h)],
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "specs",
    [
        [P("data"), P()],  # rows split: the kernel per shard
        # The feature axis split too: each shard normalises its slice with the row sums
        # all-reduced (XLA's formula; the kernel needs whole rows).
        [P("data", None, "tensor"), P("tensor")],
    ],
    ids=["rows", "normalised_axis"],
)
def test_rms_norm(mode, specs):
    mesh = _mesh((2, 4), ("data", "tensor"), mode)
    x, scale = _random(0, (4, 64, 256)), _random(1, (256,))
    norm = lambda impl: lambda x, s: pallax.rms_norm(x, s, implementation=impl)
    _check(
        mode,
        mesh,
        norm("pallas_tpu"),
        norm("xla"),
        [x, scale],
        specs,
        (0, 1),
        never_gathered=[(4, 64, 256)],
    )


@pytest.mark.parametrize("mode", MODES)
def test_gated_mlp_megatron(mode):
    mesh = _mesh((2, 4), ("data", "tensor"), mode)
    x = _random(0, (64, 128))
    wg, wu, wd = (
        _random(1, (128, 512), 0.1),
        _random(2, (128, 512), 0.1),
        _random(3, (512, 128), 0.1),
    )
    mlp = lambda impl: lambda *a: pallax.gated_mlp(*a, implementation=impl)
    specs = [P("data"), P(None, "tensor"), P(None, "tensor"), P("tensor")]
    _check(
        mode,
        mesh,
        mlp("pallas_tpu"),
        mlp("xla"),
        [x, wg, wu, wd],
        specs,
        (0, 1, 2, 3),
        never_gathered=[(128, 512), (512, 128)],
    )


@pytest.mark.parametrize("mode", MODES)
def test_linear_cross_entropy_vocab_sharded(mode):
    mesh = _mesh((2, 4), ("data", "tensor"), mode)
    hidden, weight = _random(0, (64, 128)), _random(1, (128, 1024), 0.1)
    labels = jax.random.randint(jax.random.key(2), (64,), 0, 1024)

    def ce(impl):
        return lambda h, w: pallax.linear_cross_entropy(
            h, w, labels, z_loss=1e-3, logits_soft_cap=20.0, implementation=impl
        )

    _check(
        mode,
        mesh,
        ce("pallas_tpu"),
        ce("xla"),
        [hidden, weight],
        [P("data"), P(None, "tensor")],
        (0, 1),
        never_gathered=[(128, 1024)],
    )


@pytest.mark.parametrize("mode", MODES)
def test_decode_attention(mode):
    mesh = _mesh((2, 4), ("data", "tensor"), mode)
    b, s, n, h = 4, 512, 8, 64
    q, kc, vc = _random(0, (b, 2, n, h)), _random(1, (b, s, 1, h)), _random(2, (b, s, 1, h))
    lengths = jnp.asarray([5, 512, 300, 77], jnp.int32)
    dec = lambda impl: (
        lambda q, k, v: pallax.kernels.decode_attention(q, k, v, lengths, implementation=impl)
    )
    value, _, _ = _run(
        mode,
        mesh,
        dec("pallas_tpu"),
        [q, kc, vc],
        [P("data", None, "tensor"), P("data"), P("data")],
        (),
    )
    assert_allclose(value, dec("xla")(q, kc, vc), dtype=jnp.float32, reduction_length=s)


def test_paged_decode_attention_pool_with_the_batch():
    """Sequence b's pages lie in the pool slice of its batch shard."""
    mesh = _mesh((2, 4), ("data", "tensor"), "auto")
    b, n, h, page, per_seq = 4, 8, 64, 16, 8
    pool = b * per_seq
    q = _random(0, (b, 1, n, h))
    kp, vp = _random(1, (1, pool, page, h)), _random(2, (1, pool, page, h))
    # Shard i (of 2 over data) owns pool pages [16 i, 16 i + 16): shuffle within it.
    table = np.concatenate(
        [np.random.default_rng(i).permutation(16).reshape(2, 8) + 16 * i for i in range(2)]
    ).astype(np.int32)
    lengths = jnp.asarray([1, 128, 70, 33], jnp.int32)
    dec = lambda impl: (
        lambda q, kp, vp: pallax.kernels.paged_decode_attention(
            q, kp, vp, lengths, jnp.asarray(table), implementation=impl
        )
    )
    specs = [P("data", None, "tensor"), P(None, "data"), P(None, "data")]
    value, _, _ = _run("auto", mesh, dec("pallas_tpu"), [q, kp, vp], specs, ())
    assert_allclose(
        value, dec("xla")(q, kp, vp), dtype=jnp.float32, reduction_length=page * per_seq
    )


def test_a_sharded_sequence_is_a_clear_error():
    mesh = _mesh((2, 4), ("data", "tensor"), "explicit")
    q = jax.device_put(_random(0, (2, 256, 8, 64)), NamedSharding(mesh, P(None, "tensor")))
    k = jax.device_put(_random(1, (2, 256, 1, 64)), NamedSharding(mesh, P()))
    with (
        interpret_mode(),
        jax.set_mesh(mesh),
        pytest.raises(
            ValueError,
            match=r"query dimension 1 \(the query sequence, size 256\) is sharded over "
            r"mesh axes \('tensor',\)",
        ),
    ):
        pallax.dot_product_attention(q, k, k, implementation="pallas_tpu")


def test_indivisible_kv_heads_are_a_clear_error():
    mesh = _mesh((1, 4), ("data", "tensor"), "explicit")
    q = jax.device_put(_random(0, (1, 128, 8, 64)), NamedSharding(mesh, P(None, None, "tensor")))
    k = jax.device_put(_random(1, (1, 128, 2, 64)), NamedSharding(mesh, P()))
    with (
        interpret_mode(),
        jax.set_mesh(mesh),
        pytest.raises(ValueError, match="2 key/value heads cannot be split over mesh axes"),
    ):
        pallax.dot_product_attention(q, k, k, implementation="pallas_tpu")


@settings(max_examples=4)
@given(
    mesh_shape=st.sampled_from([(1, 8), (2, 4), (4, 2), (8, 1)]),
    batch_axis=st.sampled_from([None, "data", "tensor", ("data", "tensor")]),
    heads_axis=st.sampled_from([None, "data", "tensor"]),
    kv_heads=st.sampled_from([1, 8]),
    mode=st.sampled_from(MODES[:2]),
)
def test_attention_any_mesh_and_assignment(mesh_shape, batch_axis, heads_axis, kv_heads, mode):
    """Hypothesis over mesh shapes and which dimension goes to which axis (a mesh axis
    used twice is skipped: it cannot split two dimensions)."""
    batch_axes = (batch_axis,) if isinstance(batch_axis, str) else batch_axis or ()
    assume(heads_axis not in batch_axes)
    mesh = _mesh(mesh_shape, ("data", "tensor"), mode)
    b, t, n, h = 8, 128, 8, 64
    q, k, v = (
        _random(0, (b, t, n, h)),
        _random(1, (b, t, kv_heads, h)),
        _random(2, (b, t, kv_heads, h)),
    )
    q_spec = P(batch_axis, None, heads_axis)
    kv_spec = q_spec if kv_heads > 1 else P(batch_axis)

    _check_attention(mode, mesh, [q, k, v], [q_spec, kv_spec, kv_spec], dict(logits_soft_cap=10.0))
