"""Decode attention defined through the full attention reference."""

from __future__ import annotations

import jax.numpy as jnp

from pallax.kernels.attention.reference import attention_reference


def decode_mask(lengths, tq: int, s: int, window=None):
    """[B, 1, Tq, S] bool: new token t sits at position lengths - Tq + t and attends to
    cached positions j < lengths with j <= its position (and within the window)."""
    q_pos = lengths[:, None, None, None] - tq + jnp.arange(tq)[None, None, :, None]
    k_pos = jnp.arange(s)[None, None, None, :]
    ok = (k_pos < lengths[:, None, None, None]) & (k_pos <= q_pos)
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        ok &= (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    return ok


def decode_attention_reference(
    query,
    key_cache,
    value_cache,
    lengths,
    *,
    scale=None,
    logits_soft_cap=None,
    local_window_size=None,
):
    """query [B, N, H] or [B, Tq, N, H]; caches [B, S, K, H]; lengths [B]."""
    single = query.ndim == 3
    q = query[:, None] if single else query
    mask = decode_mask(lengths, q.shape[1], key_cache.shape[1], local_window_size)
    out = attention_reference(
        q, key_cache, value_cache, mask=mask, scale=scale, logits_soft_cap=logits_soft_cap
    )
    return out[:, 0] if single else out


def gather_pages(pages, page_indices):
    """[K, P, page, H] pages, [B, pages_per_seq] indices -> [B, pages_per_seq * page, K, H]."""
    kh, _, page, h = pages.shape
    b, per_seq = page_indices.shape
    gathered = pages[:, page_indices]  # [K, B, per_seq, page, H]
    return gathered.transpose(1, 2, 3, 0, 4).reshape(b, per_seq * page, kh, h)
