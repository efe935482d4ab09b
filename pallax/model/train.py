"""The training state and step: AdamW with warmup + cosine, gradient accumulation,
global-norm clipping, bf16 compute over f32 master weights, sharded by the rules."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallax.model import transformer
from pallax.model._context import traced_on
from pallax.model.config import PAD, Config
from pallax.model.params import init_params, param_axes
from pallax.sharding import DEFAULT_RULES, Rules, logical_to_spec, named_shardings


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 300
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    microbatches: int = 1
    z_loss: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if self.microbatches < 1 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig: bad step counts in {self}")


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array


def schedule(tc: TrainConfig):
    return optax.warmup_cosine_decay_schedule(
        0.0,
        tc.learning_rate,
        max(tc.warmup_steps, 1),
        max(tc.total_steps, tc.warmup_steps + 1),
        end_value=tc.learning_rate * 0.1,
    )


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(schedule(tc), b1=0.9, b2=0.95, weight_decay=tc.weight_decay),
    )


def state_shardings(config: Config, tc: TrainConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings of a TrainState: optimizer moments shard like their parameters."""
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    params = named_shardings(param_axes(config), mesh, rules, shapes=shapes)
    opt_shapes = jax.eval_shape(optimizer(tc).init, shapes)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(
        optimizer(tc), lambda _, s: s, opt_shapes, params, transform_non_params=lambda _: replicated
    )
    return TrainState(params, opt, replicated)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh=mesh))


def init_state(config: Config, tc: TrainConfig, mesh: Mesh, key) -> TrainState:
    """The initial state, created on the devices in its final sharding (no host copy)."""

    def init(key):
        params = init_params(config, key)
        return TrainState(params, optimizer(tc).init(params), jnp.zeros((), jnp.int32))

    return jax.jit(init, out_shardings=state_shardings(config, tc, mesh))(key)


def _grads(params, batch, config: Config, tc: TrainConfig):
    """(mean loss, mean gradient) over the counted tokens of the whole batch.

    Microbatches sum their token losses and the total is divided once by the
    batch's token count, so accumulation equals one big batch (a mean of
    per-microbatch means would weight microbatches with fewer tokens more).
    """

    def sum_loss(p, mb):
        value, aux = transformer.loss(p, mb, config, z_loss=tc.z_loss, reduction="sum")
        return value, aux["tokens"]

    def split(x):
        return x.reshape(tc.microbatches, x.shape[0] // tc.microbatches, *x.shape[1:])

    def body(carry, mb):
        total, count, grads = carry
        (value, tokens), g = jax.value_and_grad(sum_loss, has_aux=True)(params, mb)
        return (total + value, count + tokens, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (jnp.zeros(()), jnp.zeros((), jnp.int32), zeros)
    (total, count, grads), _ = jax.lax.scan(body, init, jax.tree.map(split, batch))
    scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    return total * scale, jax.tree.map(lambda g: g * scale, grads)


def make_train_step(config: Config, tc: TrainConfig, mesh: Mesh):
    """A jitted ``train_step(state, batch) -> (state, metrics)`` with donated state."""
    shardings = state_shardings(config, tc, mesh)
    data = batch_sharding(mesh)
    opt = optimizer(tc)
    lr = schedule(tc)

    def step(state: TrainState, batch):
        value, grads = _grads(state.params, batch, config, tc)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": value,
            "grad_norm": optax.tree.norm(grads),
            "tokens": jnp.sum(batch["targets"] != PAD),
            "learning_rate": lr(state.step),
        }
        return TrainState(params, opt_state, state.step + 1), metrics

    batch_shardings = {k: data for k in ("tokens", "targets", "segment_ids", "positions")}

    def step_under_mesh(state: TrainState, batch):
        with traced_on(mesh):  # sharding constraints + kernels per shard (rule table)
            return step(state, batch)

    return jax.jit(
        step_under_mesh,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


@functools.cache
def step_flops(config: Config, tokens: int) -> float:
    """Model FLOPs of one training step on ``tokens`` tokens (6 N per token plus attention)."""
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    dense = sum(x.size for x in jax.tree.leaves(shapes["layers"]))
    dense += config.d_model * config.vocab_size  # output projection
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * config.max_seq_len // 2
    return float(6 * dense * tokens + attention * tokens)
