"""Generation: batched prefill with ``dot_product_attention``, then decode steps with
``decode_attention`` over a preallocated KV cache, all inside one jitted while loop.

Cache layout: key/value [L, B, S, K, H] (L layers, S = prompt + new tokens).
Prompts are right-padded; ``prompt_lengths`` says where each one ends, and each
sequence's new tokens are written from there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallax.kernels import decode_attention, dot_product_attention, rms_norm
from pallax.model import transformer as tf
from pallax.model._context import traced_on
from pallax.model.config import Config


def prefill(params, tokens_bt, lengths_b, config: Config, cache_size: int):
    """Runs the prompts; returns (logits of each prompt's last token [B, V], cache)."""
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def body(x, layer):
        h = rms_norm(x, layer["attn_norm"], scale_offset=1.0, implementation=config.implementation)
        q, k, v = tf.project_qkv(layer, h, positions, config)
        o = dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            key_value_seq_lengths=lengths_b,
            logits_soft_cap=config.logits_soft_cap,
            implementation=config.implementation,
        )
        x = tf.mlp_block(layer, x + tf.attention_out(layer, o, config), config)
        pad = ((0, 0), (0, cache_size - t), (0, 0), (0, 0))
        return x, (jnp.pad(k, pad), jnp.pad(v, pad))

    x, (cache_k, cache_v) = jax.lax.scan(
        body, tf.embed(params, tokens_bt, config), params["layers"]
    )
    hidden = rms_norm(
        x, params["final_norm"], scale_offset=1.0, implementation=config.implementation
    )
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths_b - 1, 0)[:, None, None], axis=1)
    return tf.logits(params, last, config)[:, 0], (cache_k, cache_v)


def decode_step(params, cache, token_b, position_b, config: Config):
    """Feeds token [B] at position [B]; returns (logits [B, V], updated cache)."""
    b = token_b.shape[0]
    rows = jnp.arange(b)

    def body(x, layer_and_cache):
        layer, k_cache, v_cache = layer_and_cache  # caches [B, S, K, H]
        h = rms_norm(x, layer["attn_norm"], scale_offset=1.0, implementation=config.implementation)
        q, k, v = tf.project_qkv(layer, h, position_b[:, None], config)
        k_cache = k_cache.at[rows, position_b].set(k[:, 0].astype(k_cache.dtype))
        v_cache = v_cache.at[rows, position_b].set(v[:, 0].astype(v_cache.dtype))
        o = decode_attention(
            q,
            k_cache,
            v_cache,
            position_b + 1,
            logits_soft_cap=config.logits_soft_cap,
            implementation=config.implementation,
        )
        x = tf.mlp_block(layer, x + tf.attention_out(layer, o, config), config)
        return x, (k_cache, v_cache)

    x = tf.embed(params, token_b[:, None], config)
    x, cache = jax.lax.scan(body, x, (params["layers"], *cache))
    hidden = rms_norm(
        x, params["final_norm"], scale_offset=1.0, implementation=config.implementation
    )
    return tf.logits(params, hidden, config)[:, 0], cache


def _sample(logits_bv, rng, temperature: float, top_k: int | None):
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv).astype(jnp.int32)


def generate(
    params,
    config: Config,
    prompts,
    max_new_tokens: int,
    *,
    prompt_lengths=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng=None,
    eos_id=None,
    mesh: jax.sharding.Mesh | None = None,
):
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    prompts: [B, T] int, right-padded; prompt_lengths: [B] (default: all T).
    temperature 0 is greedy; otherwise sampling (``top_k`` restricts it) with ``rng``.
    A sequence that emits ``eos_id`` stops (later positions hold ``eos_id``).
    mesh: the mesh the params live on; the model's sharding constraints then apply and
    the Pallas kernels run per shard laid out by the rule table (as in training).
    Returns new tokens [B, max_new_tokens] int32.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs rng")
    if top_k is not None and not 0 < top_k <= config.vocab_size:
        raise ValueError(f"generate: top_k must be in [1, {config.vocab_size}], got {top_k}")
    b, t = prompts.shape
    if t + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"generate: prompt length {t} + max_new_tokens {max_new_tokens} exceeds "
            f"config.max_seq_len={config.max_seq_len}"
        )
    lengths = (
        jnp.full((b,), t, jnp.int32)
        if prompt_lengths is None
        else jnp.asarray(prompt_lengths, jnp.int32)
    )
    rng = jax.random.key(0) if rng is None else rng
    return _generate(
        params,
        prompts,
        lengths,
        rng,
        config=config,
        max_new=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        eos_id=eos_id,
        mesh=mesh,
    )


@functools.partial(
    jax.jit, static_argnames=("config", "max_new", "temperature", "top_k", "eos_id", "mesh")
)
def _generate(params, prompts, lengths, rng, *, config, max_new, temperature, top_k, eos_id, mesh):
    with traced_on(mesh):
        return _loop(params, prompts, lengths, rng, config, max_new, temperature, top_k, eos_id)


def _loop(params, prompts, lengths, rng, config, max_new, temperature, top_k, eos_id):
    b, t = prompts.shape
    logits, cache = prefill(params, prompts, lengths, config, t + max_new)
    out = jnp.zeros((b, max_new), jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, out, cache, logits, done, position, rng = state
        rng, key = jax.random.split(rng)
        token = _sample(logits, key, temperature, top_k)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        out = out.at[:, step].set(token)
        logits, cache = decode_step(params, cache, token, position, config)
        return step + 1, out, cache, logits, done, position + 1, rng

    state = (jnp.int32(0), out, cache, logits, done, lengths, rng)
    _, out, _, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    if eos_id is not None:  # sequences that all stopped early leave zeros: fill with eos
        finished = jnp.cumsum(out == eos_id, axis=1) > 0
        out = jnp.where(finished, eos_id, out)
    return out
