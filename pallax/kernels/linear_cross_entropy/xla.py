"""The chunked XLA path: a scan over vocabulary chunks with its own backward.

Forward keeps an online log-sum-exp over chunks of ``block_vocab`` columns
(sliced from the weight in place: no padded or transposed copy of it) and
picks each token's label logit when its chunk passes, so only [T, chunk]
logits exist at a time. The backward scans the chunks again, recomputing each
chunk's logits to form d_logits = dlse * softmax + dlabel * onehot, and
produces d_hidden (accumulated) and d_weight (one chunk per step). Peak
temporary memory is O(T * chunk), independent of V.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Options:
    vocab: int  # V before padding to whole chunks
    chunk: int
    soft_cap: float | None


def capped(logits: jax.Array, soft_cap: float | None) -> jax.Array:
    return logits if soft_cap is None else soft_cap * jnp.tanh(logits / soft_cap)


def dlogits_raw(logits_capped, dlogits_capped, soft_cap: float | None) -> jax.Array:
    """Chain rule through the soft cap: d(c tanh(x/c))/dx = 1 - (capped / c)²."""
    if soft_cap is None:
        return dlogits_capped
    return dlogits_capped * (1.0 - jnp.square(logits_capped / soft_cap))


def _num_chunks(options: Options) -> int:
    return -(-options.vocab // options.chunk)


def _chunk_start(index, options: Options):
    """Chunks tile [0, V); the last one is moved back to end at V instead of being padded,
    so no padded copy of the weight is ever made. Its columns that the previous
    chunk already covered are masked out."""
    return jnp.minimum(index * options.chunk, options.vocab - options.chunk)


def _chunk_logits(hidden, weight, index, options: Options):
    """Capped f32 logits of one chunk, -inf on columns owned by an earlier chunk.

    Returns (logits [T, C], column ids [C], start, owned [C])."""
    start = _chunk_start(index, options)
    w_chunk = jax.lax.dynamic_slice_in_dim(weight, start, options.chunk, axis=1)  # [D, C]
    logits = jnp.dot(hidden, w_chunk, preferred_element_type=jnp.float32)
    logits = capped(logits, options.soft_cap)
    columns = start + jnp.arange(options.chunk)
    owned = columns >= index * options.chunk
    return jnp.where(owned, logits, -jnp.inf), columns, start, owned, w_chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lse_and_label_logits(hidden, weight, labels, options: Options):
    """hidden [T, D], weight [D, V], labels [T] -> (lse [T], label logit [T]), f32."""
    return _forward(hidden, weight, labels, options)


def _forward(hidden, weight, labels, options):
    t = hidden.shape[0]

    def step(carry, index):
        running_max, running_sum, label_logit = carry
        logits, columns, _, owned, _ = _chunk_logits(hidden, weight, index, options)  # [T, C]
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=1
        )
        hit = (columns[None, :] == labels[:, None]) & owned[None, :]
        label_logit = label_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        return (new_max, running_sum, label_logit), None

    init = (
        jnp.full((t,), -jnp.inf, jnp.float32),
        jnp.zeros((t,), jnp.float32),
        jnp.zeros((t,), jnp.float32),
    )
    (running_max, running_sum, label_logit), _ = jax.lax.scan(
        step, init, jnp.arange(_num_chunks(options))
    )
    return running_max + jnp.log(running_sum), label_logit


def _fwd(hidden, weight, labels, options):
    lse, label_logit = _forward(hidden, weight, labels, options)
    return (lse, label_logit), (hidden, weight, labels, lse)


def _bwd(options, residuals, cotangents):
    hidden, weight, labels, lse = residuals
    dlse, dlabel = cotangents

    def step(carry, index):
        dhidden, dweight = carry
        logits, columns, start, owned, w_chunk = _chunk_logits(hidden, weight, index, options)
        probs = jnp.exp(logits - lse[:, None])  # 0 on columns owned elsewhere
        onehot = (columns[None, :] == labels[:, None]) & owned[None, :]
        dlogits = dlse[:, None] * probs + jnp.where(onehot, dlabel[:, None], 0.0)
        dlogits = dlogits_raw(logits, dlogits, options.soft_cap)
        dlogits = jnp.where(owned[None, :], dlogits, 0.0)  # [T, C]
        # f32 products: this path serves CPUs and references, where accuracy is cheap.
        dhidden = dhidden + jnp.dot(dlogits, w_chunk.T.astype(jnp.float32))
        dw_chunk = jnp.dot(hidden.T.astype(jnp.float32), dlogits)  # [D, C]
        # Accumulate (the last chunk overlaps the previous one) in place in the loop.
        current = jax.lax.dynamic_slice_in_dim(dweight, start, options.chunk, axis=1)
        dweight = jax.lax.dynamic_update_slice_in_dim(dweight, current + dw_chunk, start, axis=1)
        return (dhidden, dweight), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(weight.shape, jnp.float32))
    (dhidden, dweight), _ = jax.lax.scan(step, init, jnp.arange(_num_chunks(options)))
    return dhidden.astype(hidden.dtype), dweight.astype(weight.dtype), None


lse_and_label_logits.defvjp(_fwd, _bwd)
