"""linear_cross_entropy: both implementations against the reference and optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallax.kernels import (
    LinearCrossEntropyBlockSizes,
    interpret_mode,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from pallax.testing import assert_allclose, assert_lowers_for_tpu
from tests.strategies import dtypes

IMPLEMENTATIONS = ("xla", "pallas_tpu")
IGNORE = -100


@st.composite
def cases(draw, implementation):
    tokens = draw(st.integers(1, 70))
    vocab = draw(st.integers(2, 400))
    if implementation == "pallas_tpu":
        blocks = LinearCrossEntropyBlockSizes(
            draw(st.sampled_from([8, 16, 32])), draw(st.sampled_from([128, 256]))
        )
    else:
        blocks = LinearCrossEntropyBlockSizes(256, draw(st.sampled_from([7, 64, 128, 1024])))
    return dict(
        tokens=tokens,
        dim=draw(st.sampled_from([8, 32, 128])),
        vocab=vocab,
        dtype=draw(dtypes()),
        soft_cap=draw(st.sampled_from([None, 3.0, 30.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        ignore=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        blocks=blocks,
        seed=draw(st.integers(0, 1000)),
    )


def _inputs(case):
    kh, kw, kl, ki = jax.random.split(jax.random.key(case["seed"]), 4)
    hidden = jax.random.normal(kh, (case["tokens"], case["dim"]), jnp.float32)
    weight = (
        jax.random.normal(kw, (case["dim"], case["vocab"]), jnp.float32) / np.sqrt(case["dim"]) * 3
    )
    labels = jax.random.randint(kl, (case["tokens"],), 0, case["vocab"])
    if case["ignore"]:
        labels = jnp.where(jax.random.bernoulli(ki, 0.3, labels.shape), IGNORE, labels)
    return hidden.astype(case["dtype"]), weight.astype(case["dtype"]), labels


def _kwargs(case):
    return dict(
        logits_soft_cap=case["soft_cap"],
        z_loss=case["z_loss"],
        ignore_index=IGNORE if case["ignore"] else None,
        reduction=case["reduction"],
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(data=st.data())
def test_loss_lse_and_gradients_match_reference(implementation, data):
    case = data.draw(cases(implementation))
    hidden, weight, labels = _inputs(case)
    kw = _kwargs(case)

    def ours(h, w):
        loss, lse = linear_cross_entropy(
            h,
            w,
            labels,
            implementation=implementation,
            block_sizes=case["blocks"],
            return_lse=True,
            **kw,
        )
        return jnp.sum(loss) + 0.1 * jnp.sum(lse), (loss, lse)

    def ref(h, w):
        loss, lse = linear_cross_entropy_reference(h, w, labels, return_lse=True, **kw)
        return jnp.sum(loss) + 0.1 * jnp.sum(lse), (loss, lse)

    with interpret_mode():
        (_, (loss, lse)), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(
            hidden, weight
        )
    (_, (ref_loss, ref_lse)), ref_grads = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(
        hidden, weight
    )
    k = case["dim"] * case["vocab"]
    # Logits in bf16 matmuls carry bf16 rounding of products: compare at the inputs' dtype.
    dtype = case["dtype"]
    assert_allclose(loss, ref_loss, dtype=dtype, reduction_length=k, err_msg=f"loss {case}")
    assert_allclose(lse, ref_lse, dtype=dtype, reduction_length=k, err_msg=f"lse {case}")
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == weight.dtype
    assert_allclose(grads[0], ref_grads[0], dtype=dtype, reduction_length=k, err_msg=f"dh {case}")
    assert_allclose(grads[1], ref_grads[1], dtype=dtype, reduction_length=k, err_msg=f"dw {case}")


@given(seed=st.integers(0, 100), tokens=st.integers(1, 40), vocab=st.integers(2, 300))
def test_matches_optax_on_materialised_logits(seed, tokens, vocab):
    kh, kw, kl = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(kh, (tokens, 16))
    weight = jax.random.normal(kw, (16, vocab))
    labels = jax.random.randint(kl, (tokens,), 0, vocab)

    def optax_loss(h, w):
        logits = jnp.dot(h, w, precision="highest")
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    ours = lambda h, w: linear_cross_entropy(
        h, w, labels, block_sizes=LinearCrossEntropyBlockSizes(256, 64)
    )
    value, grads = jax.value_and_grad(ours, argnums=(0, 1))(hidden, weight)
    ref_value, ref_grads = jax.value_and_grad(optax_loss, argnums=(0, 1))(hidden, weight)
    assert_allclose(value, ref_value, reduction_length=16 * vocab)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_allclose(got, want, reduction_length=16 * vocab)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ignored_tokens_contribute_nothing(implementation):
    hidden = jax.random.normal(jax.random.key(0), (24, 32))
    weight = jax.random.normal(jax.random.key(1), (32, 200))
    labels = jax.random.randint(jax.random.key(2), (24,), 0, 200)
    ignored = labels.at[::3].set(IGNORE)
    kept = np.arange(24) % 3 != 0

    def loss(h, lab, reduction):
        return linear_cross_entropy(
            h, weight, lab, ignore_index=IGNORE, reduction=reduction, implementation=implementation
        )

    with interpret_mode():
        per_token = loss(hidden, ignored, "none")
        dh = jax.grad(lambda h: loss(h, ignored, "sum"))(hidden)
        mean_all_kept = loss(hidden[kept], labels[kept], "mean")
        mean_ignored = loss(hidden, ignored, "mean")
    assert np.all(np.asarray(per_token)[~kept] == 0)
    assert np.all(np.asarray(dh)[~kept] == 0)
    assert_allclose(mean_ignored, mean_all_kept, reduction_length=32 * 200)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_reruns_are_bit_identical(implementation, dtype):
    case = dict(
        tokens=45,
        dim=32,
        vocab=333,
        dtype=dtype,
        soft_cap=30.0,
        z_loss=1e-3,
        ignore=True,
        reduction="mean",
        seed=1,
        blocks=LinearCrossEntropyBlockSizes(16, 128),
    )
    hidden, weight, labels = _inputs(case)

    def run():
        with interpret_mode():
            f = lambda h, w: linear_cross_entropy(
                h,
                w,
                labels,
                implementation=implementation,
                block_sizes=case["blocks"],
                **_kwargs(case),
            )
            value, grads = jax.value_and_grad(f, argnums=(0, 1))(hidden, weight)
        return [np.asarray(a).tobytes() for a in (value, *grads)]

    assert run() == run()


def _memory(fn, vocab, tokens=8192, dim=1024):
    args = (
        jax.ShapeDtypeStruct((tokens, dim), jnp.float32),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_xla_path_memory_is_an_eighth_of_naive_and_flat_in_vocab():
    naive = lambda h, w, lab: optax.softmax_cross_entropy_with_integer_labels(h @ w, lab).mean()
    ours = lambda h, w, lab: linear_cross_entropy(h, w, lab, implementation="xla")
    ours_small, ours_large = _memory(ours, 32768), _memory(ours, 65536)
    assert ours_small * 8 <= _memory(naive, 32768), (ours_small, _memory(naive, 32768))
    assert ours_large <= ours_small * 1.05, (ours_small, ours_large)


def test_tpu_kernels_lower_at_gemini_size():
    # T = 8192 tokens, D = 2048, V = 256000 (Gemini's vocabulary size), bf16.
    args = (
        jax.ShapeDtypeStruct((8192, 2048), jnp.bfloat16),
        jax.ShapeDtypeStruct((2048, 256000), jnp.bfloat16),
        jax.ShapeDtypeStruct((8192,), jnp.int32),
    )
    f = jax.value_and_grad(
        lambda h, w, lab: linear_cross_entropy(h, w, lab, implementation="pallas_tpu"),
        argnums=(0, 1),
    )
    exported = assert_lowers_for_tpu(f, *args)
    assert exported.mlir_module().count("tpu_custom_call") == 3  # forward, d_hidden, d_weight


_H, _W, _L = jnp.ones((4, 8)), jnp.ones((8, 10)), jnp.zeros((4,), jnp.int32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hidden=jnp.ones((4, 8), jnp.int32)), TypeError, "hidden must be floating"),
        (dict(labels=jnp.zeros((4,))), TypeError, "labels must be integers"),
        (
            dict(weight=jnp.ones((9, 10))),
            ValueError,
            r"hidden\.shape\[-1\]=8 must equal "
            r"weight\.shape\[0\]=9",
        ),
        (dict(weight=jnp.ones((8,))), ValueError, r"weight \[D, V\]"),
        (dict(labels=jnp.zeros((5,), jnp.int32)), ValueError, r"labels\.shape=\(5,\)"),
        (dict(labels=jnp.array([0, 1, 10, 2])), ValueError, r"\[0, 10\).*labels\[2\]=10"),
        (dict(labels=jnp.array([0, -1, 1, 2])), ValueError, r"labels\[1\]=-1"),
        (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap must be None or > 0"),
        (dict(z_loss=-1.0), ValueError, "z_loss must be >= 0"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(implementation="pallas_mosaic_gpu"), ValueError, "does not exist for this op"),
        (
            dict(block_sizes=LinearCrossEntropyBlockSizes(8, 100), implementation="pallas_tpu"),
            ValueError,
            "block_vocab=100 must be a multiple of 128",
        ),
    ],
    ids=[
        "hidden-int",
        "labels-float",
        "dim-mismatch",
        "weight-rank",
        "labels-shape",
        "label-too-big",
        "label-negative",
        "softcap",
        "zloss",
        "reduction",
        "ignore-type",
        "no-gpu-kernel",
        "tpu-block",
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = dict(hidden=_H, weight=_W, labels=_L) | kwargs
    h, w, lab = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with interpret_mode(), pytest.raises(error, match=match):
        linear_cross_entropy(h, w, lab, **args)


def test_traced_out_of_range_labels_do_not_raise():
    # Under jit the range cannot be checked; the label logit of such a token is 0.
    f = jax.jit(lambda lab: linear_cross_entropy(_H, _W, lab, reduction="none"))
    assert np.isfinite(np.asarray(f(jnp.array([0, 1, 10, 2])))).all()
