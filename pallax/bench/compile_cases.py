"""Compile cases shared by the compile suite (tests/compile) and the compile report
(``python -m pallax.bench.compile_report``): each builds a function and its
ShapeDtypeStruct arguments at production shapes, forward and gradient in one jit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallax

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[str], tuple[Callable, list]]  # implementation -> (fn, args)


def _loss_and_grads(f, argnums):
    def fn(*args):
        return jax.value_and_grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=argnums)(
            *args
        )

    return fn


def attention_case(name, g, h, t, *, b=1, kv_heads=1, bias=None, mask=None, **options):
    """Attention forward + gradients (of q, k, v and the bias) at [b, t, g*kv_heads, h]."""
    segments, lengths = options.pop("segments", False), options.pop("lengths", False)
    n = g * kv_heads

    def build(impl):
        args = [S((b, t, n, h), BF16), S((b, t, kv_heads, h), BF16), S((b, t, kv_heads, h), BF16)]
        args += [None if bias is None else S(bias, jnp.float32)]
        args += [None if mask is None else S(mask, jnp.bool_)]
        args += [S((b, t), jnp.int32)] * 2 if segments else [None, None]
        args += [S((b,), jnp.int32) if lengths else None]

        def fn(q, k, v, bi, m, q_seg, kv_seg, length):
            def f(q, k, v, bi):
                return pallax.dot_product_attention(
                    q,
                    k,
                    v,
                    bi,
                    m,
                    segment_ids=None if q_seg is None else (q_seg, kv_seg),
                    query_seq_lengths=length,
                    key_value_seq_lengths=length,
                    implementation=impl,
                    **options,
                )

            return _loss_and_grads(f, (0, 1, 2, 3) if bi is not None else (0, 1, 2))(q, k, v, bi)

        return fn, args

    return Case(name, build)


def decode_case(name, *, b=8, s=32768, n=8, k=1, h=128, tq=1, dtype=BF16, page_size=None):
    """Decode (or paged decode) of tq tokens over an s-long cache."""

    def build(impl):
        q = S((b, tq, n, h), dtype)
        lengths = S((b,), jnp.int32)
        if page_size is None:
            cache = S((b, s, k, h), dtype)
            return (
                lambda q, kc, vc, ln: pallax.kernels.decode_attention(
                    q, kc, vc, ln, implementation=impl
                ),
                [q, cache, cache, lengths],
            )
        per_seq = s // page_size
        pages = S((k, b * per_seq, page_size, h), dtype)
        table = S((b, per_seq), jnp.int32)
        return (
            lambda q, kp, vp, ln, tb: pallax.kernels.paged_decode_attention(
                q, kp, vp, ln, tb, implementation=impl
            ),
            [q, pages, pages, lengths, table],
        )

    return Case(name, build)


def rms_norm_case(name, rows, dim):
    def build(impl):
        f = lambda x, s: pallax.rms_norm(x, s, implementation=impl)
        return _loss_and_grads(f, (0, 1)), [S((rows, dim), BF16), S((dim,), BF16)]

    return Case(name, build)


def gated_mlp_case(name, rows, d, f):
    def build(impl):
        fn = lambda x, wg, wu, wd: pallax.gated_mlp(x, wg, wu, wd, implementation=impl)
        args = [S((rows, d), BF16), S((d, f), BF16), S((d, f), BF16), S((f, d), BF16)]
        return _loss_and_grads(fn, (0, 1, 2, 3)), args

    return Case(name, build)


def cross_entropy_case(name, rows, d, vocab):
    def build(impl):
        def fn(hidden, weight, labels):
            f = lambda h, w: pallax.linear_cross_entropy(
                h, w, labels, z_loss=1e-4, implementation=impl
            )
            return _loss_and_grads(f, (0, 1))(hidden, weight)

        return fn, [S((rows, d), BF16), S((d, vocab), BF16), S((rows,), jnp.int32)]

    return Case(name, build)


# Production shapes: Gemini Nano-like heads (MQA, head_dim 256, 8-16 query heads),
# 32k context; dense bias/mask arrays at 4k (a [T, T] f32 bias at 32k is 4 GiB).
TPU_ATTENTION = [
    attention_case("attention_g8_h128_causal_2k", 8, 128, 2048, is_causal=True),
    attention_case(
        "attention_g1_h64_window_segments_softcap_lengths_32k",
        1,
        64,
        32768,
        kv_heads=4,
        is_causal=True,
        local_window_size=(1024, 0),
        logits_soft_cap=30.0,
        segments=True,
        lengths=True,
    ),
    attention_case("attention_g16_h256_causal_32k", 16, 256, 32768, is_causal=True),
    attention_case(
        "attention_g8_h128_bias_mask_4k",
        8,
        128,
        4096,
        bias=(1, 8, 4096, 4096),
        mask=(1, 1, 4096, 4096),
    ),
    attention_case(
        "attention_g4_h256_per_head_bias_mask_2k",
        4,
        256,
        2048,
        b=2,
        bias=(2, 4, 2048, 2048),
        mask=(2, 4, 2048, 2048),
        is_causal=True,
    ),
]
TPU_DECODE = [
    decode_case("decode_b8_s32k_n8_k1_h128", h=128),
    decode_case("decode_b8_s32k_n16_k1_h256_tq4", n=16, h=256, tq=4),
    decode_case("paged_decode_b8_s32k_page128", page_size=128),
    decode_case("paged_decode_b8_s32k_page16_f32", page_size=16, dtype=jnp.float32),
]
# Nano-2 layer sizes (d_model 2560, d_ff 20480, vocabulary 256k) on 8k tokens.
TPU_FUSED = [
    rms_norm_case("rms_norm_8192x2560", 8192, 2560),
    gated_mlp_case("gated_mlp_8192x2560x20480", 8192, 2560, 20480),
    cross_entropy_case("linear_cross_entropy_8192x2560x256k", 8192, 2560, 256000),
    # Nano-1's d_model on a vocabulary half (vocab split over tensor=2): overflowed v5p's
    # 16 MiB by 272 KiB with the old fixed 256 x 512 tiles (found compiling the model step).
    cross_entropy_case("linear_cross_entropy_8192x2048x128k", 8192, 2048, 128000),
]
TPU_CASES = TPU_ATTENTION + TPU_DECODE + TPU_FUSED

# Hopper: the Mosaic GPU kernels (attention, decode, rms_norm) at the same shapes.
GPU_CASES = [
    attention_case("attention_g8_h128_causal_8k", 8, 128, 8192, is_causal=True),
    attention_case("attention_g1_h64_causal_8k", 1, 64, 8192, kv_heads=4, is_causal=True),
    attention_case("attention_g8_h256_causal_8k", 8, 256, 8192, is_causal=True),
    attention_case(
        "attention_g8_h128_window_segments_softcap_lengths_8k",
        8,
        128,
        8192,
        is_causal=True,
        local_window_size=(1024, 0),
        logits_soft_cap=30.0,
        segments=True,
        lengths=True,
    ),
    attention_case("attention_g8_h128_bias_4k", 8, 128, 4096, bias=(1, 8, 4096, 4096)),
    attention_case("attention_g8_h128_mask_4k", 8, 128, 4096, mask=(1, 1, 4096, 4096)),
    decode_case("decode_b8_s32k_n8_k1_h128", h=128),
    decode_case("paged_decode_b8_s32k_page16", page_size=16),
    decode_case("paged_decode_b8_s32k_page128_f32", page_size=128, dtype=jnp.float32),
    rms_norm_case("rms_norm_8192x2048", 8192, 2048),
    rms_norm_case("rms_norm_1001x4096", 1001, 4096),
    rms_norm_case("rms_norm_65x256", 65, 256),
]


# HBM per chip (bytes), for "does the step fit": v4 32 GiB, v5e 16 GiB, v5p 95 GiB,
# v6e 32 GiB (Cloud TPU system architecture pages).
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One training step of a preset on a TPU slice (data=2, fsdp=chips/4, tensor=2)."""

    preset: str
    chip: str
    chips: int
    seq_len: int
    remat: str
    implementation: str | None

    @property
    def name(self) -> str:
        impl = self.implementation or "default"
        slice_ = f"{self.chip}-{self.chips}"
        return f"train_step_{self.preset}_{slice_}_seq{self.seq_len}_{self.remat}_{impl}"

    def build(self):
        """(step, state, batch): the jitted step and ShapeDtypeStructs sharded on the slice."""
        from pallax.model import PRESETS
        from pallax.model.params import init_params
        from pallax.model.train import (
            TrainConfig,
            TrainState,
            batch_sharding,
            make_train_step,
            optimizer,
            state_shardings,
        )
        from pallax.sharding import MeshConfig, make_mesh
        from pallax.testing import compile_only_devices

        config = PRESETS[self.preset].replace(
            max_seq_len=self.seq_len,
            remat=self.remat,
            implementation=self.implementation,
            dtype="bfloat16",
        )
        tc = TrainConfig()
        devices = compile_only_devices(self.chip, chips=self.chips)
        mesh = make_mesh(MeshConfig(data=2, fsdp=self.chips // 4, tensor=2), devices=list(devices))

        def init(key):
            params = init_params(config, key)
            return TrainState(params, optimizer(tc).init(params), jnp.zeros((), jnp.int32))

        shapes = jax.eval_shape(init, jax.random.key(0))
        state = jax.tree.map(
            lambda x, s: S(x.shape, x.dtype, sharding=s),
            shapes,
            state_shardings(config, tc, mesh),
        )
        rows = S((self.chips // 2, self.seq_len), jnp.int32, sharding=batch_sharding(mesh))
        batch = {k: rows for k in ("tokens", "targets", "segment_ids", "positions")}
        return make_train_step(config, tc, mesh), state, batch


# Each with XLA's ops and with the Pallas kernels (partitioned per shard by the rule
# table's layout), to compare per-chip memory.
MODEL_CASES = [
    ModelCase(preset, chip, chips, seq, remat, impl)
    for preset, chip, chips, seq, remat in (
        ("small", "v5e", 8, 1024, "none"),
        ("nano1", "v5p", 8, 8192, "full"),
        ("nano2", "v5p", 16, 8192, "full"),
        ("nano1", "v5e", 16, 8192, "full"),
    )
    for impl in ("xla", "pallas_tpu")
]
