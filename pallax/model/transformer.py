"""The Gemini-style decoder as plain functions over the params pytree.

  tokens [B, T] -> embed * sqrt(D) -> L x block -> rms_norm -> (tied) output projection

  block(x):  h = rms_norm(x);  q, k, v = projections(h)  (K KV heads shared by N query heads)
             q, k = rope(q), rope(k);  x += out_proj(attention(q, k, v, causal, segments))
             h = rms_norm(x);  x += gated_mlp(h)

Every op goes through pallax's dispatch with ``config.implementation``; the
loss is ``linear_cross_entropy`` on the final hidden states, so the [B, T, V]
logits are never materialised in training. Activations carry logical axes
(``pallax.sharding.shard``: a no-op without a mesh) and checkpoint names for
the remat policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from pallax.collectives import all_gather_matmul, matmul_reduce_scatter
from pallax.kernels import (
    apply_rope,
    dot_product_attention,
    gated_mlp,
    linear_cross_entropy,
    rms_norm,
)
from pallax.kernels.gated_mlp.activations import activation
from pallax.model.config import PAD, Config
from pallax.sharding import shard

_ACT = ("batch", "length", "act_embed")


def _policy(config: Config):
    if config.remat == "save_attention":
        return jax.checkpoint_policies.save_only_these_names("attention_out")
    return jax.checkpoint_policies.nothing_saveable


def project_qkv(layer, h_btd, positions_bt, config: Config):
    """Query [B, T, N, H] and key/value [B, T, K, H] of one block, RoPE applied."""
    dtype = jnp.dtype(config.dtype)
    q = jnp.einsum("btd,dnh->btnh", h_btd, layer["wq"].astype(dtype))
    k = jnp.einsum("btd,dkh->btkh", h_btd, layer["wk"].astype(dtype))
    v = jnp.einsum("btd,dkh->btkh", h_btd, layer["wv"].astype(dtype))
    q = apply_rope(q, positions_bt, base=config.rope_base)
    k = apply_rope(k, positions_bt, base=config.rope_base)
    q = shard(q, ("batch", "length", "heads", "head_dim"))
    return checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")


def attention_out(layer, o_btnh, config: Config):
    out = jnp.einsum("btnh,nhd->btd", o_btnh, layer["wo"].astype(jnp.dtype(config.dtype)))
    return checkpoint_name(out, "attention_out")


def _tensor_axis_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "tensor" not in mesh.axis_names:
        return 1
    return mesh.shape["tensor"]


def _collective_mlp(h_btd, w_gate, w_up, w_down, config: Config):
    """The MLP as ring collective matmuls over 'tensor' (sequence-parallel rows).

    Rows (tokens) are split over 'tensor'; all_gather_matmul gathers them behind
    the [D, 2F/n] gate|up matmul and matmul_reduce_scatter scatters the summed
    [rows, D] output behind the down projection. Other mesh axes stay with GSPMD.
    """
    b, t, d = h_btd.shape
    n = _tensor_axis_size()
    # Interleave per shard so each device's [D, 2F/n] block is [gate_local | up_local].
    w_gate_up = jnp.concatenate([w_gate.reshape(d, n, -1), w_up.reshape(d, n, -1)], axis=2).reshape(
        d, -1
    )

    def body(x_rows, w_gu, w_d):  # [rows/n, D], [D, 2F/n], [F/n, D]
        gate, up = jnp.split(all_gather_matmul(x_rows, w_gu, axis_name="tensor"), 2, axis=1)
        hidden = (activation(config.activation, gate.astype(jnp.float32)) * up).astype(w_d.dtype)
        return matmul_reduce_scatter(hidden, w_d, axis_name="tensor")

    out = jax.shard_map(
        body,
        in_specs=(P("tensor", None), P(None, "tensor"), P("tensor", None)),
        out_specs=P("tensor", None),
        axis_names={"tensor"},
    )(h_btd.reshape(b * t, d), w_gate_up, w_down)
    return out.reshape(b, t, d)


def mlp_block(layer, x_btd, config: Config):
    dtype = jnp.dtype(config.dtype)
    h = rms_norm(x_btd, layer["mlp_norm"], scale_offset=1.0, implementation=config.implementation)
    n = _tensor_axis_size()
    b, t, _ = x_btd.shape
    if config.tensor_parallel_collectives and n > 1 and (b * t) % n == 0 and config.d_ff % n == 0:
        out = _collective_mlp(
            h,
            layer["w_gate"].astype(dtype),
            layer["w_up"].astype(dtype),
            layer["w_down"].astype(dtype),
            config,
        )
        return shard(x_btd + checkpoint_name(out, "mlp_out"), _ACT)
    # FSDP: the weights' d_model axis is gathered for the matmuls (the kernels take
    # d_model whole; d_ff stays split over 'tensor', Megatron style).
    out = gated_mlp(
        h,
        shard(layer["w_gate"].astype(dtype), ("act_embed", "mlp")),
        shard(layer["w_up"].astype(dtype), ("act_embed", "mlp")),
        shard(layer["w_down"].astype(dtype), ("mlp", "act_embed")),
        activation=config.activation,
        implementation=config.implementation,
    )
    return shard(x_btd + checkpoint_name(out, "mlp_out"), _ACT)


def _block(x_btd, layer, positions_bt, segment_ids, config: Config):
    h = rms_norm(x_btd, layer["attn_norm"], scale_offset=1.0, implementation=config.implementation)
    q, k, v = project_qkv(layer, h, positions_bt, config)
    o = dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        segment_ids=segment_ids,
        logits_soft_cap=config.logits_soft_cap,
        implementation=config.implementation,
    )
    x_btd = shard(x_btd + attention_out(layer, o, config), _ACT)
    return mlp_block(layer, x_btd, config)


def embed(params, tokens_bt, config: Config):
    dtype = jnp.dtype(config.dtype)
    x = jnp.take(params["embed"], tokens_bt, axis=0).astype(dtype) * jnp.sqrt(
        jnp.asarray(config.d_model, dtype)
    )
    return shard(x, _ACT)


def forward_embedded(params, x_btd, config: Config, *, positions=None, segment_ids=None):
    """Blocks and final norm on embedded inputs [B, T, D] -> hidden [B, T, D]."""
    b, t, _ = x_btd.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def body(x, layer):
        return _block(x, layer, positions, segment_ids, config), None

    if config.remat != "none":
        body = jax.checkpoint(body, policy=_policy(config))
    x, _ = jax.lax.scan(body, x_btd, params["layers"])
    return rms_norm(x, params["final_norm"], scale_offset=1.0, implementation=config.implementation)


def forward(params, tokens_bt, config: Config, *, positions=None, segment_ids=None):
    """tokens [B, T] int -> final hidden states [B, T, D]."""
    return forward_embedded(
        params,
        embed(params, tokens_bt, config),
        config,
        positions=positions,
        segment_ids=segment_ids,
    )


def output_weight(params, config: Config):
    """[D, V]: the tied embedding (transposed) or the separate unembedding."""
    w = params["embed"].T if config.tie_embeddings else params["unembed"]
    return w.astype(jnp.dtype(config.dtype))


def logits(params, hidden_btd, config: Config):
    """[B, T, V] f32 logits (for generation and tests; training uses ``loss``)."""
    out = jnp.einsum(
        "btd,dv->btv", hidden_btd, output_weight(params, config), preferred_element_type=jnp.float32
    )
    if config.logits_soft_cap is not None:
        out = config.logits_soft_cap * jnp.tanh(out / config.logits_soft_cap)
    return out


def loss(params, batch, config: Config, *, z_loss: float = 0.0, reduction: str = "mean"):
    """Next-token cross-entropy over ``batch['targets'] != PAD`` tokens.

    batch: tokens, targets [B, T] int; optional positions, segment_ids [B, T].
    reduction: 'mean' over counted tokens, or 'sum' (for accumulation across
    microbatches, divided later by the total count). Returns (loss, metrics).
    """
    segments = batch.get("segment_ids")
    hidden = forward(
        params,
        batch["tokens"],
        config,
        positions=batch.get("positions"),
        segment_ids=None if segments is None else (segments, segments),
    )
    value, lse = linear_cross_entropy(
        hidden.reshape(-1, config.d_model),
        # d_model gathered (FSDP); the vocabulary stays split over 'tensor'.
        shard(output_weight(params, config), ("act_embed", "vocab")),
        batch["targets"].reshape(-1),
        logits_soft_cap=config.logits_soft_cap,
        z_loss=z_loss,
        ignore_index=PAD,
        reduction=reduction,
        return_lse=True,
        implementation=config.implementation,
    )
    counted = jnp.sum(batch["targets"] != PAD)
    return value, {"lse_mean": jnp.mean(lse), "tokens": counted}
