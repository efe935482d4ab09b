"""linear_cross_entropy as three Mosaic TPU kernels; logits live only in VMEM tiles.

  forward   grid (token blocks i, vocab blocks j):  online log-sum-exp over j and the
            label logit, carried in VMEM scratch; writes lse and label logit [T, 1].
  d_hidden  grid (i, j):  recompute the [bt, bv] logits, d_logits = dlse * p + dlabel *
            onehot, accumulate d_logits @ W_j.T into an f32 [bt, D] scratch.
  d_weight  grid (j, i):  the same tile, accumulate h_i.T @ d_logits into [D, bv].

The reduction axis of each kernel is last and "arbitrary"; the other is
"parallel". Ragged edges (T not a multiple of block_tokens, V not a multiple of
block_vocab) are masked inside: columns past V get logit -inf and d_logit 0,
rows past T and weight columns past V are zeroed before they enter a matmul
(their contents are unspecified, NaN in the interpreter, and 0 * NaN is NaN).
Matmul operands go to the MXU in the input dtype with f32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.kernels._dispatch import InterpretConfig, tpu_interpret_params
from pallax.kernels._partition import Rule, like_operands, per_shard
from pallax.kernels.linear_cross_entropy.config import LinearCrossEntropyBlockSizes
from pallax.kernels.linear_cross_entropy.xla import capped, dlogits_raw


@dataclasses.dataclass(frozen=True)
class Options:
    soft_cap: float | None
    block_sizes: LinearCrossEntropyBlockSizes
    interpret: InterpretConfig | None


def _tile_logits(h_ref, w_ref, i, j, *, tokens, vocab, soft_cap):
    """Capped f32 logits of tile (i, j) [bt, bv], -inf in columns past V; masked operands."""
    bt, bv = h_ref.shape[0], w_ref.shape[1]
    rows = i * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)  # [bt, 1]
    cols = j * bv + jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)  # [1, bv]
    h = h_ref[...]
    w = w_ref[...]
    if tokens % bt:
        h = jnp.where(rows < tokens, h, 0)
    if vocab % bv:
        w = jnp.where(cols < vocab, w, 0)
    logits = capped(jnp.dot(h, w, preferred_element_type=jnp.float32), soft_cap)
    if vocab % bv:
        logits = jnp.where(cols < vocab, logits, -jnp.inf)
    return logits, h, w, cols


def _forward_kernel(
    h_ref,
    w_ref,
    labels_ref,
    lse_ref,
    label_ref,
    max_sc,
    sum_sc,
    label_sc,
    *,
    tokens,
    vocab,
    soft_cap,
):
    # h_ref [bt, D]; w_ref [D, bv]; labels_ref, lse_ref, label_ref, *_sc: [bt, 1]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        max_sc[...] = jnp.full(max_sc.shape, -jnp.inf, jnp.float32)
        sum_sc[...] = jnp.zeros(sum_sc.shape, jnp.float32)
        label_sc[...] = jnp.zeros(label_sc.shape, jnp.float32)

    logits, _, _, cols = _tile_logits(
        h_ref, w_ref, i, j, tokens=tokens, vocab=vocab, soft_cap=soft_cap
    )
    new_max = jnp.maximum(max_sc[...], jnp.max(logits, axis=1, keepdims=True))
    sum_sc[...] = sum_sc[...] * jnp.exp(max_sc[...] - new_max) + jnp.sum(
        jnp.exp(logits - new_max), axis=1, keepdims=True
    )
    max_sc[...] = new_max
    hit = cols == labels_ref[...]
    label_sc[...] += jnp.sum(jnp.where(hit, logits, 0.0), axis=1, keepdims=True)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_ref[...] = max_sc[...] + jnp.log(sum_sc[...])
        label_ref[...] = label_sc[...]


def _dlogits(
    h_ref, w_ref, labels_ref, lse_ref, dlse_ref, dlabel_ref, i, j, *, tokens, vocab, soft_cap
):
    logits, h, w, cols = _tile_logits(
        h_ref, w_ref, i, j, tokens=tokens, vocab=vocab, soft_cap=soft_cap
    )
    probs = jnp.exp(logits - lse_ref[...])  # [bt, bv]; 0 past V
    onehot = cols == labels_ref[...]
    d = dlse_ref[...] * probs + jnp.where(onehot, dlabel_ref[...], 0.0)
    d = dlogits_raw(logits, d, soft_cap)
    bt = h.shape[0]
    if vocab % w.shape[1]:
        d = jnp.where(cols < vocab, d, 0.0)
    if tokens % bt:  # unspecified lse/dlse in padded rows
        rows = i * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
        d = jnp.where(rows < tokens, d, 0.0)
    return d, h, w


def _dhidden_kernel(
    h_ref, w_ref, labels_ref, lse_ref, dlse_ref, dlabel_ref, dh_ref, acc, *, tokens, vocab, soft_cap
):
    # dh_ref, acc: [bt, D]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    d, _, w = _dlogits(
        h_ref,
        w_ref,
        labels_ref,
        lse_ref,
        dlse_ref,
        dlabel_ref,
        i,
        j,
        tokens=tokens,
        vocab=vocab,
        soft_cap=soft_cap,
    )
    acc[...] += jax.lax.dot_general(
        d.astype(w.dtype), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [bt, bv] x [D, bv]

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc[...].astype(dh_ref.dtype)


def _dweight_kernel(
    h_ref, w_ref, labels_ref, lse_ref, dlse_ref, dlabel_ref, dw_ref, acc, *, tokens, vocab, soft_cap
):
    # dw_ref, acc: [D, bv]; grid (j, i)
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    d, h, _ = _dlogits(
        h_ref,
        w_ref,
        labels_ref,
        lse_ref,
        dlse_ref,
        dlabel_ref,
        i,
        j,
        tokens=tokens,
        vocab=vocab,
        soft_cap=soft_cap,
    )
    acc[...] += jax.lax.dot_general(
        h, d.astype(h.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )  # [bt, D] x [bt, bv]

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = acc[...].astype(dw_ref.dtype)


def _specs(bt, bv, dim, token_axis, vocab_axis):
    """BlockSpecs for (h, w, and the [T, 1] per-token vectors) given which grid axis is which."""
    tok = lambda *g: g[token_axis]
    voc = lambda *g: g[vocab_axis]
    h_spec = pl.BlockSpec((bt, dim), lambda *g: (tok(*g), 0))
    w_spec = pl.BlockSpec((dim, bv), lambda *g: (0, voc(*g)))
    vec_spec = pl.BlockSpec((bt, 1), lambda *g: (tok(*g), 0))
    return h_spec, w_spec, vec_spec


def _grid(tokens, vocab, bs: LinearCrossEntropyBlockSizes):
    return pl.cdiv(tokens, bs.block_tokens), pl.cdiv(vocab, bs.block_vocab)


def _call(kernel, out_shape, grid, in_specs, out_specs, scratch, options, name, cost):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=tpu_interpret_params(options.interpret),
        name=name,
        cost_estimate=cost,
    )


def _forward(hidden, weight, labels, options: Options):
    (tokens, dim), vocab = hidden.shape, weight.shape[1]
    bs = options.block_sizes
    bt, bv = bs.block_tokens, bs.block_vocab
    h_spec, w_spec, vec_spec = _specs(bt, bv, dim, 0, 1)
    kernel = functools.partial(
        _forward_kernel, tokens=tokens, vocab=vocab, soft_cap=options.soft_cap
    )
    vec = jax.ShapeDtypeStruct((tokens, 1), jnp.float32)
    cost = pl.CostEstimate(
        flops=2 * tokens * dim * vocab,
        transcendentals=tokens * vocab,
        bytes_accessed=hidden.nbytes + weight.nbytes * _grid(tokens, vocab, bs)[0],
    )
    lse, label_logit = _call(
        kernel,
        (vec, vec),
        _grid(tokens, vocab, bs),
        [h_spec, w_spec, vec_spec],
        (vec_spec, vec_spec),
        [pltpu.VMEM((bt, 1), jnp.float32)] * 3,
        options,
        "pallax_linear_ce_fwd",
        cost,
    )(hidden, weight, labels.reshape(tokens, 1))
    return lse[:, 0], label_logit[:, 0]


def _backward(hidden, weight, labels, lse, dlse, dlabel, options: Options):
    (tokens, dim), vocab = hidden.shape, weight.shape[1]
    bs = options.block_sizes
    bt, bv = bs.block_tokens, bs.block_vocab
    n_tok, n_voc = _grid(tokens, vocab, bs)
    col = lambda v: v.reshape(tokens, 1).astype(jnp.float32)
    args = (hidden, weight, labels.reshape(tokens, 1), col(lse), col(dlse), col(dlabel))
    statics = dict(tokens=tokens, vocab=vocab, soft_cap=options.soft_cap)
    cost = pl.CostEstimate(
        flops=4 * tokens * dim * vocab,
        transcendentals=tokens * vocab,
        bytes_accessed=hidden.nbytes * n_voc + weight.nbytes * n_tok,
    )

    h_spec, w_spec, vec_spec = _specs(bt, bv, dim, 0, 1)
    dhidden = _call(
        functools.partial(_dhidden_kernel, **statics),
        jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
        (n_tok, n_voc),
        [h_spec, w_spec] + [vec_spec] * 4,
        h_spec,
        [pltpu.VMEM((bt, dim), jnp.float32)],
        options,
        "pallax_linear_ce_dhidden",
        cost,
    )(*args)

    h_spec, w_spec, vec_spec = _specs(bt, bv, dim, 1, 0)
    dweight = _call(
        functools.partial(_dweight_kernel, **statics),
        jax.ShapeDtypeStruct(weight.shape, weight.dtype),
        (n_voc, n_tok),
        [h_spec, w_spec] + [vec_spec] * 4,
        w_spec,
        [pltpu.VMEM((dim, bv), jnp.float32)],
        options,
        "pallax_linear_ce_dweight",
        cost,
    )(*args)
    return dhidden, dweight


# Tokens shard over any mesh axes; the vocabulary over any (each device holds a
# [D, V/n] slice of the weight, never gathered: the log-sum-exp is combined across
# the slices and the label logit comes from the slice that holds the label); the
# hidden size must be whole.
_NAMES = ("hidden", "weight", "labels")
_UNSHARDABLE = (("d", "the hidden size (contracted)"),)
FORWARD_RULE = Rule(
    "linear_cross_entropy",
    ("t d", "d v", "t"),
    ("t", "t"),
    _NAMES,
    _UNSHARDABLE,
    followers=("labels",),
    combined=("v",),
)
BACKWARD_RULE = Rule(
    "linear_cross_entropy (backward)",
    ("t d", "d v", "t", "t", "t", "t"),
    ("t d", "d v"),  # d_hidden summed over the vocabulary's devices, d_weight over the tokens'
    (*_NAMES, "lse", "dlse", "dlabel"),
    _UNSHARDABLE,
    followers=("labels", "lse", "dlse", "dlabel"),
    with_plan=True,
)


def _local_labels(labels, vocab_local: int, axes):
    """Labels as column indices of this device's vocabulary slice; -1 when elsewhere."""
    if not axes:
        return labels
    start = jax.lax.axis_index(axes) * vocab_local
    inside = (labels >= start) & (labels < start + vocab_local)
    return jnp.where(inside, labels - start, -1)


