"""Collective matmuls over a mesh axis, at the level of ``jax.jit``."""

from __future__ import annotations

from typing import Literal

import jax
from jax.sharding import Mesh, PartitionSpec

from pallax.collectives.ring import all_gather_matmul, matmul_reduce_scatter

P = PartitionSpec


def collective_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    mesh: Mesh,
    axis: str,
    kind: Literal["all_gather", "reduce_scatter"] = "all_gather",
    bidirectional: bool = False,
) -> jax.Array:
    """``x @ w`` for tensor-parallel layers, with the collective overlapped.

    kind='all_gather' (column-parallel; e.g. QKV / MLP-in projections):
      x [M, K] sharded by rows over ``axis``, w [K, N] sharded by columns
      -> [M, N] sharded by columns.
    kind='reduce_scatter' (row-parallel; e.g. attention-out / MLP-out):
      x [M, K] sharded by columns, w [K, N] sharded by rows
      -> [M, N] sharded by rows.
    Other mesh axes are left to GSPMD.
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"collective_matmul: axis={axis!r} is not in the mesh {mesh.axis_names}")
    n = mesh.shape[axis]
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"collective_matmul: expected x [M, K] and w [K, N], got {x.shape=}, {w.shape=}"
        )
    if kind == "all_gather":
        checks = {"x.shape[0] (rows)": x.shape[0], "w.shape[1] (columns)": w.shape[1]}
        in_specs, out_spec, body = (P(axis, None), P(None, axis)), P(None, axis), all_gather_matmul
    elif kind == "reduce_scatter":
        checks = {"x.shape[0] (rows)": x.shape[0], "x.shape[1] = w.shape[0]": x.shape[1]}
        in_specs, out_spec, body = (
            (P(None, axis), P(axis, None)),
            P(axis, None),
            matmul_reduce_scatter,
        )
    else:
        raise ValueError(
            f"collective_matmul: kind must be 'all_gather' or 'reduce_scatter', got {kind!r}"
        )
    for what, size in checks.items():
        if size % n:
            raise ValueError(
                f"collective_matmul: {what}={size} is not divisible by mesh axis {axis!r} "
                f"of size {n}"
            )
    f = jax.shard_map(
        lambda x, w: body(x, w, axis_name=axis, bidirectional=bidirectional),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_spec,
        axis_names={axis},
    )
    return f(x, w)
