"""Fused layers against the naive XLA composition: gated_mlp, linear_cross_entropy, rope.

FLOPs count the useful work (recomputation is not credited); bytes are the
minimum traffic (each input read once, each output written once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pallax.bench._harness import Case
from pallax.kernels import apply_rope, gated_mlp, gated_mlp_reference, linear_cross_entropy

_SIZES = {  # (tokens, d_model, d_ff, vocab)
    "smoke": (64, 32, 128, 512),
    "cpu": (2048, 512, 2048, 16384),
    "full": (8192, 2048, 16384, 256000),
}


def _pallas_available() -> bool:
    return jax.devices()[0].platform == "tpu"


def _mlp_impls():
    impls = {
        "pallax[xla]": lambda *a: gated_mlp(*a, implementation="xla"),
        "naive": lambda *a: gated_mlp_reference(*a),
    }
    if _pallas_available():
        impls["pallax[pallas_tpu]"] = lambda *a: gated_mlp(*a, implementation="pallas_tpu")
    return impls


def _ce_impls():
    impls = {
        "pallax[xla]": lambda h, w, lab: linear_cross_entropy(h, w, lab, implementation="xla"),
        "naive (optax)": lambda h, w, lab: optax.softmax_cross_entropy_with_integer_labels(
            jnp.dot(h, w, preferred_element_type=jnp.float32), lab
        ).mean(),
    }
    if _pallas_available():
        impls["pallax[pallas_tpu]"] = lambda h, w, lab: linear_cross_entropy(
            h, w, lab, implementation="pallas_tpu"
        )
    return impls


def _inputs(size: str):
    t, d, f, v = _SIZES[size]
    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(keys[0], (t, d), jnp.float32).astype(dtype)
    mlp = [
        (jax.random.normal(k, s, jnp.float32) * s[0] ** -0.5).astype(dtype)
        for k, s in ((keys[1], (d, f)), (keys[2], (d, f)), (keys[3], (f, d)))
    ]
    w_vocab = (jax.random.normal(keys[4], (d, v), jnp.float32) * d**-0.5).astype(dtype)
    labels = jax.random.randint(keys[5], (t,), 0, v)
    return (t, d, f, v), dtype, x, mlp, w_vocab, labels


def cases(size: str) -> list[Case]:
    (t, d, f, v), dtype, x, mlp, w_vocab, labels = _inputs(size)
    item = jnp.dtype(dtype).itemsize
    out = []
    for name, fn in _mlp_impls().items():
        out.append(
            Case(
                "fused",
                f"gated_mlp fwd T={t} D={d} F={f}",
                name,
                jax.jit(fn),
                (x, *mlp),
                flops=6 * t * d * f,
                bytes=(2 * t * d + 3 * d * f) * item,
            )
        )
        grad = jax.jit(jax.value_and_grad(lambda *a, fn=fn: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3)))
        out.append(
            Case(
                "fused",
                f"gated_mlp fwd+bwd T={t} D={d} F={f}",
                name,
                grad,
                (x, *mlp),
                flops=18 * t * d * f,
                bytes=(2 * t * d + 6 * d * f) * item,
            )
        )
    for name, fn in _ce_impls().items():
        grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        out.append(
            Case(
                "fused",
                f"linear_cross_entropy fwd+bwd T={t} D={d} V={v}",
                name,
                grad,
                (x, w_vocab, labels),
                flops=6 * t * d * v,
                bytes=2 * (t * d + d * v) * item,
            )
        )
    heads = max(1, d // 128)
    q = x.reshape(1, t, heads, d // heads)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    out.append(
        Case(
            "fused",
            f"apply_rope T={t} N={heads} H={d // heads}",
            "pallax[xla]",
            jax.jit(apply_rope),
            (q, pos),
            flops=6 * t * d,
            bytes=2 * t * d * item,
        )
    )
    return out


def report(size: str) -> list[dict]:
    """Memory of forward+backward: compiled temporaries and residuals kept for the backward."""
    _, _, x, mlp, w_vocab, labels = _inputs(size)
    rows = []
    for name, fn in _mlp_impls().items():
        loss = lambda *a, fn=fn: jnp.sum(fn(*a))
        _, vjp = jax.vjp(fn, x, *mlp)
        residual = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp)) - sum(
            a.nbytes for a in (x, *mlp)
        )
        rows.append(
            dict(
                op="gated_mlp",
                implementation=name,
                temp_mib=_temp_mib(jax.grad(loss, argnums=(0, 1, 2, 3)), x, *mlp),
                residual_mib=max(residual, 0) / 2**20,
            )
        )
    for name, fn in _ce_impls().items():
        _, vjp = jax.vjp(lambda h, w, fn=fn: fn(h, w, labels), x, w_vocab)
        residual = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp)) - x.nbytes - w_vocab.nbytes
        rows.append(
            dict(
                op="linear_cross_entropy",
                implementation=name,
                temp_mib=_temp_mib(jax.grad(fn, argnums=(0, 1)), x, w_vocab, labels),
                residual_mib=max(residual, 0) / 2**20,
            )
        )
    return rows


def _temp_mib(fn, *args) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20