def _sharded_forward(hidden, weight, labels, options):
    def local(hidden, weight, labels, *, plan):
        axes = plan.get("v", ())
        lse, label_logit = _forward(
            hidden, weight, _local_labels(labels, weight.shape[1], axes), options
        )
        if not axes:
            return lse, label_logit
        top = jax.lax.pmax(lse, axes)
        top_safe = jnp.where(jnp.isfinite(top), top, 0.0)
        lse = top_safe + jnp.log(jax.lax.psum(jnp.exp(lse - top_safe), axes))
        return lse, jax.lax.psum(label_logit, axes)

    return per_shard(
        local, FORWARD_RULE, hidden, weight, labels, interpret=options.interpret, tpu=True
    )


def _sharded_backward(hidden, weight, labels, lse, dlse, dlabel, options):
    def local(hidden, weight, labels, lse, dlse, dlabel, *, plan):
        labels = _local_labels(labels, weight.shape[1], plan.get("v", ()))
        return _backward(hidden, weight, labels, lse, dlse, dlabel, options)

    return per_shard(
        local,
        BACKWARD_RULE,
        hidden,
        weight,
        labels,
        lse,
        dlse,
        dlabel,
        interpret=options.interpret,
        tpu=True,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lse_and_label_logits(hidden, weight, labels, options: Options):
    """hidden [T, D], weight [D, V], labels [T] -> (lse [T], label logit [T]), f32; the
    kernels run per shard of the tokens and of the vocabulary."""
    return _sharded_forward(hidden, weight, labels, options)


def _fwd(hidden, weight, labels, options):
    lse, label_logit = _sharded_forward(hidden, weight, labels, options)
    return (lse, label_logit), (hidden, weight, labels, lse)


def _bwd(options, residuals, cotangents):
    hidden, weight, labels, lse = residuals
    dlse, dlabel = cotangents
    grads = _sharded_backward(hidden, weight, labels, lse, dlse, dlabel, options)
    dhidden, dweight = like_operands(grads, (hidden, weight))
    return dhidden, dweight, None


lse_and_label_logits.defvjp(_fwd, _bwd)
