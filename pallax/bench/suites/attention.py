"""Attention forward and forward+backward TFLOP/s against jax.nn.dot_product_attention.

Shapes follow FlashAttention-3's benchmark (16k tokens per batch, T from 512 to
16384, H 64 and 128, causal and not) plus Gemini-style MQA/GQA shapes (N = 8,
K = 1 and 2). Causal FLOPs are halved. Peers in the same run: jax.nn with
implementation='xla' and, on a GPU, 'cudnn'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.bench._harness import Case
from pallax.kernels import dot_product_attention

_SHAPES = {  # (batch, seq, heads, kv_heads, head_dim)
    "smoke": [(1, 128, 2, 1, 64)],
    "cpu": [(1, 1024, 8, 1, 128), (1, 2048, 8, 1, 128), (2, 1024, 8, 2, 64)],
    # 16k tokens per batch as in FlashAttention-3 (a subset of its T sweep, so the
    # whole GPU check fits its time box), then MQA and GQA at Gemini-like sizes.
    "full": [
        (8, 2048, 16, 16, 128),
        (2, 8192, 16, 16, 128),
        (4, 4096, 32, 32, 64),
        (1, 8192, 8, 1, 128),
        (4, 4096, 8, 2, 128),
    ],
}


def _implementations(platform: str) -> dict:
    impls = {
        "pallax[xla]": lambda q, k, v, c: dot_product_attention(
            q, k, v, is_causal=c, implementation="xla"
        ),
        "jax.nn[xla]": lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="xla"
        ),
    }
    if platform == "tpu":
        impls["pallax[pallas_tpu]"] = lambda q, k, v, c: dot_product_attention(
            q, k, v, is_causal=c, implementation="pallas_tpu"
        )
    if platform == "gpu":
        impls["pallax[pallas_mosaic_gpu]"] = lambda q, k, v, c: dot_product_attention(
            q, k, v, is_causal=c, implementation="pallas_mosaic_gpu"
        )
        impls["jax.nn[cudnn]"] = lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn"
        )
    return impls


def cases(size: str) -> list[Case]:
    platform = jax.devices()[0].platform
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    out = []
    for b, t, n, kh, h in _SHAPES[size]:
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
        k = jax.random.normal(keys[1], (b, t, kh, h), jnp.float32).astype(dtype)
        v = jax.random.normal(keys[2], (b, t, kh, h), jnp.float32).astype(dtype)
        item = jnp.dtype(dtype).itemsize
        for causal in (False, True):
            flops = 4 * b * n * t * t * h / (2 if causal else 1)
            nbytes = (2 * q.size + 2 * k.size) * item
            label = f"B={b} T={t} N={n} K={kh} H={h}{' causal' if causal else ''}"
            for name, fn in _implementations(platform).items():
                fwd = jax.jit(lambda q, k, v, fn=fn, c=causal: fn(q, k, v, c))

                def loss(q, k, v, fn=fn, c=causal):
                    return jnp.sum(fn(q, k, v, c).astype(jnp.float32))

                bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
                out.append(
                    Case(
                        "attention", f"fwd {label}", name, fwd, (q, k, v), flops=flops, bytes=nbytes
                    )
                )
                out.append(
                    Case(
                        "attention",
                        f"fwd+bwd {label}",
                        name,
                        bwd,
                        (q, k, v),
                        flops=3.5 * flops,
                        bytes=2 * nbytes,
                    )
                )
    return out
