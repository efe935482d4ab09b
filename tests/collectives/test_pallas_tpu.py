"""The remote-DMA all-gather-matmul kernel on 8 simulated TPUs (interpret mode, race detection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, Mesh, PartitionSpec

from pallax.collectives import collective_matmul
from pallax.collectives.pallas_tpu import all_gather_matmul_pallas
from pallax.kernels import interpret_mode
from pallax.testing import assert_allclose, assert_lowers_for_tpu, tpu_interpret_races_found

P = PartitionSpec


def _mesh(devices, n):
    return Mesh(np.asarray(devices[:n]), ("x",), axis_types=(AxisType.Auto,))


def _kernel_fn(mesh, **kwargs):
    return jax.jit(
        jax.shard_map(
            lambda x, w: all_gather_matmul_pallas(x, w, axis_name="x", **kwargs),
            mesh=mesh,
            in_specs=(P("x", None), P(None, "x")),
            out_specs=P(None, "x"),
            check_vma=False,
        )
    )


@pytest.mark.parametrize("n", [8, 3], ids=["ring8", "ring3"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_dot_without_races(cpu_devices, n, dtype):
    mesh = _mesh(cpu_devices, n)
    x = jax.random.normal(jax.random.key(0), (8 * n, 64), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (64, 16 * n), jnp.float32).astype(dtype)
    pltpu.reset_tpu_interpret_mode_state()
    y = _kernel_fn(mesh, interpret=pltpu.InterpretParams(detect_races=True))(x, w)
    jax.block_until_ready(y)  # the race state is read after the kernel has run
    assert not tpu_interpret_races_found()
    assert_allclose(
        y, jnp.dot(x, w, preferred_element_type=jnp.float32), dtype=dtype, reduction_length=64
    )


def test_race_detector_catches_the_ring_without_flow_control(cpu_devices):
    mesh = _mesh(cpu_devices, 8)
    x, w = jnp.ones((64, 128)), jnp.ones((128, 128))
    pltpu.reset_tpu_interpret_mode_state()
    y = _kernel_fn(mesh, interpret=pltpu.InterpretParams(detect_races=True), _flow_control=False)(
        x, w
    )
    jax.block_until_ready(y)
    assert tpu_interpret_races_found()


def test_collective_matmul_dispatches_to_the_kernel_with_gradients(cpu_devices):
    mesh = _mesh(cpu_devices, 8)
    x = jax.random.normal(jax.random.key(2), (64, 32))
    w = jax.random.normal(jax.random.key(3), (32, 64))
    ct = jax.random.normal(jax.random.key(4), (64, 64))
    with interpret_mode(detect_races=True):
        pltpu.reset_tpu_interpret_mode_state()
        y, vjp = jax.vjp(
            lambda x, w: collective_matmul(x, w, mesh=mesh, axis="x", implementation="pallas_tpu"),
            x,
            w,
        )
        dx, dw = jax.block_until_ready(vjp(ct))
    assert not tpu_interpret_races_found()
    assert_allclose(y, x @ w, reduction_length=32)
    assert_allclose(dx, ct @ w.T, reduction_length=64)
    assert_allclose(dw, x.T @ ct, reduction_length=64)


def test_kernel_lowers_for_tpu(cpu_devices):
    mesh = _mesh(cpu_devices, 8)
    # Per device: [256, 1024] bf16 rows of activations, a [1024, 512] column block of weights.
    x = jax.ShapeDtypeStruct((8 * 256, 1024), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1024, 8 * 512), jnp.bfloat16)
    assert_lowers_for_tpu(
        lambda x, w: collective_matmul(x, w, mesh=mesh, axis="x", implementation="pallas_tpu"), x, w
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=jnp.ones((8 * 4, 64))), r"x\.shape\[0\]=4 must be a multiple of 8"),
        (dict(bidirectional=True), r"unidirectional all-gather-matmul"),
        (
            dict(kind="reduce_scatter", x=jnp.ones((64, 64)), w=jnp.ones((64, 64))),
            "unidirectional all-gather-matmul",
        ),
        (dict(x=jnp.ones((8 * 512, 2048)), w=jnp.ones((2048, 8 * 128))), "VMEM"),
    ],
    ids=["rows-not-multiple-of-8", "bidirectional", "reduce-scatter", "too-big-for-vmem"],
)
def test_requests_the_kernel_cannot_take(cpu_devices, kwargs, match):
    mesh = _mesh(cpu_devices, 8)
    args = dict(x=jnp.ones((64, 64)), w=jnp.ones((64, 64))) | kwargs
    x, w = args.pop("x"), args.pop("w")
    with interpret_mode(), pytest.raises(ValueError, match=match):
        collective_matmul(x, w, mesh=mesh, axis="x", implementation="pallas_tpu", **args)
