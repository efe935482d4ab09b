"""The decode kernels run per shard (``kernels/_partition.py``), for the Pallas TPU
and Mosaic GPU backends alike.

Batch and heads shard over any mesh axes (one K/V head stays whole: multi-query);
the cache length, the new tokens and head_dim must be whole on each device. A paged
cache's page pool is split with the batch: sequence b's pages must lie in the pool
slice of b's shard (page indices stay global; each shard offsets them).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallax.kernels._partition import Rule, per_shard

_UNSHARDABLE = (("s", "the cache length"), ("t", "the new tokens"), ("h", "head_dim"))
DECODE_RULE = Rule(
    "decode_attention",
    ("b t n h", "b s k h", "b s k h", "b"),
    ("b t n h",),
    ("query", "key_cache", "value_cache", "lengths"),
    _UNSHARDABLE,
    followers=("lengths",),
)
PAGED_RULE = Rule(
    "paged_decode_attention",
    ("b t n h", "k p . h", "k p . h", "b", "b j"),
    ("b t n h",),
    ("query", "key_pages", "value_pages", "lengths", "page_indices"),
    (*_UNSHARDABLE, ("j", "the page table's pages per sequence")),
    followers=("lengths", "page_indices"),
    with_plan=True,
    tied=(("p", "b"),),
)


def decode(kernel: Callable, q, key_cache, value_cache, lengths, options, *, gpu: bool):
    """``kernel(q, key_cache, value_cache, lengths, options) -> out`` per shard."""
    fn = lambda *args: (kernel(*args, options),)
    args = (q, key_cache, value_cache, lengths)
    return per_shard(fn, DECODE_RULE, *args, interpret=options.interpret, gpu=gpu, tpu=not gpu)[0]


def paged(kernel: Callable, q, key_pages, value_pages, lengths, page_indices, options, *, gpu):
    """``kernel(q, key_pages, value_pages, lengths, page_indices, options) -> out`` per
    shard, with each shard's page indices relative to its slice of the pool."""

    def local(q, key_pages, value_pages, lengths, page_indices, *, plan):
        axes = plan.get("p", ())
        if axes:  # this shard's slice of the pool starts at index * its size
            page_indices = page_indices - jax.lax.axis_index(axes) * key_pages.shape[1]
        return (kernel(q, key_pages, value_pages, lengths, page_indices, options),)

    args = (q, key_pages, value_pages, lengths, page_indices)
    return per_shard(local, PAGED_RULE, *args, interpret=options.interpret, gpu=gpu, tpu=not gpu)[0]
