"""Collective matmuls over a mesh axis, at the level of ``jax.jit``."""

from __future__ import annotations

from typing import Literal

import jax
from jax.sharding import Mesh, PartitionSpec

from pallax.collectives import pallas_tpu
from pallax.collectives.ring import all_gather_matmul, matmul_reduce_scatter
from pallax.kernels import resolve_implementation, tpu_interpret_params

P = PartitionSpec


def collective_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    mesh: Mesh,
    axis: str,
    kind: Literal["all_gather", "reduce_scatter"] = "all_gather",
    bidirectional: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """``x @ w`` for tensor-parallel layers, with the collective overlapped.

    kind='all_gather' (column-parallel; e.g. QKV / MLP-in projections):
      x [M, K] sharded by rows over ``axis``, w [K, N] sharded by columns
      -> [M, N] sharded by columns.
    kind='reduce_scatter' (row-parallel; e.g. attention-out / MLP-out):
      x [M, K] sharded by columns, w [K, N] sharded by rows
      -> [M, N] sharded by rows.
    Other mesh axes are left to GSPMD.

    implementation: 'xla' (ring of ppermutes that XLA schedules), 'pallas_tpu'
    (all_gather only, unidirectional: one Mosaic kernel whose ring is remote
    DMAs; on a CPU inside ``pallax.kernels.interpret_mode()``), or None (the
    kernel on TPU when it can take the shapes, else 'xla').
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

    def supports(impl: str) -> str | None:
        if kind != "all_gather" or bidirectional:
            return "the Pallas kernel is a unidirectional all-gather-matmul"
        itemsize = max(x.dtype.itemsize, w.dtype.itemsize)
        return pallas_tpu.unsupported_reason(
            x.shape[0] // n, x.shape[1], w.shape[1] // n, n, itemsize
        )

    mode = resolve_implementation(
        "collective_matmul", implementation, available=("xla", "pallas_tpu"), supports=supports
    )
    if mode.implementation == "pallas_tpu":
        interpret = tpu_interpret_params(mode.interpret)

        def body(x, w, axis_name, bidirectional):
            del bidirectional
            return pallas_tpu.all_gather_matmul_pallas(
                x, w, axis_name=axis_name, interpret=interpret
            )

    f = jax.shard_map(
        lambda x, w: body(x, w, axis_name=axis, bidirectional=bidirectional),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_spec,
        axis_names={axis},
        check_vma=mode.implementation == "xla",
    )
    return f(x, w)
