"""The Mosaic GPU kernels compile for an H100 with the real pipeline (layout inference,
LLVM, ptxas) on compile-only devices, forward and gradient in one jit: no layout
failure, no register spills, SMEM within 227 KiB (``assert_compiles``, whose message
names the case, the shapes and the compiler's own words). Configurations the
attention kernels decline (SMEM) raise a clear ValueError when asked for explicitly
and fall back to XLA with ``implementation=None``."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from pallax.bench.compile_cases import attention_case, decode_case, rms_norm_case
from pallax.kernels import AttentionBlockSizes, dot_product_attention
from pallax.testing import assert_compiles, compile_for

pytestmark = [pytest.mark.compile, pytest.mark.timeout(600)]

IMPL = "pallas_mosaic_gpu"
OPTIONS = dict(
    is_causal=True,
    local_window_size=(1024, 0),
    logits_soft_cap=30.0,
    segments=True,
    lengths=True,
)
T = 8192  # compile time hardly depends on the sequence length
BIAS_T = 4004  # dense [T, T] arrays; S % 8 != 0: K/V are padded to whole blocks
BIAS, MASK = (1, 8, BIAS_T, BIAS_T), (1, 1, BIAS_T, BIAS_T)  # per head / shared by heads
KV64 = AttentionBlockSizes(64, 64)
KV128 = AttentionBlockSizes(64, 128)

# Head sizes 64/128/256, groups N/K 1 and 8 (8 query heads), each option set at least
# once per head size where the kernel takes it (H=256 with a bias needs more SMEM
# than a CTA has: declined below).
ATTENTION = [
    attention_case("attention_h64_g1_causal", 1, 64, T, kv_heads=8, is_causal=True),
    attention_case(
        "attention_h64_g8_all_options_bias_mask_kv128",
        8, 64, BIAS_T, bias=BIAS, mask=MASK, block_sizes=KV128, **OPTIONS,
    ),
    attention_case("attention_h128_g8_causal_kv128", 8, 128, T, is_causal=True, block_sizes=KV128),
    attention_case(
        "attention_h128_g1_window_segments_softcap_lengths", 1, 128, T, kv_heads=8, **OPTIONS
    ),
    attention_case("attention_h128_g8_bias", 8, 128, BIAS_T, bias=BIAS, is_causal=True),
    attention_case("attention_h128_g1_mask", 1, 128, BIAS_T, kv_heads=8, mask=BIAS),
    attention_case(
        "attention_h128_g8_all_options_bias_mask", 8, 128, BIAS_T, bias=BIAS, mask=MASK, **OPTIONS
    ),
    attention_case("attention_h256_g1_causal", 1, 256, T, kv_heads=8, is_causal=True),
    attention_case(  # Gemma 2's heads
        "attention_h256_g2_window_segments_softcap_lengths", 2, 256, T, kv_heads=4, **OPTIONS
    ),
    attention_case(
        "attention_h256_g8_window_segments_softcap_lengths_mask",
        8, 256, BIAS_T, mask=MASK, **OPTIONS,
    ),
]  # fmt: skip
# B=8, S=32768, N=8, K=1, H=128; bf16 and f32, contiguous and pages of 16 and 128.
DECODE = [
    decode_case("decode_bf16"),
    decode_case("decode_f32", dtype=jnp.float32),
    decode_case("paged_decode_page16_bf16", page_size=16),
    decode_case("paged_decode_page128_f32", page_size=128, dtype=jnp.float32),
]
RMS_NORM = [
    rms_norm_case("rms_norm_8192x2048", 8192, 2048),
    rms_norm_case("rms_norm_1001x4096", 1001, 4096),  # rows not a multiple of 8
    rms_norm_case("rms_norm_65x256", 65, 256),
]


def _compiles(case):
    fn, args = case.build(IMPL)
    result = assert_compiles("h100", fn, *args, what=f"{case.name} [{IMPL}]")
    assert result.kernels, f"{case.name}: no Mosaic GPU kernel was compiled"
    return result


@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
def test_attention_forward_and_gradients_compile(case):
    result = _compiles(case)
    assert len(result.kernels) == 3, result.summary()  # forward, dq, dkv


@pytest.mark.parametrize("case", DECODE, ids=lambda c: c.name)
def test_decode_compiles(case):
    _compiles(case)


@pytest.mark.parametrize("case", RMS_NORM, ids=lambda c: c.name)
def test_rms_norm_forward_and_gradient_compile(case):
    _compiles(case)  # the backward is XLA's


@pytest.mark.parametrize(
    "h, blocks, bias, match",
    [
        (256, KV128, False, r"H=256, block_kv=128 needs more SMEM .*AttentionBlockSizes\(64, 64\)"),
        (256, KV64, True, r"H=256, block_kv=64 with bias needs more SMEM .*implementation='xla'"),
        (128, KV128, True, r"H=128, block_kv=128 with bias and mask needs more SMEM"),
    ],
    ids=["h256_kv128", "h256_bias", "h128_kv128_bias_mask"],
)
def test_declined_attention_raises_when_explicit_and_falls_back_to_xla(h, blocks, bias, match):
    t, n = 1024, 8
    q = jax.ShapeDtypeStruct((1, t, n, h), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, t, 1, h), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((1, n, t, t), jnp.float32) if bias else None
    m = jax.ShapeDtypeStruct((1, 1, t, t), jnp.bool_) if h == 128 else None

    def loss(implementation):
        def f(q, k, v, b, m):
            out = dot_product_attention(
                q, k, v, b, m, is_causal=True, implementation=implementation, block_sizes=blocks
            )
            return jnp.sum(out.astype(jnp.float32))

        return lambda *a: jax.grad(f, argnums=(0, 1, 2))(*a)

    explicit = compile_for("h100", loss(IMPL), q, kv, kv, b, m)
    assert not explicit.ok and "ValueError" in explicit.error, explicit.summary()
    assert "dot_product_attention: implementation='pallas_mosaic_gpu' cannot run" in explicit.error
    assert re.search(match, explicit.error), explicit.error
    fallback = assert_compiles("h100", loss(None), q, kv, kv, b, m, what=f"H={h} {blocks} [None]")
    assert fallback.kernels == (), fallback.summary()  # XLA's attention: no Mosaic kernel
