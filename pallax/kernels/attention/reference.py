"""The plain-JAX definition of attention used by tests and benchmarks (O(T*S) memory)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.kernels.attention.masks import MaskSpec, allowed


def attention_reference(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    segment_ids=None,
    logits_soft_cap=None,
):
    """query [B, T, N, H], key/value [B, S, K, H] -> [B, T, N, H]; K divides N.

    logits = scale * q·k (+ bias), soft-capped, masked; softmax in f32. A query
    with nothing to attend to returns zeros.
    """
    _, t, n, h = query.shape
    s, kv_heads = key.shape[1], key.shape[2]
    scale = h**-0.5 if scale is None else scale
    group = n // kv_heads
    k = jnp.repeat(key, group, axis=2)  # the reference may repeat K/V heads; kernels must not
    v = jnp.repeat(value, group, axis=2)
    logits = (
        jnp.einsum(
            "btnh,bsnh->bnts",
            query,
            k,
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )
        * scale
    )
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    if isinstance(local_window_size, int):
        local_window_size = (local_window_size, local_window_size)
    spec = MaskSpec(causal=is_causal, window=local_window_size)
    q_pos = jnp.arange(t)[:, None]
    k_pos = jnp.arange(s)[None, :]
    ok = allowed(
        spec,
        q_pos,
        k_pos,
        q_len=None if query_seq_lengths is None else query_seq_lengths[:, None, None, None],
        kv_len=None
        if key_value_seq_lengths is None
        else key_value_seq_lengths[:, None, None, None],
        q_seg=None if segment_ids is None else segment_ids[0][:, None, :, None],
        kv_seg=None if segment_ids is None else segment_ids[1][:, None, None, :],
    )
    if mask is not None:
        ok = ok & mask
    ok = jnp.broadcast_to(ok, logits.shape)
    logits = jnp.where(ok, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(ok, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum(
        "bnts,bsnh->btnh", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return out.astype(query.dtype)
