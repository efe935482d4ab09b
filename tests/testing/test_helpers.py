"""pallax.testing: tolerances, lowering checks, the multi-device helper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallax.testing import (
    assert_allclose,
    assert_lowers_for_cuda,
    assert_lowers_for_tpu,
    run_with_cpu_devices,
    tolerance,
)


def test_tolerance_grows_with_reduction_length_and_coarser_dtypes():
    assert tolerance(jnp.float32, 4096) > tolerance(jnp.float32, 16)
    assert tolerance(jnp.bfloat16, 16) > 100 * tolerance(jnp.float32, 16)


def test_assert_allclose_catches_a_one_percent_error_in_f32_but_not_in_bf16_rounding():
    x = np.linspace(1.0, 2.0, 64, dtype=np.float32)
    with pytest.raises(AssertionError):
        assert_allclose(x * 1.01, x, reduction_length=64)
    rounded = np.asarray(jnp.asarray(x, jnp.bfloat16))
    assert_allclose(rounded, x, dtype=jnp.bfloat16)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_allclose(x[:3], x)


def test_lowering_checks_find_the_kernel_and_catch_a_plain_xla_function():
    x = jax.ShapeDtypeStruct((8, 128), jnp.float32)

    def add_one_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1

    def pallas_fn(x):
        return pl.pallas_call(add_one_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    assert_lowers_for_tpu(pallas_fn, x)
    with pytest.raises(AssertionError, match="without a Mosaic kernel"):
        assert_lowers_for_tpu(lambda x: x + 1, x)
    with pytest.raises(AssertionError, match="without a Mosaic kernel"):
        assert_lowers_for_cuda(lambda x: x + 1, x)


def test_run_with_cpu_devices_sees_the_requested_count():
    out = run_with_cpu_devices("import jax; print(len(jax.devices()))", num_devices=4)
    assert out.strip() == "4"
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        run_with_cpu_devices("1/0")


def test_in_process_fixture_has_eight_devices(cpu_devices):
    mesh = jax.make_mesh(
        (8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,), devices=cpu_devices
    )
    y = jax.device_put(jnp.arange(16.0), jax.NamedSharding(mesh, jax.P("x")))
    assert len(y.addressable_shards) == 8
