"""The attention kernels run per shard (``kernels/_partition.py``): batch over any
mesh axes, query heads over any (K/V heads with them, or replicated for one K/V
head), sequence and head_dim whole. Shared by the Pallas TPU and Mosaic GPU paths.

Labels: q, out, dout [B, T, N, H] "b t n h"; k, v [B, S, K, H] "b s k h"; lse
[B, K, G, T, 1] "b k g t ."; bias/mask [B|1, N|1, T|1, S|1]; lengths [B] "b";
segment ids [B, T] "b t" and [B, S] "b s".
"""

from __future__ import annotations

from collections.abc import Callable

from pallax.kernels._partition import Rule, like_operands, per_shard

_UNSHARDABLE = (
    ("t", "the query sequence"),
    ("s", "the key/value sequence"),
    ("h", "head_dim"),
)
_AUX = (("query_seq_lengths", "b"), ("key_value_seq_lengths", "b"))
_SEGMENTS = (("q_segment_ids", "b t"), ("kv_segment_ids", "b s"))


def _dense_labels(x) -> str:
    return " ".join(f if d > 1 else "." for f, d in zip("bnts", x.shape, strict=True))


def _inputs(q, k, v, bias, mask, aux):
    """(names, labels, arrays) of the operands that are present, and a rebuild function."""
    names, labels, arrays = ["query", "key", "value"], ["b t n h", "b s k h", "b s k h"], [q, k, v]
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None:
            names.append(name)
            labels.append(_dense_labels(x))
            arrays.append(x)
    for (name, label), x in zip(_AUX + _SEGMENTS, aux, strict=True):
        if x is not None:
            names.append(name)
            labels.append(label)
            arrays.append(x)
    has = (bias is not None, mask is not None, tuple(x is not None for x in aux))

    def rebuild(xs):
        xs = list(xs)
        q, k, v = xs[:3]
        rest = xs[3:]
        bias = rest.pop(0) if has[0] else None
        mask = rest.pop(0) if has[1] else None
        aux = tuple(rest.pop(0) if present else None for present in has[2])
        return q, k, v, bias, mask, aux

    return names, labels, arrays, rebuild


def forward(kernel: Callable, q, k, v, bias, mask, aux, options, *, gpu: bool = False):
    """``kernel(q, k, v, bias, mask, aux, options) -> (out, lse)`` per shard."""
    names, labels, arrays, rebuild = _inputs(q, k, v, bias, mask, aux)
    rule = Rule(
        op="dot_product_attention",
        operands=tuple(labels),
        results=("b t n h", "b k g t ."),
        names=tuple(names),
        unshardable=_UNSHARDABLE,
    )
    return per_shard(
        lambda *xs: kernel(*rebuild(xs), options),
        rule,
        *arrays,
        interpret=options.interpret,
        gpu=gpu,
        tpu=not gpu,
    )


def backward(
    kernel: Callable, q, k, v, bias, mask, aux, out, lse, dout, options, *, gpu: bool = False
):
    """``kernel(q, k, v, bias, mask, aux, out, lse, dout, options) -> (dq, dk, dv,
    dbias | None)`` per shard; dK/dV summed over the devices that split a group's
    query heads, dbias over those that split what the bias is broadcast over."""
    names, labels, arrays, rebuild = _inputs(q, k, v, bias, mask, aux)
    rule = Rule(
        op="dot_product_attention (backward)",
        operands=(*labels, "b t n h", "b k g t .", "b t n h"),
        results=("b t n h", "b s k h", "b s k h")
        + ((_dense_labels(bias),) if bias is not None else ()),
        names=(*names, "out", "lse", "dout"),
        unshardable=_UNSHARDABLE,
    )

    def local(*xs):
        grads = kernel(*rebuild(xs[:-3]), *xs[-3:], options)
        return grads if bias is not None else grads[:3]

    grads = per_shard(
        local, rule, *arrays, out, lse, dout, interpret=options.interpret, gpu=gpu, tpu=not gpu
    )
    grads = (*grads, None) if bias is None else tuple(grads)
    return like_operands(grads, (q, k, v, bias))
