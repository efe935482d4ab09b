"""Collective matmuls against jnp.dot on simulated CPU devices: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, Mesh, PartitionSpec

from pallax.collectives import all_gather_matmul, collective_matmul, matmul_reduce_scatter
from pallax.testing import assert_allclose

P = PartitionSpec


def _mesh(devices, shape, names):
    return Mesh(
        np.asarray(devices[: int(np.prod(shape))]).reshape(shape),
        names,
        axis_types=(AxisType.Auto,) * len(names),
    )


# (mesh shape, axis names, ring axis): 1-D rings of odd and even size, and 2-D meshes
# with the ring on either axis.
MESHES = [
    ((8,), ("x",), "x"),
    ((3,), ("x",), "x"),
    ((7,), ("x",), "x"),
    ((2, 4), ("data", "tensor"), "tensor"),
    ((4, 2), ("tensor", "data"), "tensor"),
]
MESH_IDS = ["ring8", "ring3", "ring7", "2x4-inner", "4x2-outer"]
# Each example compiles a forward and backward shard_map program: a third of the profile's
# examples (at least 2) keeps 20 parametrisations inside the suite's budget.
FEW = settings(max_examples=max(2, settings.default.max_examples // 3))


def _inputs(seed, rows, k, cols, dtype=jnp.float32):
    kx, kw, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (rows, k), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (k, cols), jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, (rows, cols), jnp.float32).astype(dtype)
    return x, w, ct


def _check(f, x, w, ct, k):
    y, vjp = jax.vjp(f, x, w)
    ref_y, ref_vjp = jax.vjp(lambda x, w: jnp.dot(x, w, precision="highest"), x, w)
    assert_allclose(y, ref_y, reduction_length=k)
    dx, dw = vjp(ct)
    ref_dx, ref_dw = ref_vjp(ct)
    assert_allclose(dx, ref_dx, reduction_length=w.shape[1])
    assert_allclose(dw, ref_dw, reduction_length=x.shape[0])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidi"])
@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter"])
@pytest.mark.parametrize("mesh_shape, names, axis", MESHES, ids=MESH_IDS)
@FEW
@given(
    seed=st.integers(0, 1000),
    rows_per=st.sampled_from([2, 4, 6]),
    k_per=st.integers(1, 5),
    cols_per=st.integers(1, 4),
)
def test_collective_matmul_matches_dot(
    cpu_devices, mesh_shape, names, axis, kind, bidirectional, seed, rows_per, k_per, cols_per
):
    mesh = _mesh(cpu_devices, mesh_shape, names)
    n = mesh.shape[axis]
    rows, k, cols = rows_per * n, k_per * n, cols_per * n
    x, w, ct = _inputs(seed, rows, k, cols)
    f = jax.jit(
        lambda x, w: collective_matmul(
            x, w, mesh=mesh, axis=axis, kind=kind, bidirectional=bidirectional
        )
    )
    _check(f, x, w, ct, k)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidi"])
def test_bf16_inputs_accumulate_like_dot(cpu_devices, bidirectional):
    mesh = _mesh(cpu_devices, (8,), ("x",))
    x, w, _ = _inputs(0, 32, 64, 16, jnp.bfloat16)
    y = collective_matmul(x, w, mesh=mesh, axis="x", bidirectional=bidirectional)
    assert y.dtype == jnp.bfloat16
    assert_allclose(
        y,
        jnp.dot(x, w, preferred_element_type=jnp.float32),
        dtype=jnp.bfloat16,
        reduction_length=64,
    )


def test_inside_shard_map_per_device_shapes(cpu_devices):
    mesh = _mesh(cpu_devices, (8,), ("x",))
    x, w, _ = _inputs(1, 16, 8, 24)

    def body(x_local, w_local):  # x_local [2, 8], w_local [8, 3]
        full = all_gather_matmul(x_local, w_local, axis_name="x")  # [16, 3]: my columns of x @ w
        summed = matmul_reduce_scatter(full, jnp.eye(3), axis_name="x")  # [2, 3]
        return full, summed

    full, summed = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P("x", None), P(None, "x")),
            out_specs=(P(None, "x"), P("x", None)),
        )
    )(x, w)
    assert_allclose(full, x @ w, reduction_length=8)
    # Row block i of `summed` is the sum over devices of their column blocks of x @ w.
    assert_allclose(summed, (x @ w).reshape(16, 8, 3).sum(axis=1), reduction_length=64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(axis="model"), r"axis='model' is not in the mesh"),
        (dict(x=jnp.ones((10, 8))), r"x\.shape\[0\] \(rows\)=10 is not divisible by mesh axis 'x'"),
        (dict(w=jnp.ones((8, 12))), r"w\.shape\[1\] \(columns\)=12 is not divisible"),
        (
            dict(kind="reduce_scatter", x=jnp.ones((16, 12)), w=jnp.ones((12, 8))),
            r"x\.shape\[1\] = w\.shape\[0\]=12 is not divisible",
        ),
        (dict(w=jnp.ones((9, 16))), r"expected x \[M, K\] and w \[K, N\]"),
        (dict(kind="all_to_all"), r"kind must be 'all_gather' or 'reduce_scatter'"),
        (dict(x=jnp.ones((8, 8)), bidirectional=True), r"bidirectional=True splits .* 1 rows"),
    ],
    ids=[
        "axis-not-in-mesh",
        "rows-indivisible",
        "cols-indivisible",
        "k-indivisible",
        "contraction-mismatch",
        "unknown-kind",
        "bidi-odd-rows",
    ],
)
def test_bad_inputs(cpu_devices, kwargs, match):
    mesh = _mesh(cpu_devices, (8,), ("x",))
    args = dict(x=jnp.ones((16, 8)), w=jnp.ones((8, 16)), axis="x") | kwargs
    x, w = args.pop("x"), args.pop("w")
    with pytest.raises(ValueError, match=match):
        collective_matmul(x, w, mesh=mesh, **args)


def test_unknown_axis_name_inside_shard_map(cpu_devices):
    mesh = _mesh(cpu_devices, (8,), ("x",))
    f = jax.shard_map(
        lambda x, w: all_gather_matmul(x, w, axis_name="y"),
        mesh=mesh,
        in_specs=(P("x", None), P(None, "x")),
        out_specs=P(None, "x"),
    )
    with pytest.raises(ValueError, match=r"axis_name='y' is not a mesh axis"):
        f(jnp.ones((16, 8)), jnp.ones((8, 16)))
