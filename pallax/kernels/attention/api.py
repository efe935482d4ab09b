"""The public attention function: a drop-in for ``jax.nn.dot_product_attention``
with grouped/multi-query heads, segments and soft capping."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallax.kernels import _dispatch
from pallax.kernels.attention import pallas_mosaic_gpu, pallas_tpu_bwd, xla
from pallax.kernels.attention.config import (
    AttentionBlockSizes,
    TpuTileShapes,
    default_block_sizes,
    tpu_vmem_limit,
)
from pallax.kernels.attention.masks import MaskSpec, normalize_window

_AVAILABLE = ("xla", "pallas_tpu", "pallas_mosaic_gpu")
_NAME = "dot_product_attention"


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | None = None,
    block_sizes: AttentionBlockSizes | None = None,
) -> jax.Array:
    """Scaled dot-product attention with K/V shared by groups of query heads.

    Arguments shared with ``jax.nn.dot_product_attention`` mean the same: query
    [B, T, N, H]; key, value [B, S, K, H] with N % K == 0 (K = 1: multi-query,
    1 < K < N: grouped-query); bias (float) and mask (bool, True = attend)
    broadcastable to [B, N, T, S]; ``is_causal`` allows key j <= query i;
    ``local_window_size`` (left, right) or w = (w, w) allows i - left <= j <= i + right;
    sequence lengths [B] cut off queries and keys past them.

    Beyond it: ``segment_ids = (q_segment_ids [B, T], kv_segment_ids [B, S])``
    (int32; tokens attend only within equal ids, for packed sequences) and
    ``logits_soft_cap``: logits = cap * tanh(logits / cap), applied after scale
    and bias and before masking (Gemma 2). A query with nothing to attend to
    returns zeros, and its gradients are zero.

    implementation: None (the best for the platform: Pallas on TPU, Mosaic GPU on a GPU when
      the kernel takes the call, else XLA),
    'xla' (tiled, memory-efficient, with a recomputing backward), 'pallas_tpu'
    (flash attention kernels) or 'pallas_mosaic_gpu' (Hopper flash kernels, forward and
    backward, bf16/f16); Pallas kernels run on a CPU in
    ``pallax.kernels.interpret_mode()``.
    block_sizes: query and key/value tile sizes.
    """
    window = _check_args(
        query,
        key,
        value,
        bias,
        mask,
        scale,
        query_seq_lengths,
        key_value_seq_lengths,
        local_window_size,
        segment_ids,
        logits_soft_cap,
        block_sizes,
    )
    _, t, _, h = query.shape
    s = key.shape[1]

    def supports(impl):
        if impl != "pallas_mosaic_gpu":
            return None
        blocks = block_sizes or default_block_sizes(impl, q_len=t, kv_len=s)
        return pallas_mosaic_gpu.unsupported_reason(
            query.shape, key.shape, query.dtype, bias=bias, mask=mask, block_kv=blocks.block_kv
        )

    mode = _dispatch.resolve(_NAME, implementation, available=_AVAILABLE, supports=supports)
    shapes = _tpu_tile_shapes(query, key, bias, mask)
    kind = _dispatch.device_kind() if mode.implementation == "pallas_tpu" else None
    if block_sizes is None:
        block_sizes = default_block_sizes(
            mode.implementation, q_len=t, kv_len=s, shapes=shapes, device_kind=kind
        )
    block_sizes.check(mode.implementation)
    vmem_limit = None
    if mode.implementation == "pallas_tpu" and mode.interpret is None:
        vmem_limit = tpu_vmem_limit(block_sizes, shapes, kind)
    bias4 = None if bias is None else jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)
    mask4 = None if mask is None else jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    options = xla.Options(
        scale=float(h**-0.5 if scale is None else scale),
        spec=MaskSpec(causal=bool(is_causal), window=window),
        soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        block_q=block_sizes.block_q,
        block_kv=block_sizes.block_kv,
        interpret=mode.interpret,
        vmem_limit_bytes=vmem_limit,
    )
    aux = (
        None if query_seq_lengths is None else jnp.asarray(query_seq_lengths, jnp.int32),
        None if key_value_seq_lengths is None else jnp.asarray(key_value_seq_lengths, jnp.int32),
        None if segment_ids is None else jnp.asarray(segment_ids[0], jnp.int32),
        None if segment_ids is None else jnp.asarray(segment_ids[1], jnp.int32),
    )
    return _attention(query, key, value, bias4, mask4, aux, options=options, mode=mode)


@functools.partial(jax.jit, static_argnames=("options", "mode"))
def _attention(query, key, value, bias, mask, aux, *, options, mode):
    if mode.implementation == "pallas_tpu":
        return pallas_tpu_bwd.attention(query, key, value, bias, mask, aux, options)
    if mode.implementation == "pallas_mosaic_gpu":
        return pallas_mosaic_gpu.attention(query, key, value, bias, mask, aux, options)
    return xla.attention(query, key, value, bias, mask, aux, options)


def _tpu_tile_shapes(query, key, bias, mask) -> TpuTileShapes:
    g = query.shape[2] // key.shape[2]

    def heads(x):  # how many of a group's heads a dense tile holds
        if x is None:
            return 0
        return 1 if x.ndim < 3 or x.shape[-3] == 1 else g

    return TpuTileShapes(
        groups=g,
        head_dim=query.shape[3],
        itemsize=query.dtype.itemsize,
        bias_heads=heads(bias),
        bias_itemsize=4 if bias is None else bias.dtype.itemsize,
        mask_heads=heads(mask),
    )


def _shape_of(x):
    return getattr(x, "shape", None)


def _check_args(
    query,
    key,
    value,
    bias,
    mask,
    scale,
    q_lens,
    kv_lens,
    window,
    segment_ids,
    soft_cap,
    block_sizes,
):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{_NAME}: {name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"{_NAME}: {name} must have rank 4 ([B, T|S, heads, H]), got {name}.shape={x.shape}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{_NAME}: {name} must be floating, got {name}.dtype={x.dtype}")
    b, t, n, h = query.shape
    if key.shape != value.shape:
        raise ValueError(
            f"{_NAME}: key and value must have the same shape [B, S, K, H], got "
            f"key.shape={key.shape}, value.shape={value.shape}"
        )
    kb, s, kh, kd = key.shape
    if kb != b or kd != h:
        raise ValueError(
            f"{_NAME}: key must be [B={b}, S, K, H={h}] like query.shape="
            f"{query.shape}, got key.shape={key.shape}"
        )
    if n % kh:
        raise ValueError(
            f"{_NAME}: query heads N={n} must be a multiple of key/value heads "
            f"K={kh} (query.shape={query.shape}, key.shape={key.shape})"
        )
    full = (b, n, t, s)
    for name, x, kind in (("bias", bias, "floating"), ("mask", mask, "bool")):
        if x is None:
            continue
        if (
            not hasattr(x, "shape")
            or x.ndim > 4
            or any(
                dim not in (1, want) for dim, want in zip(x.shape[::-1], full[::-1], strict=False)
            )
        ):
            raise ValueError(
                f"{_NAME}: {name} must broadcast to [B, N, T, S]={full}, got "
                f"{name}.shape={_shape_of(x)}"
            )
        if kind == "bool" and x.dtype != jnp.bool_:
            raise TypeError(f"{_NAME}: mask must be bool (True = attend), got {x.dtype}")
        if kind == "floating" and not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{_NAME}: bias must be floating, got {x.dtype}")
    for name, x in (("query_seq_lengths", q_lens), ("key_value_seq_lengths", kv_lens)):
        if x is not None and (_shape_of(x) != (b,) or not jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(
                f"{_NAME}: {name} must be an int array of shape (B,)=({b},), got "
                f"{getattr(x, 'dtype', type(x))}{_shape_of(x)}"
            )
    if segment_ids is not None:
        if not isinstance(segment_ids, tuple | list) or len(segment_ids) != 2:
            raise ValueError(
                f"{_NAME}: segment_ids must be a pair (q_segment_ids [B, T], "
                f"kv_segment_ids [B, S]), got {type(segment_ids).__name__}"
            )
        for name, x, want in (
            ("q_segment_ids", segment_ids[0], (b, t)),
            ("kv_segment_ids", segment_ids[1], (b, s)),
        ):
            if _shape_of(x) != want or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(
                    f"{_NAME}: segment_ids: {name} must be an int array of shape "
                    f"{want}, got {getattr(x, 'dtype', type(x))}{_shape_of(x)}"
                )
    window = normalize_window(window, _NAME)
    if scale is not None and not isinstance(scale, int | float):
        raise TypeError(f"{_NAME}: scale must be a number or None, got {type(scale).__name__}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"{_NAME}: logits_soft_cap must be None or > 0, got {soft_cap}")
    if block_sizes is not None and not isinstance(block_sizes, AttentionBlockSizes):
        raise TypeError(f"{_NAME}: block_sizes must be AttentionBlockSizes or None")
    return window
