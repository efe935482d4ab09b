"""Decode attention in XLA: one masked pass over the whole cache, no gather.

Decoding is bound by reading the cache; the logits are [B, N, Tq, S], small for
Tq of a few tokens, so they are materialised and masked rather than tiled.
Query heads are grouped per KV head, so K/V are read once per group.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallax.kernels.attention.masks import MaskSpec, allowed


def decode_attention(q, key_cache, value_cache, lengths, *, scale: float, soft_cap, window):
    """q [B, Tq, N, H], caches [B, S, K, H], lengths [B] -> [B, Tq, N, H]."""
    b, tq, n, h = q.shape
    s, kh = key_cache.shape[1], key_cache.shape[2]
    qg = q.reshape(b, tq, kh, n // kh, h)
    logits = (
        jnp.einsum("btkgh,bskh->bkgts", qg, key_cache, preferred_element_type=jnp.float32) * scale
    )
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    q_pos = (lengths[:, None] - tq + jnp.arange(tq))[:, None, None, :, None]
    k_pos = jnp.arange(s)[None, None, None, None, :]
    ok = allowed(
        MaskSpec(causal=True, window=window),
        q_pos,
        k_pos,
        kv_len=lengths[:, None, None, None, None],
    )
    logits = jnp.where(ok, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bkgts,bskh->btkgh",
        (p / jnp.where(denom > 0, denom, 1.0)).astype(value_cache.dtype),
        value_cache,
        preferred_element_type=jnp.float32,
    )
    return out.reshape(b, tq, n, h).astype(q.dtype)
