"""The plain-JAX definition of linear + softmax cross-entropy (materialises the logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear_cross_entropy_reference(
    hidden,
    weight,
    labels,
    *,
    logits_soft_cap=None,
    z_loss=0.0,
    ignore_index=None,
    reduction="mean",
    return_lse=False,
):
    """hidden [T, D] @ weight [D, V] -> logits [T, V] (f32), then cross-entropy with labels [T].

    loss_t = lse_t - logit_t[label_t] + z_loss * lse_t², 0 where label_t == ignore_index;
    'mean' divides by the number of counted tokens.
    """
    logits = jnp.dot(
        hidden, weight, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    label_logit = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    per_token = jnp.where(valid, lse - label_logit + z_loss * lse * lse, 0.0)
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = jnp.sum(per_token)
    else:
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(valid), 1)
    return (loss, lse) if return_lse else loss
