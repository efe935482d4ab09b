"""The public linear + cross-entropy loss: checks, dispatch, and the loss around the core.

Backends implement one differentiable core, ``(lse, label_logit) = f(hidden,
weight, labels)``; the loss (z-loss, ignore_index, reduction) is composed from
it here in plain JAX, so every backend shares those semantics and autodiff
routes the cotangents into the core's custom backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallax.kernels import _dispatch
from pallax.kernels.linear_cross_entropy import pallas_tpu, xla
from pallax.kernels.linear_cross_entropy.config import (
    LinearCrossEntropyBlockSizes,
    default_block_sizes,
)

_AVAILABLE = ("xla", "pallas_tpu")
_REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    logits_soft_cap: float | None = None,
    z_loss: float = 0.0,
    ignore_index: int | None = None,
    reduction: str = "mean",
    return_lse: bool = False,
    implementation: str | None = None,
    block_sizes: LinearCrossEntropyBlockSizes | None = None,
):
    """Softmax cross-entropy of ``hidden @ weight`` without holding the [T, V] logits.

    Args:
      hidden: [..., D] floating (the final activations).
      weight: [D, V] floating (the output projection / tied embedding transposed).
      labels: [...] integer, in [0, V) or equal to ``ignore_index``.
      logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` first.
      z_loss: adds ``z_loss * lse²`` per token (PaLM's auxiliary loss).
      ignore_index: label value whose tokens count neither in the loss nor in
        the gradients (nor in the 'mean' denominator).
      reduction: 'mean' over counted tokens, 'sum', or 'none' (per token, [...]).
      return_lse: also return the per-token log-sum-exp [...] (f32), for metrics.
      implementation: None, 'xla' (chunked scan) or 'pallas_tpu'.
      block_sizes: vocabulary chunk (and token block) sizes.

    Returns:
      The loss (f32; scalar or [...]), or (loss, lse) with ``return_lse``.
    """
    vocab = _check_args(
        hidden, weight, labels, logits_soft_cap, z_loss, ignore_index, reduction, block_sizes
    )
    dim = hidden.shape[-1]
    tokens = math.prod(hidden.shape[:-1])
    mode = _dispatch.resolve("linear_cross_entropy", implementation, available=_AVAILABLE)
    if block_sizes is None:
        block_sizes = default_block_sizes(
            mode.implementation,
            tokens=tokens,
            dim=dim,
            vocab=vocab,
            device_kind=_dispatch.device_kind(),
        )
    block_sizes.check(mode.implementation)
    loss, lse = _loss(
        hidden,
        weight,
        labels,
        soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        z_loss=float(z_loss),
        ignore_index=ignore_index,
        reduction=reduction,
        mode=mode,
        block_sizes=block_sizes,
    )
    return (loss, lse) if return_lse else loss


@functools.partial(
    jax.jit,
    static_argnames=("soft_cap", "z_loss", "ignore_index", "reduction", "mode", "block_sizes"),
)
def _loss(hidden, weight, labels, *, soft_cap, z_loss, ignore_index, reduction, mode, block_sizes):
    lead = labels.shape
    h_td = hidden.reshape(-1, hidden.shape[-1])
    labels_t = labels.reshape(-1).astype(jnp.int32)
    if mode.implementation == "xla":
        chunk = min(block_sizes.block_vocab, weight.shape[1])
        options = xla.Options(vocab=weight.shape[1], chunk=chunk, soft_cap=soft_cap)
        lse, label_logit = xla.lse_and_label_logits(h_td, weight, labels_t, options)
    else:
        options = pallas_tpu.Options(soft_cap, block_sizes, mode.interpret)
        lse, label_logit = pallas_tpu.lse_and_label_logits(h_td, weight, labels_t, options)
    valid = jnp.ones_like(labels_t, bool) if ignore_index is None else labels_t != ignore_index
    per_token = lse - label_logit
    if z_loss:
        per_token = per_token + z_loss * jnp.square(lse)
    per_token = jnp.where(valid, per_token, 0.0)
    if reduction == "none":
        loss = per_token.reshape(lead)
    elif reduction == "sum":
        loss = jnp.sum(per_token)
    else:
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    return loss, lse.reshape(lead)


def _check_args(hidden, weight, labels, soft_cap, z_loss, ignore_index, reduction, block_sizes):
    name = "linear_cross_entropy"
    for arg, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"{name}: {arg} must be an array, got {type(value).__name__}")
    for arg, value in (("hidden", hidden), ("weight", weight)):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name}: {arg} must be floating, got {arg}.dtype={value.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name}: labels must be integers, got labels.dtype={labels.dtype}")
    if hidden.ndim < 1 or weight.ndim != 2:
        raise ValueError(
            f"{name}: expected hidden [..., D] and weight [D, V], got "
            f"hidden.shape={hidden.shape}, weight.shape={weight.shape}"
        )
    if hidden.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{name}: hidden.shape[-1]={hidden.shape[-1]} must equal "
            f"weight.shape[0]={weight.shape[0]} (hidden.shape={hidden.shape})"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{name}: labels.shape={labels.shape} must equal hidden.shape[:-1]={hidden.shape[:-1]}"
        )
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"{name}: logits_soft_cap must be None or > 0, got {soft_cap}")
    if not z_loss >= 0:
        raise ValueError(f"{name}: z_loss must be >= 0, got {z_loss}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise TypeError(f"{name}: ignore_index must be an int or None, got {ignore_index!r}")
    if block_sizes is not None and not isinstance(block_sizes, LinearCrossEntropyBlockSizes):
        raise TypeError(f"{name}: block_sizes must be LinearCrossEntropyBlockSizes or None")
    vocab = weight.shape[1]
    if not isinstance(labels, jax.core.Tracer):  # concrete: check the range now
        values = np.asarray(labels)
        bad = (values < 0) | (values >= vocab)
        if ignore_index is not None:
            bad &= values != ignore_index
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name}: labels must be in [0, {vocab}) (weight.shape={weight.shape})"
                f"{'' if ignore_index is None else f' or equal ignore_index={ignore_index}'}; "
                f"labels{list(first)}={int(values[first])}"
            )
    return vocab
