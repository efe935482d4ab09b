"""rms_norm: every implementation against the reference, in interpret mode on CPU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallax.kernels import RmsNormBlockSizes, interpret_mode, rms_norm, rms_norm_reference
from pallax.testing import assert_allclose, assert_lowers_for_cuda, assert_lowers_for_tpu
from tests.strategies import dtypes, leading_shapes

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_mosaic_gpu")


@st.composite
def cases(draw, implementation: str):
    lead = draw(leading_shapes())
    if implementation == "pallas_mosaic_gpu":
        dim = draw(st.sampled_from([64, 128, 192, 320]))
        cols = draw(st.sampled_from([None] + [c for c in (64, 128) if dim % c == 0]))
        blocks = draw(st.sampled_from([None, RmsNormBlockSizes(64, cols)]))
    else:
        dim = draw(st.integers(1, 300))
        blocks = draw(st.sampled_from([None, RmsNormBlockSizes(8), RmsNormBlockSizes(16)]))
    return dict(
        shape=(*lead, dim),
        dtype=draw(dtypes()),
        eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        scale_offset=draw(st.sampled_from([0.0, 1.0])),
        block_sizes=None if implementation == "xla" else blocks,
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(case):
    kx, ks, kc = jax.random.split(jax.random.key(case["seed"]), 3)
    shape, dtype = case["shape"], case["dtype"]
    x = (3.0 * jax.random.normal(kx, shape, jnp.float32)).astype(dtype)
    scale = jax.random.normal(ks, shape[-1:], jnp.float32).astype(dtype)
    cotangent = jax.random.normal(kc, shape, jnp.float32).astype(dtype)
    return x, scale, cotangent


def _options(case):
    return dict(eps=case["eps"], scale_offset=case["scale_offset"])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(data=st.data())
def test_forward_matches_reference(implementation, data):
    case = data.draw(cases(implementation))
    x, scale, _ = _inputs(case)
    with interpret_mode():
        y = rms_norm(
            x,
            scale,
            implementation=implementation,
            block_sizes=case["block_sizes"],
            **_options(case),
        )
    expected = rms_norm_reference(x, scale, **_options(case))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_allclose(y, expected, reduction_length=case["shape"][-1], err_msg=str(case))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(data=st.data())
def test_gradients_match_reference(implementation, data):
    case = data.draw(cases(implementation))
    x, scale, cotangent = _inputs(case)

    def kernel(x, scale):
        return rms_norm(
            x,
            scale,
            implementation=implementation,
            block_sizes=case["block_sizes"],
            **_options(case),
        )

    with interpret_mode():
        _, vjp = jax.vjp(kernel, x, scale)
        dx, dscale = vjp(cotangent)
    _, ref_vjp = jax.vjp(lambda x, s: rms_norm_reference(x, s, **_options(case)), x, scale)
    ref_dx, ref_dscale = ref_vjp(cotangent)
    rows = math.prod(case["shape"][:-1])
    assert dx.dtype == x.dtype and dscale.dtype == scale.dtype
    assert_allclose(dx, ref_dx, reduction_length=case["shape"][-1], err_msg=f"dx {case}")
    assert_allclose(
        dscale, ref_dscale, reduction_length=rows * case["shape"][-1], err_msg=f"dscale {case}"
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_reruns_are_bit_identical(implementation, dtype):
    case = dict(shape=(3, 43, 128), dtype=dtype, eps=1e-6, scale_offset=1.0, seed=7)
    x, scale, cotangent = _inputs(case)
    blocks = (
        None
        if implementation == "xla"
        else (
            RmsNormBlockSizes(64, 64)
            if implementation == "pallas_mosaic_gpu"
            else RmsNormBlockSizes(16)
        )
    )

    def run():
        with interpret_mode():
            y, vjp = jax.vjp(
                lambda x, s: rms_norm(
                    x, s, implementation=implementation, block_sizes=blocks, scale_offset=1.0
                ),
                x,
                scale,
            )
            return [np.asarray(a) for a in (y, *vjp(cotangent))]

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert a.tobytes() == b.tobytes()


def test_scale_offset_one_is_gemma_parameterisation():
    x = jax.random.normal(jax.random.key(0), (5, 32))
    scale = jax.random.normal(jax.random.key(1), (32,))
    assert_allclose(
        rms_norm(x, scale, scale_offset=1.0), rms_norm(x, 1.0 + scale), reduction_length=32
    )


def test_zero_rows_stay_finite_in_value_and_gradient():
    # mean(x²) = 0: eps keeps rsqrt finite, and the backward must not produce NaN.
    x = jnp.zeros((4, 128), jnp.float32)
    scale = jnp.ones((128,), jnp.float32)
    for implementation in IMPLEMENTATIONS:
        with interpret_mode():
            y, vjp = jax.vjp(
                lambda x, s, i=implementation: rms_norm(x, s, implementation=i), x, scale
            )
            grads = vjp(jnp.ones_like(y))
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in (y, *grads)), implementation


# --- lowering for the hardware ---------------------------------------------------------------

_GEMINI_ROWS = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16)
_GEMINI_SCALE = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)


def _value_and_grads(implementation):
    def f(x, scale):
        y, vjp = jax.vjp(lambda x, s: rms_norm(x, s, implementation=implementation), x, scale)
        return y, vjp(y)

    return f


def test_tpu_kernels_lower_for_tpu_at_8192x4096_bf16():
    exported = assert_lowers_for_tpu(_value_and_grads("pallas_tpu"), _GEMINI_ROWS, _GEMINI_SCALE)
    assert exported.mlir_module().count("tpu_custom_call") == 2  # forward and backward kernels


def test_mosaic_gpu_kernel_lowers_for_cuda_at_8192x4096_bf16():
    assert_lowers_for_cuda(_value_and_grads("pallas_mosaic_gpu"), _GEMINI_ROWS, _GEMINI_SCALE)


def test_implementation_none_lowers_to_the_kernel_of_the_target():
    f = lambda x, s: rms_norm(x, s)
    assert_lowers_for_tpu(f, _GEMINI_ROWS, _GEMINI_SCALE)
    assert_lowers_for_cuda(f, _GEMINI_ROWS, _GEMINI_SCALE)


# --- bad input --------------------------------------------------------------------------------

_X = jnp.zeros((4, 8), jnp.float32)
_S = jnp.zeros((8,), jnp.float32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scale=jnp.zeros((7,))), ValueError, r"scale must have shape .*\(8,\).*\(7,\)"),
        (dict(scale=jnp.zeros((1, 8))), ValueError, r"scale\.shape=\(1, 8\)"),
        (dict(x=jnp.zeros((4, 8), jnp.int32)), TypeError, r"x must have a floating dtype.*int32"),
        (dict(scale=jnp.zeros((8,), jnp.int8)), TypeError, r"scale must have a floating dtype"),
        (dict(x=jnp.zeros(())), ValueError, r"x must have at least one axis"),
        (dict(x=jnp.zeros((4, 0)), scale=jnp.zeros((0,))), ValueError, r"non-empty"),
        (dict(eps=0.0), ValueError, r"eps must be a number > 0.*0\.0"),
        (dict(eps=-1e-6), ValueError, r"eps must be a number > 0"),
        (dict(scale_offset="1"), TypeError, r"scale_offset must be a number"),
        (dict(implementation="triton"), ValueError, r"unknown implementation='triton'"),
        (dict(block_sizes=(8,)), TypeError, r"block_sizes must be RmsNormBlockSizes"),
        (dict(x=[1.0, 2.0]), TypeError, r"x must be an array"),
    ],
    ids=[
        "scale-wrong-length",
        "scale-wrong-rank",
        "x-int",
        "scale-int",
        "x-scalar",
        "x-empty-axis",
        "eps-zero",
        "eps-negative",
        "offset-not-number",
        "unknown-implementation",
        "block-sizes-wrong-type",
        "x-not-array",
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, match):
    args = dict(x=_X, scale=_S) | kwargs
    x, scale = args.pop("x"), args.pop("scale")
    with pytest.raises(error, match=match):
        rms_norm(x, scale, **args)


@pytest.mark.parametrize(
    "implementation, blocks, match",
    [
        ("pallas_tpu", RmsNormBlockSizes(8, 64), r"block_cols=64 is not used by 'pallas_tpu'"),
        ("pallas_mosaic_gpu", RmsNormBlockSizes(8, 64), r"block_rows must be 64"),
        ("pallas_mosaic_gpu", RmsNormBlockSizes(64, 128), r"block_cols=128 must divide .*=192"),
    ],
    ids=["tpu-cols", "gpu-rows", "gpu-cols-not-dividing"],
)
def test_block_sizes_that_do_not_fit_are_rejected(implementation, blocks, match):
    x = jnp.zeros((4, 192))
    with interpret_mode(), pytest.raises(ValueError, match=match):
        rms_norm(x, jnp.zeros((192,)), implementation=implementation, block_sizes=blocks)


def test_mosaic_gpu_rejects_feature_axis_not_multiple_of_64():
    with (
        interpret_mode(),
        pytest.raises(ValueError, match=r"x\.shape\[-1\]=100 must be a multiple"),
    ):
        rms_norm(jnp.zeros((4, 100)), jnp.zeros((100,)), implementation="pallas_mosaic_gpu")


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_large_shapes_match_reference(implementation, dtype):
    case = dict(shape=(2, 1001, 2048), dtype=dtype, eps=1e-6, scale_offset=0.0, seed=3)
    x, scale, cotangent = _inputs(case)
    with interpret_mode():
        y, vjp = jax.vjp(lambda x, s: rms_norm(x, s, implementation=implementation), x, scale)
        dx, dscale = vjp(cotangent)
    ref_y, ref_vjp = jax.vjp(rms_norm_reference, x, scale)
    ref_dx, ref_dscale = ref_vjp(cotangent)
    assert_allclose(y, ref_y, reduction_length=2048)
    assert_allclose(dx, ref_dx, reduction_length=2048)
    assert_allclose(dscale, ref_dscale, reduction_length=x.size)
