"""rms_norm: pallax's implementations against plain jnp, forward and forward+backward.

Bytes are the minimum traffic: forward reads x and writes y; forward+backward
also reads the cotangent and writes dx (x is read once if the two passes fuse).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.bench._harness import Case
from pallax.kernels import rms_norm, rms_norm_reference

_SHAPES = {
    "smoke": [(256, 256, jnp.float32)],
    "cpu": [(4096, 1024, jnp.float32), (4096, 2048, jnp.bfloat16), (8192, 2048, jnp.float32)],
    "full": [
        (8192, 2048, jnp.bfloat16),  # Nano-1-like d_model, 8k tokens
        (8192, 4096, jnp.bfloat16),
        (16384, 8192, jnp.bfloat16),
        (8192, 4096, jnp.float32),
    ],
}


def _implementations() -> dict[str, object]:
    impls = {
        "pallax[xla]": lambda x, s: rms_norm(x, s, implementation="xla"),
        "jnp": rms_norm_reference,
    }
    platform = jax.devices()[0].platform
    if platform == "tpu":
        impls["pallax[pallas_tpu]"] = lambda x, s: rms_norm(x, s, implementation="pallas_tpu")
    if platform == "gpu":
        impls["pallax[pallas_mosaic_gpu]"] = lambda x, s: rms_norm(
            x, s, implementation="pallas_mosaic_gpu"
        )
    return impls


def cases(size: str) -> list[Case]:
    out = []
    for rows, dim, dtype in _SHAPES[size]:
        kx, ks = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (rows, dim), jnp.float32).astype(dtype)
        scale = jax.random.normal(ks, (dim,), jnp.float32).astype(dtype)
        label = f"{rows}x{dim} {jnp.dtype(dtype).name}"
        elems, itemsize = rows * dim, jnp.dtype(dtype).itemsize
        for impl_name, f in _implementations().items():
            out.append(
                Case(
                    "rms_norm",
                    f"fwd {label}",
                    impl_name,
                    jax.jit(f),
                    (x, scale),
                    flops=4 * elems,
                    bytes=2 * elems * itemsize,
                )
            )

            def fwd_bwd(x, s, ct, f=f):
                y, vjp = jax.vjp(f, x, s)
                return y, vjp(ct)

            out.append(
                Case(
                    "rms_norm",
                    f"fwd+bwd {label}",
                    impl_name,
                    jax.jit(fwd_bwd),
                    (x, scale, x),
                    flops=14 * elems,
                    bytes=4 * elems * itemsize,
                )
            )
    return out
