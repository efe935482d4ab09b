"""The public RMSNorm function: argument checks, then dispatch to a backend."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallax.kernels import _dispatch
from pallax.kernels.rms_norm import pallas_mosaic_gpu, pallas_tpu, xla
from pallax.kernels.rms_norm.config import RmsNormBlockSizes, resolve_block_sizes

_AVAILABLE = ("xla", "pallas_tpu", "pallas_mosaic_gpu")


def rms_norm(
    x: jax.Array,
    scale: jax.Array,
    *,
    eps: float = 1e-6,
    scale_offset: float = 0.0,
    implementation: str | None = None,
    block_sizes: RmsNormBlockSizes | None = None,
) -> jax.Array:
    """RMSNorm over the last axis: ``x / sqrt(mean(x², -1) + eps) * (scale + scale_offset)``.

    Args:
      x: [..., D] floating array; any leading shape. Statistics are computed in f32.
      scale: [D] floating array (its dtype is also the dtype of its gradient).
      eps: added to the mean square; must be > 0.
      scale_offset: added to ``scale``; 1.0 gives Gemma's ``(1 + scale)`` parameterisation.
      implementation: None (the best for the platform: Pallas on TPU, Mosaic GPU on
        Hopper when D % 64 == 0, XLA elsewhere), 'xla', 'pallas_tpu' or
        'pallas_mosaic_gpu'. Pallas kernels run on a CPU inside
        :func:`pallax.kernels.interpret_mode`.
      block_sizes: tile shape for the Pallas kernels; None uses tuned values for
        the device, else a heuristic.

    Returns:
      [..., D] array of x.dtype. Differentiable in x and scale.
    """
    _check_args(x, scale, eps, scale_offset, block_sizes)
    rows, dim = math.prod(x.shape[:-1]), x.shape[-1]

    def supports(impl: str) -> str | None:
        if impl == "pallas_mosaic_gpu":
            return pallas_mosaic_gpu.unsupported_reason(dim, x.dtype)
        return None

    mode = _dispatch.resolve("rms_norm", implementation, available=_AVAILABLE, supports=supports)
    if mode.implementation != "xla":
        block_sizes = resolve_block_sizes(
            mode.implementation,
            block_sizes,
            rows=rows,
            dim=dim,
            dtype=x.dtype,
            device_kind=_dispatch.device_kind(),
        )
    return _rms_norm(
        x,
        scale,
        eps=float(eps),
        scale_offset=float(scale_offset),
        mode=mode,
        block_sizes=block_sizes,
    )


@functools.partial(jax.jit, static_argnames=("eps", "scale_offset", "mode", "block_sizes"))
def _rms_norm(x, scale, *, eps, scale_offset, mode, block_sizes):
    x_rd = x.reshape(-1, x.shape[-1])  # [R, D]
    if mode.implementation == "xla":
        y_rd = xla.rms_norm(x_rd, scale, xla.Options(eps, scale_offset))
    elif mode.implementation == "pallas_tpu":  # partitioned per shard of x's own rows
        options = pallas_tpu.Options(eps, scale_offset, block_sizes, mode.interpret)
        return pallas_tpu.rms_norm(x, scale, options)
    else:
        options = pallas_mosaic_gpu.Options(eps, scale_offset, block_sizes, mode.interpret)
        y_rd = pallas_mosaic_gpu.rms_norm(x_rd, scale, options)
    return y_rd.reshape(x.shape)


def _check_args(x, scale, eps, scale_offset, block_sizes) -> None:
    for name, arr in (("x", x), ("scale", scale)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise TypeError(f"rms_norm: {name} must be an array, got {type(arr).__name__}")
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(
                f"rms_norm: {name} must have a floating dtype, got {name}.dtype={arr.dtype}"
            )
    if x.ndim < 1:
        raise ValueError(f"rms_norm: x must have at least one axis, got x.shape={x.shape}")
    if x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x's last axis must be non-empty, got x.shape={x.shape}")
    if scale.shape != x.shape[-1:]:
        raise ValueError(
            f"rms_norm: scale must have shape x.shape[-1:]={x.shape[-1:]}, "
            f"got scale.shape={scale.shape} (x.shape={x.shape})"
        )
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"rms_norm: eps must be a number > 0, got eps={eps!r}")
    if isinstance(scale_offset, bool) or not isinstance(scale_offset, int | float):
        raise TypeError(f"rms_norm: scale_offset must be a number, got {scale_offset!r}")
    if block_sizes is not None and not isinstance(block_sizes, RmsNormBlockSizes):
        raise TypeError(
            f"rms_norm: block_sizes must be RmsNormBlockSizes or None, "
            f"got {type(block_sizes).__name__}"
        )
