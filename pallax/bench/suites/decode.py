"""Decode attention: bytes/s of the K/V actually needed, against the memory roofline.

Decoding one token is bound by reading the cache: the figure of merit is the
K/V bytes the lengths require divided by the time. Contiguous and paged caches,
MQA (K = 1) and K = 8, with the XLA path in the same run.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from pallax.bench._harness import Case
from pallax.kernels import decode_attention, paged_decode_attention

_SIZES = {  # batches, cache lengths, kv heads
    "smoke": ((2,), (256,), (1,)),
    "cpu": ((1, 8), (2048, 8192), (1, 8)),
    "full": ((1, 8, 64), (2048, 8192, 32768), (1, 8)),
}
_N, _H, _PAGE = 8, 128, 128


def _implementations():
    impls = ["xla"]
    platform = jax.devices()[0].platform
    if platform == "tpu":
        impls.append("pallas_tpu")
    if platform == "gpu":
        impls.append("pallas_mosaic_gpu")
    return impls


def cases(size: str) -> list[Case]:
    platform = jax.devices()[0].platform
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    item = jnp.dtype(dtype).itemsize
    out = []
    for b, s, kh in itertools.product(*_SIZES[size]):
        if b * s * kh * _H * item * 2 > (2 << 30):  # keep each case's cache under 2 GiB
            continue
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (b, _N, _H), jnp.float32).astype(dtype)
        cache = jax.random.normal(keys[1], (b, s, kh, _H), jnp.float32).astype(dtype)
        lengths = jnp.full((b,), s, jnp.int32)
        per_seq = s // _PAGE
        pages = (
            cache.reshape(b, per_seq, _PAGE, kh, _H)
            .transpose(3, 0, 1, 2, 4)
            .reshape(kh, b * per_seq, _PAGE, _H)
        )
        table = jax.random.permutation(keys[2], b * per_seq).reshape(b, per_seq).astype(jnp.int32)
        needed = 2 * b * s * kh * _H * item
        flops = 4 * b * _N * s * _H
        label = f"B={b} S={s} K={kh}"
        for impl in _implementations():
            contiguous = jax.jit(
                lambda q, k, v, n, impl=impl: decode_attention(q, k, v, n, implementation=impl)
            )
            paged = jax.jit(
                lambda q, k, v, n, p, impl=impl: paged_decode_attention(
                    q, k, v, n, p, implementation=impl
                )
            )
            out.append(
                Case(
                    "decode",
                    f"contiguous {label}",
                    f"pallax[{impl}]",
                    contiguous,
                    (q, cache, cache, lengths),
                    flops=flops,
                    bytes=needed,
                )
            )
            out.append(
                Case(
                    "decode",
                    f"paged/{_PAGE} {label}",
                    f"pallax[{impl}]",
                    paged,
                    (q, pages, pages, lengths, table),
                    flops=flops,
                    bytes=needed,
                )
            )
    return out
