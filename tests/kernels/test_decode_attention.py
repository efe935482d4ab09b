"""decode_attention / paged_decode_attention against the reference and full attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallax.kernels import (
    DecodeBlockSizes,
    decode_attention,
    decode_attention_reference,
    dot_product_attention,
    interpret_mode,
    paged_decode_attention,
)
from pallax.kernels.decode_attention.reference import gather_pages
from pallax.testing import (
    assert_allclose,
    assert_lowers_for_cuda,
    assert_lowers_for_tpu,
    gpu_interpret_races_found,
)
from tests.strategies import dtypes

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_mosaic_gpu")


@st.composite
def cases(draw, implementation):
    n = draw(st.sampled_from([2, 4]))
    s = draw(st.integers(1, 300))
    return dict(
        b=draw(st.integers(1, 3)),
        s=s,
        n=n,
        k=draw(st.sampled_from(sorted({1, 2, n}))),
        h=128,
        tq=draw(st.sampled_from([1, 1, 3])),
        dtype=draw(dtypes()),
        lengths=draw(
            st.lists(st.sampled_from([0, 1, s, max(0, s - 7), s // 2]), min_size=3, max_size=3)
        ),
        soft_cap=draw(st.sampled_from([None, 5.0])),
        window=draw(st.sampled_from([None, (16, 0), 40])),
        blocks=None
        if implementation == "xla"
        else draw(st.sampled_from([None, DecodeBlockSizes(64, 1), DecodeBlockSizes(32, 3)])),
        seed=draw(st.integers(0, 1000)),
    )


def _inputs(case):
    keys = jax.random.split(jax.random.key(case["seed"]), 3)
    b, s, n, k, h, tq = (case[x] for x in ("b", "s", "n", "k", "h", "tq"))
    q = jax.random.normal(keys[0], (b, tq, n, h), jnp.float32).astype(case["dtype"])
    kc = jax.random.normal(keys[1], (b, s, k, h), jnp.float32).astype(case["dtype"])
    vc = jax.random.normal(keys[2], (b, s, k, h), jnp.float32).astype(case["dtype"])
    return q, kc, vc, jnp.array(case["lengths"][:b], jnp.int32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(data=st.data())
def test_matches_reference(implementation, data):
    case = data.draw(cases(implementation))
    q, kc, vc, lengths = _inputs(case)
    kw = dict(logits_soft_cap=case["soft_cap"], local_window_size=case["window"])
    with interpret_mode():
        out = decode_attention(
            q, kc, vc, lengths, implementation=implementation, block_sizes=case["blocks"], **kw
        )
    ref = decode_attention_reference(q, kc, vc, lengths, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_allclose(out, ref, reduction_length=case["s"] * case["h"], err_msg=str(case))
    zero = np.asarray(lengths) == 0
    assert not np.any(np.asarray(out)[zero])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(seed=st.integers(0, 100), length=st.integers(1, 200), tq=st.integers(1, 4))
def test_equals_full_attention_over_the_valid_prefix(implementation, seed, length, tq):
    tq = min(tq, length)
    keys = jax.random.split(jax.random.key(seed), 3)
    kc = jax.random.normal(keys[1], (1, 256, 1, 128))
    vc = jax.random.normal(keys[2], (1, 256, 1, 128))
    q = jax.random.normal(keys[0], (1, tq, 4, 128))
    with interpret_mode():
        out = decode_attention(q, kc, vc, jnp.array([length]), implementation=implementation)
    # The same tokens through causal attention over the prefix: queries are its last tq rows.
    prefix_q = jnp.zeros((1, length, 4, 128)).at[:, length - tq :].set(q)
    full = dot_product_attention(prefix_q, kc[:, :length], vc[:, :length], is_causal=True)
    assert_allclose(out, full[:, length - tq :], reduction_length=length * 128)


@st.composite
def paged_cases(draw, implementation):
    page = draw(st.sampled_from([16, 32, 128]))
    per_seq = draw(st.integers(1, 4))
    b = draw(st.integers(1, 3))
    cap = per_seq * page
    return dict(
        b=b,
        page=page,
        per_seq=per_seq,
        pages=b * per_seq + draw(st.integers(0, 3)),
        n=4,
        k=draw(st.sampled_from([1, 2])),
        h=128,
        tq=draw(st.sampled_from([1, 2])),
        dtype=draw(dtypes()),
        lengths=draw(st.lists(st.sampled_from([0, 1, cap, cap // 2 + 1]), min_size=b, max_size=b)),
        window=draw(st.sampled_from([None, (24, 0)])),
        seed=draw(st.integers(0, 1000)),
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_paged_matches_contiguous_reference(implementation, data):
    case = data.draw(paged_cases(implementation))
    keys = jax.random.split(jax.random.key(case["seed"]), 4)
    shape = (case["k"], case["pages"], case["page"], case["h"])
    kp = jax.random.normal(keys[0], shape, jnp.float32).astype(case["dtype"])
    vp = jax.random.normal(keys[1], shape, jnp.float32).astype(case["dtype"])
    # A shuffled page table: sequences own disjoint, scattered pages.
    table = jax.random.permutation(keys[2], case["pages"])[: case["b"] * case["per_seq"]]
    table = table.reshape(case["b"], case["per_seq"])
    q = jax.random.normal(
        keys[3], (case["b"], case["tq"], case["n"], case["h"]), jnp.float32
    ).astype(case["dtype"])
    lengths = jnp.array(case["lengths"], jnp.int32)
    with interpret_mode():
        out = paged_decode_attention(
            q,
            kp,
            vp,
            lengths,
            table,
            implementation=implementation,
            local_window_size=case["window"],
        )
    ref = decode_attention_reference(
        q,
        gather_pages(kp, table),
        gather_pages(vp, table),
        lengths,
        local_window_size=case["window"],
    )
    assert_allclose(
        out, ref, reduction_length=case["per_seq"] * case["page"] * 128, err_msg=str(case)
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_reruns_are_bit_identical(implementation):
    case = dict(b=3, s=200, n=4, k=2, h=128, tq=2, dtype=jnp.bfloat16, lengths=[0, 77, 200], seed=1)
    q, kc, vc, lengths = _inputs(case)

    def run():
        with interpret_mode():
            out = decode_attention(
                q,
                kc,
                vc,
                lengths,
                implementation=implementation,
                block_sizes=DecodeBlockSizes(64, 2),
            )
        return np.asarray(out).tobytes()

    assert run() == run()


def test_traced_lengths_beyond_the_cache_are_clamped():
    q, kc, vc, _ = _inputs(
        dict(b=1, s=16, n=2, k=1, h=128, tq=1, dtype=jnp.float32, lengths=[16], seed=0)
    )
    f = jax.jit(lambda length: decode_attention(q, kc, vc, length))
    assert_allclose(f(jnp.array([99])), f(jnp.array([16])), reduction_length=16)


def test_tpu_kernels_lower_for_gemini_decode():
    # B = 8, S = 32768, N = 8, K = 1, H = 128, bf16; and a paged cache of 128-token pages.
    q = jax.ShapeDtypeStruct((8, 8, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((8, 32768, 1, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    assert_lowers_for_tpu(
        lambda q, k, v, n: decode_attention(q, k, v, n, implementation="pallas_tpu"),
        q,
        cache,
        cache,
        lengths,
    )
    pages = jax.ShapeDtypeStruct((1, 2048, 128, 128), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    assert_lowers_for_tpu(
        lambda q, k, v, n, p: paged_decode_attention(q, k, v, n, p, implementation="pallas_tpu"),
        q,
        pages,
        pages,
        lengths,
        table,
    )


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_mosaic_gpu_kernel_double_buffering_is_race_free(paged):
    # Two TMA slots per K and V: a slot is refilled only after every thread of the
    # warpgroup has read it. The GPU interpreter's race detector reports a race when
    # the barrier that ends a step is removed (checked when the kernel was written).
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, 1, 4, 64))
    kv = jax.random.normal(keys[1], (1, 300, 1, 64))
    blocks = DecodeBlockSizes(64, 1)
    with interpret_mode(detect_races=True):
        if paged:
            pages = kv.reshape(1, 10, 30, 64)[:, :, :16]  # ten pages of 16 rows
            table = jnp.arange(10)[None]
            out = paged_decode_attention(
                q, pages, pages, jnp.array([150]), table,
                implementation="pallas_mosaic_gpu", block_sizes=blocks,
            )  # fmt: skip
        else:
            out = decode_attention(
                q, kv, kv, jnp.array([290]), implementation="pallas_mosaic_gpu", block_sizes=blocks
            )
        out.block_until_ready()
    assert not gpu_interpret_races_found()


def test_mosaic_gpu_kernels_lower_for_cuda():
    # The same Gemini decode shapes, and paged caches of 16- and 128-token pages.
    q = jax.ShapeDtypeStruct((8, 8, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((8, 32768, 1, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    gpu = dict(implementation="pallas_mosaic_gpu")
    assert_lowers_for_cuda(
        lambda q, k, v, n: decode_attention(q, k, v, n, **gpu), q, cache, cache, lengths
    )
    for page in (16, 128):
        pages = jax.ShapeDtypeStruct((1, 8 * 32768 // page, page, 128), jnp.bfloat16)
        table = jax.ShapeDtypeStruct((8, 32768 // page), jnp.int32)
        assert_lowers_for_cuda(
            lambda q, k, v, n, p: paged_decode_attention(q, k, v, n, p, **gpu),
            q,
            pages,
            pages,
            lengths,
            table,
        )


@pytest.mark.parametrize(
    "query, cache, page, match",
    [
        ((1, 5, 4, 128), (1, 64, 1, 128), None, "20 query rows per KV head exceed 16"),
        ((1, 4, 96), (1, 64, 2, 96), None, "H=96 must be a multiple of 64"),
        ((1, 4, 128), (1, 4, 24, 128), 24, "page_size=24 must be 16, 32"),
    ],
    ids=["too-many-rows", "head-size", "page-size"],
)
def test_mosaic_gpu_kernel_rejects_what_it_cannot_take(query, cache, page, match):
    q = jnp.ones(query)
    with interpret_mode(), pytest.raises(ValueError, match=match):
        if page is None:
            decode_attention(
                q, jnp.ones(cache), jnp.ones(cache), jnp.array([3]),
                implementation="pallas_mosaic_gpu",
            )  # fmt: skip
        else:
            paged_decode_attention(
                q, jnp.ones(cache), jnp.ones(cache), jnp.array([3]), jnp.array([[0, 1]]),
                implementation="pallas_mosaic_gpu",
            )  # fmt: skip


_Q, _C, _L = jnp.ones((2, 4, 128)), jnp.ones((2, 16, 2, 128)), jnp.array([3, 16])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(query=jnp.ones((2, 128))), ValueError, r"query must be \[B, N, H\]"),
        (
            dict(key_cache=jnp.ones((2, 16, 3, 128)), value_cache=jnp.ones((2, 16, 3, 128))),
            ValueError,
            "N=4 must be a multiple of KV heads K=3",
        ),
        (dict(value_cache=jnp.ones((2, 15, 2, 128))), ValueError, "must both be"),
        (dict(lengths=jnp.array([3, 17])), ValueError, r"lengths must be in \[0, S="),
        (dict(lengths=jnp.array([3.0, 1.0])), ValueError, "lengths must be an int array"),
        (dict(lengths=jnp.array([3])), ValueError, r"shape \(B,\)=\(2,\)"),
        (dict(query=jnp.ones((2, 4, 128), jnp.int32)), TypeError, "query must be floating"),
        (dict(local_window_size=(-1, 0)), ValueError, "local_window_size"),
        (dict(implementation="pallas_triton"), ValueError, "unknown implementation"),
    ],
    ids=[
        "query-rank",
        "heads",
        "cache-mismatch",
        "length-too-long",
        "length-float",
        "length-shape",
        "query-int",
        "window",
        "unknown-implementation",
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = dict(query=_Q, key_cache=_C, value_cache=_C, lengths=_L) | kwargs
    with interpret_mode(), pytest.raises(error, match=match):
        decode_attention(
            args.pop("query"),
            args.pop("key_cache"),
            args.pop("value_cache"),
            args.pop("lengths"),
            **args,
        )


def test_tpu_kernel_rejects_unaligned_heads_with_several_kv_heads():
    with interpret_mode(), pytest.raises(ValueError, match="H=64 must be a multiple of 128"):
        decode_attention(
            jnp.ones((1, 4, 64)),
            jnp.ones((1, 8, 2, 64)),
            jnp.ones((1, 8, 2, 64)),
            jnp.array([3]),
            implementation="pallas_tpu",
        )


@pytest.mark.parametrize(
    "pages, table, lengths, match",
    [
        (jnp.ones((1, 4, 16, 128)), jnp.array([[0, 4]]), jnp.array([3]), r"in \[0, 4\)"),
        (
            jnp.ones((1, 4, 16, 128)),
            jnp.array([[0, 1]]),
            jnp.array([33]),
            "pages_per_sequence \\* page_size=32",
        ),
        (jnp.ones((1, 4, 12, 128)), jnp.array([[0, 1]]), jnp.array([3]), "multiple of 8"),
        (jnp.ones((4, 16, 128)), jnp.array([[0, 1]]), jnp.array([3]), "key_pages must be"),
    ],
    ids=["page-out-of-range", "length-past-pages", "page-size", "pages-rank"],
)
def test_paged_bad_inputs(pages, table, lengths, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(jnp.ones((1, 2, 128)), pages, pages, lengths, table)
