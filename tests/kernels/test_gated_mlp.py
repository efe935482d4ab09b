"""gated_mlp: both implementations against the reference; memory; lowering; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallax.kernels import GatedMlpBlockSizes, gated_mlp, gated_mlp_reference, interpret_mode
from pallax.kernels.gated_mlp import config
from pallax.kernels.gated_mlp.activations import activation, activation_and_grad
from pallax.testing import assert_allclose, assert_lowers_for_tpu
from tests.strategies import dtypes, leading_shapes

IMPLEMENTATIONS = ("xla", "pallas_tpu")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu")


@st.composite
def cases(draw, implementation):
    blocks = None
    if implementation == "pallas_tpu":
        blocks = draw(
            st.sampled_from([None, GatedMlpBlockSizes(8, 128), GatedMlpBlockSizes(16, 256)])
        )
    return dict(
        lead=draw(leading_shapes(max_rows=48)),
        dim=draw(st.sampled_from([8, 32, 64])),
        ff=draw(st.integers(1, 300)),
        dtype=draw(dtypes()),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        blocks=blocks,
        seed=draw(st.integers(0, 1000)),
    )


def _inputs(case):
    keys = jax.random.split(jax.random.key(case["seed"]), 5)
    d, f = case["dim"], case["ff"]
    x = jax.random.normal(keys[0], (*case["lead"], d), jnp.float32)
    wg = jax.random.normal(keys[1], (d, f), jnp.float32) / np.sqrt(d)
    wu = jax.random.normal(keys[2], (d, f), jnp.float32) / np.sqrt(d)
    wd = jax.random.normal(keys[3], (f, d), jnp.float32) / np.sqrt(f)
    ct = jax.random.normal(keys[4], x.shape, jnp.float32)
    return [a.astype(case["dtype"]) for a in (x, wg, wu, wd, ct)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(data=st.data())
def test_forward_and_gradients_match_reference(implementation, data):
    case = data.draw(cases(implementation))
    x, wg, wu, wd, ct = _inputs(case)
    act = case["activation"]
    with interpret_mode():
        y, vjp = jax.vjp(
            lambda *w: gated_mlp(
                *w, activation=act, implementation=implementation, block_sizes=case["blocks"]
            ),
            x,
            wg,
            wu,
            wd,
        )
        grads = vjp(ct)
    ref_y, ref_vjp = jax.vjp(lambda *w: gated_mlp_reference(*w, activation_name=act), x, wg, wu, wd)
    ref_grads = ref_vjp(ct)
    rows = int(np.prod(case["lead"], dtype=int))
    k = case["dim"] * case["ff"]
    assert y.dtype == x.dtype
    assert_allclose(y, ref_y, reduction_length=k, err_msg=str(case))
    for name, got, want in zip(
        ("dx", "dw_gate", "dw_up", "dw_down"), grads, ref_grads, strict=True
    ):
        assert got.dtype == want.dtype, name
        assert_allclose(got, want, reduction_length=k * max(rows, 1), err_msg=f"{name} {case}")


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_hand_written_activation_derivatives_match_autodiff(name):
    g = jnp.linspace(-8.0, 8.0, 1001)
    act, dact = activation_and_grad(name, g)
    # Both sides evaluate 0.5 * (1 + tanh(..)) near tanh = -1 in f32, each with its own
    # cancellation: compare at a few f32 ulps of the O(1) terms, not relative to ~1e-5 values.
    np.testing.assert_allclose(act, activation(name, g), rtol=1e-6, atol=1e-5)
    want = jax.vmap(jax.grad(lambda v: activation(name, v)))(g)
    np.testing.assert_allclose(dact, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_reruns_are_bit_identical(implementation, dtype):
    case = dict(
        lead=(3, 7),
        dim=32,
        ff=200,
        dtype=dtype,
        activation="silu",
        blocks=GatedMlpBlockSizes(8, 128) if implementation == "pallas_tpu" else None,
        seed=5,
    )
    x, wg, wu, wd, ct = _inputs(case)

    def run():
        with interpret_mode():
            y, vjp = jax.vjp(
                lambda *w: gated_mlp(
                    *w, activation="silu", implementation=implementation, block_sizes=case["blocks"]
                ),
                x,
                wg,
                wu,
                wd,
            )
            return [np.asarray(a).tobytes() for a in (y, *vjp(ct))]

    assert run() == run()


def _residual_bytes(fn, *args):
    _, vjp = jax.vjp(fn, *args)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp)) - sum(a.nbytes for a in args)


def test_backward_keeps_no_hidden_activations():
    x = jnp.ones((256, 64))
    wg, wu, wd = jnp.ones((64, 512)), jnp.ones((64, 512)), jnp.ones((512, 64))
    naive = _residual_bytes(lambda *a: gated_mlp_reference(*a), x, wg, wu, wd)
    ours = _residual_bytes(lambda *a: gated_mlp(*a, implementation="xla"), x, wg, wu, wd)
    assert ours <= 0 < naive  # ours stores only its inputs; autodiff stores [T, F] tensors
    assert naive >= 2 * 256 * 512 * 4


def test_tpu_kernels_lower_at_gemini_size():
    # T = 8192, D = 2048, F = 16384, bf16: forward, dx and dW kernels.
    args = [
        jax.ShapeDtypeStruct(s, jnp.bfloat16)
        for s in ((8192, 2048), (2048, 16384), (2048, 16384), (16384, 2048))
    ]
    f = jax.value_and_grad(
        lambda *a: jnp.sum(gated_mlp(*a, implementation="pallas_tpu")), argnums=(0, 1, 2, 3)
    )
    exported = assert_lowers_for_tpu(f, *args)
    assert exported.mlir_module().count("tpu_custom_call") == 3


@given(
    rows=st.integers(1, 65536),
    dim=st.sampled_from([512, 2048, 4096, 8192]),
    ff=st.integers(1, 65536),
)
def test_default_blocks_fit_the_vmem_budget(rows, dim, ff):
    blocks = config.default_block_sizes(
        rows=rows, dim=dim, ff=ff, dtype=jnp.bfloat16, device_kind=None
    )
    if (blocks.block_rows, blocks.block_ff) != (8, 128):
        assert config.working_set_bytes(blocks, dim, 2) <= config._VMEM_BUDGET


_X = jnp.ones((4, 8))
_WG, _WU, _WD = jnp.ones((8, 16)), jnp.ones((8, 16)), jnp.ones((16, 8))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=jnp.ones((4, 8), jnp.int32)), TypeError, "x must be floating"),
        (dict(x=jnp.ones((4, 9))), ValueError, r"x\.shape=\(4, 9\).*expected \[\.\.\., 8\]"),
        (dict(w_up=jnp.ones((8, 17))), ValueError, r"w_up\.shape=\(8, 17\)"),
        (dict(w_down=jnp.ones((8, 16))), ValueError, r"w_down\.shape=\(8, 16\)"),
        (dict(w_gate=jnp.ones((8,))), ValueError, r"w_gate/w_up \[D, F\]"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (dict(implementation="pallas_mosaic_gpu"), ValueError, "does not exist for this op"),
        (dict(block_sizes=(8, 128)), TypeError, "block_sizes must be GatedMlpBlockSizes"),
    ],
    ids=[
        "x-int",
        "x-dim",
        "w-up-shape",
        "w-down-shape",
        "w-gate-rank",
        "activation",
        "no-gpu-kernel",
        "block-type",
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = dict(x=_X, w_gate=_WG, w_up=_WU, w_down=_WD) | kwargs
    arrays = [args.pop(k) for k in ("x", "w_gate", "w_up", "w_down")]
    with pytest.raises(error, match=match):
        gated_mlp(*arrays, **args)


@pytest.mark.parametrize("kwargs", [dict(block_rows=12), dict(block_ff=100), dict(block_rows=0)])
def test_invalid_block_sizes(kwargs):
    with pytest.raises(ValueError, match="must be a positive multiple"):
        GatedMlpBlockSizes(**kwargs)
