"""Public decode attention over a contiguous or paged KV cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallax.kernels import _dispatch
from pallax.kernels.attention.masks import normalize_window
from pallax.kernels.decode_attention import pallas_mosaic_gpu, pallas_tpu, xla
from pallax.kernels.decode_attention.config import DecodeBlockSizes, num_splits
from pallax.kernels.decode_attention.reference import gather_pages

_AVAILABLE = ("xla", "pallas_tpu", "pallas_mosaic_gpu")


def decode_attention(
    query,
    key_cache,
    value_cache,
    lengths,
    *,
    scale=None,
    logits_soft_cap=None,
    local_window_size=None,
    implementation=None,
    block_sizes=None,
):
    """Attention of new tokens over a KV cache.

    Args:
      query: [B, N, H] (one new token) or [B, Tq, N, H] (Tq new tokens, e.g. for
        speculative decoding), the new tokens sitting at the end of each sequence:
        token t is at position lengths[b] - Tq + t and attends causally.
      key_cache, value_cache: [B, S, K, H], N % K == 0.
      lengths: [B] int: valid cache entries per sequence (the new tokens included).
        0 gives zeros. A concrete length > S is an error; traced lengths are
        clamped to S.
      scale, logits_soft_cap, local_window_size: as in ``dot_product_attention``.
      implementation: None, 'xla', 'pallas_tpu' or 'pallas_mosaic_gpu'.
      block_sizes: ``DecodeBlockSizes`` (cache block, split-K count). The Mosaic GPU
        kernel walks blocks of 64 cache rows (one warpgroup tile) whatever
        ``block_kv`` says; ``num_splits`` applies to both kernels.

    Returns:
      [B, N, H] or [B, Tq, N, H], like query.
    """
    q, window = _check(
        query,
        key_cache,
        value_cache,
        lengths,
        logits_soft_cap,
        local_window_size,
        block_sizes,
        "decode_attention",
    )
    s = key_cache.shape[1]
    _check_lengths(lengths, s, "decode_attention", "S=key_cache.shape[1]")

    def supports(impl):
        kh, h = key_cache.shape[2], key_cache.shape[3]
        if impl == "pallas_tpu" and kh > 1 and h % 128:
            return f"with K={kh} > 1 KV heads the head size H={h} must be a multiple of 128"
        if impl == "pallas_mosaic_gpu":
            rows = q.shape[1] * q.shape[2] // kh
            return pallas_mosaic_gpu.unsupported_reason(rows, h, key_cache.dtype)
        return None

    mode = _dispatch.resolve(
        "decode_attention", implementation, available=_AVAILABLE, supports=supports
    )
    out = _decode(
        q,
        key_cache,
        value_cache,
        jnp.asarray(lengths, jnp.int32),
        options=_options(
            mode,
            q,
            key_cache,
            scale,
            logits_soft_cap,
            window,
            block_sizes,
            -(-s // (block_sizes or DecodeBlockSizes()).block_kv),
            s,
        ),
        mode=mode,
    )
    return out[:, 0] if query.ndim == 3 else out


def paged_decode_attention(
    query,
    key_pages,
    value_pages,
    lengths,
    page_indices,
    *,
    scale=None,
    logits_soft_cap=None,
    local_window_size=None,
    implementation=None,
    block_sizes=None,
):
    """``decode_attention`` over a paged cache.

    key_pages, value_pages: [K, P, page_size, H]; page_indices: [B, pages_per_sequence]
    int: sequence b's position p lives in page page_indices[b, p // page_size] at
    offset p % page_size. Out-of-range page indices (when concrete) and lengths
    beyond the pages given are errors; traced lengths are clamped.
    """
    if not hasattr(key_pages, "ndim") or key_pages.ndim != 4:
        raise ValueError(
            f"paged_decode_attention: key_pages must be [K, P, page_size, H], got "
            f"{getattr(key_pages, 'shape', type(key_pages))}"
        )
    if (
        not hasattr(page_indices, "ndim")
        or page_indices.ndim != 2
        or not jnp.issubdtype(page_indices.dtype, jnp.integer)
    ):
        raise ValueError(
            "paged_decode_attention: page_indices must be an int array "
            f"[B, pages_per_sequence], got {getattr(page_indices, 'shape', None)}"
        )
    kh, num_pages, page, h = key_pages.shape
    fake_cache = jax.ShapeDtypeStruct((page_indices.shape[0], 1, kh, h), key_pages.dtype)
    q, window = _check(
        query,
        fake_cache,
        fake_cache,
        lengths,
        logits_soft_cap,
        local_window_size,
        block_sizes,
        "paged_decode_attention",
        value_shape=value_pages.shape,
        value_expected=key_pages.shape,
    )
    capacity = page_indices.shape[1] * page
    _check_lengths(
        lengths, capacity, "paged_decode_attention", f"pages_per_sequence * page_size={capacity}"
    )
    if not isinstance(page_indices, jax.core.Tracer):
        idx = np.asarray(page_indices)
        if idx.size and (idx.min() < 0 or idx.max() >= num_pages):
            raise ValueError(
                f"paged_decode_attention: page_indices must be in [0, {num_pages}) "
                f"(key_pages.shape={key_pages.shape}), got values in "
                f"[{idx.min()}, {idx.max()}]"
            )
    if page % 8:
        raise ValueError(f"paged_decode_attention: page_size={page} must be a multiple of 8")

    def supports(impl):
        if impl == "pallas_mosaic_gpu":
            rows = q.shape[1] * q.shape[2] // kh
            return pallas_mosaic_gpu.unsupported_reason(rows, h, key_pages.dtype, page)
        return None

    mode = _dispatch.resolve(
        "paged_decode_attention", implementation, available=_AVAILABLE, supports=supports
    )
    options = _options(
        mode,
        q,
        fake_cache,
        scale,
        logits_soft_cap,
        window,
        block_sizes,
        page_indices.shape[1],
        capacity,
    )
    out = _paged(
        q,
        key_pages,
        value_pages,
        jnp.asarray(lengths, jnp.int32),
        jnp.asarray(page_indices, jnp.int32),
        options=options,
        mode=mode,
    )
    return out[:, 0] if query.ndim == 3 else out


def _options(mode, q, key_cache, scale, soft_cap, window, block_sizes, num_blocks, kv_len):
    blocks = block_sizes or DecodeBlockSizes()
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    soft_cap = None if soft_cap is None else float(soft_cap)
    kv_heads = key_cache.shape[2]
    if mode.implementation == "pallas_mosaic_gpu":
        gpu_blocks = -(-kv_len // pallas_mosaic_gpu.BLOCK)
        splits = blocks.num_splits or pallas_mosaic_gpu.default_num_splits(
            q.shape[0], kv_heads, gpu_blocks
        )
        return pallas_mosaic_gpu.Options(scale, soft_cap, window, splits, mode.interpret)
    return pallas_tpu.Options(
        scale=scale,
        soft_cap=soft_cap,
        window=window,
        block_kv=blocks.block_kv,
        num_splits=num_splits(blocks, batch=q.shape[0], kv_heads=kv_heads, num_blocks=num_blocks),
        interpret=mode.interpret,
    )


@functools.partial(jax.jit, static_argnames=("options", "mode"))
def _decode(q, key_cache, value_cache, lengths, *, options, mode):
    lengths = jnp.clip(lengths, 0, key_cache.shape[1])
    if mode.implementation == "pallas_tpu":
        return pallas_tpu.decode_attention(q, key_cache, value_cache, lengths, options)
    if mode.implementation == "pallas_mosaic_gpu":
        return pallas_mosaic_gpu.decode_attention(q, key_cache, value_cache, lengths, options)
    return xla.decode_attention(
        q,
        key_cache,
        value_cache,
        lengths,
        scale=options.scale,
        soft_cap=options.soft_cap,
        window=options.window,
    )


@functools.partial(jax.jit, static_argnames=("options", "mode"))
def _paged(q, key_pages, value_pages, lengths, page_indices, *, options, mode):
    lengths = jnp.clip(lengths, 0, page_indices.shape[1] * key_pages.shape[2])
    if mode.implementation == "pallas_tpu":
        return pallas_tpu.paged_decode_attention(
            q, key_pages, value_pages, lengths, page_indices, options
        )
    if mode.implementation == "pallas_mosaic_gpu":
        return pallas_mosaic_gpu.paged_decode_attention(
            q, key_pages, value_pages, lengths, page_indices, options
        )
    k, v = gather_pages(key_pages, page_indices), gather_pages(value_pages, page_indices)
    return xla.decode_attention(
        q, k, v, lengths, scale=options.scale, soft_cap=options.soft_cap, window=options.window
    )


def _check(
    query,
    key_cache,
    value_cache,
    lengths,
    soft_cap,
    window,
    block_sizes,
    name,
    *,
    value_shape=None,
    value_expected=None,
):
    if not hasattr(query, "ndim") or query.ndim not in (3, 4):
        raise ValueError(
            f"{name}: query must be [B, N, H] or [B, Tq, N, H], got "
            f"{getattr(query, 'shape', type(query))}"
        )
    for arg, x in (("query", query), ("key", key_cache), ("value", value_cache)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: {arg} must be floating, got {x.dtype}")
    q = query[:, None] if query.ndim == 3 else query
    b, _, n, h = q.shape
    if value_shape is not None and value_shape != value_expected:
        raise ValueError(
            f"{name}: value_pages.shape={value_shape} must equal key_pages.shape={value_expected}"
        )
    if key_cache.ndim != 4 or key_cache.shape != getattr(value_cache, "shape", None):
        raise ValueError(
            f"{name}: key_cache and value_cache must both be [B, S, K, H], got "
            f"{key_cache.shape} and {getattr(value_cache, 'shape', None)}"
        )
    kb, _, kh, kd = key_cache.shape
    if kb != b or kd != h:
        raise ValueError(
            f"{name}: cache must be [B={b}, S, K, H={h}] (query.shape="
            f"{query.shape}), got {key_cache.shape}"
        )
    if n % kh:
        raise ValueError(f"{name}: query heads N={n} must be a multiple of KV heads K={kh}")
    if (
        not hasattr(lengths, "shape")
        or lengths.shape != (b,)
        or not jnp.issubdtype(lengths.dtype, jnp.integer)
    ):
        raise ValueError(
            f"{name}: lengths must be an int array of shape (B,)=({b},), got "
            f"{getattr(lengths, 'dtype', type(lengths))}"
            f"{getattr(lengths, 'shape', '')}"
        )
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"{name}: logits_soft_cap must be None or > 0, got {soft_cap}")
    window = normalize_window(window, name)
    if block_sizes is not None and not isinstance(block_sizes, DecodeBlockSizes):
        raise TypeError(f"{name}: block_sizes must be DecodeBlockSizes or None")
    return q, window


def _check_lengths(lengths, limit, name, what):
    if isinstance(lengths, jax.core.Tracer):
        return
    values = np.asarray(lengths)
    if values.size and (values.min() < 0 or values.max() > limit):
        raise ValueError(f"{name}: lengths must be in [0, {what}], got {values.tolist()}")
