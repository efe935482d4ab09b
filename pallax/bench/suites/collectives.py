"""Collective matmuls: cost-model predictions at real model shapes, the overlap
proof on 8 simulated devices, and (timed) ring vs naive schedules on those devices.

The Gemini report gives no layer dimensions; the shapes below are stated
assumptions: a Nano-2-like layer (d_model 3072, d_ff 24576, as in open 3B-class
decoders) and a Pro-like one (d_model 12288, d_ff 49152, GPT-3-175B-class),
each with 8192 tokens per tensor-parallel group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

from pallax.bench._harness import Case
from pallax.collectives import collective_matmul, cost_model, overlap_report

P = PartitionSpec
_MODELS = {"nano2-like": (3072, 24576), "pro-like": (12288, 49152)}
_TOKENS = 8192


def report(size: str) -> list[dict]:
    rows = []
    for model, (d_model, d_ff) in _MODELS.items():
        for chip_name in ("tpu_v5p", "tpu_v5e", "h100"):
            chip = cost_model.CHIPS[chip_name]
            for tp in (4, 8, 16):
                for layer, kind, k, n in (
                    ("mlp_in", "all_gather", d_model, d_ff),
                    ("mlp_out", "reduce_scatter", d_ff, d_model),
                ):
                    for schedule in ("naive", "ring", "ring_bidirectional"):
                        p = cost_model.predict(
                            m=_TOKENS,
                            k=k,
                            n_cols=n,
                            devices=tp,
                            chip=chip,
                            kind=kind,
                            schedule=schedule,
                        )
                        rows.append(
                            dict(
                                model=model,
                                chip=chip.name,
                                tp=tp,
                                layer=layer,
                                schedule=schedule,
                                compute_ms=p.compute_s * 1e3,
                                comm_ms=p.communication_s * 1e3,
                                predicted_ms=p.estimate_s * 1e3,
                                overlap=p.overlap_fraction,
                            )
                        )
    rows += _overlap_rows()
    return rows


def _mesh() -> Mesh | None:
    devices = jax.devices("cpu")
    if len(devices) < 8:
        return None
    return Mesh(np.asarray(devices[:8]), ("x",), axis_types=(AxisType.Auto,))


def _overlap_rows() -> list[dict]:
    mesh = _mesh()
    if mesh is None:
        return []
    x = jax.ShapeDtypeStruct((512, 256), jnp.float32)
    w = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    naive = jax.shard_map(
        lambda x, w: jax.lax.all_gather(x, "x", tiled=True) @ w,
        mesh=mesh,
        in_specs=(P("x", None), P(None, "x")),
        out_specs=P(None, "x"),
    )
    programs = {
        "naive all-gather then matmul": naive,
        "ring all_gather_matmul": lambda x, w: collective_matmul(x, w, mesh=mesh, axis="x"),
        "ring, bidirectional": lambda x, w: collective_matmul(
            x, w, mesh=mesh, axis="x", bidirectional=True
        ),
    }
    rows = []
    for name, fn in programs.items():
        with jax.default_device(mesh.devices.flat[0]):
            r = overlap_report(jax.jit(fn).lower(x, w))
        rows.append(
            dict(
                model="overlap_report (8 CPU devices)",
                schedule=name,
                collectives=len(r.collectives),
                overlappable=r.num_overlappable,
            )
        )
    return rows


def cases(size: str) -> list[Case]:
    mesh = _mesh()
    if mesh is None:
        return []
    m, k, n = {"smoke": (64, 64, 64), "cpu": (2048, 1024, 2048), "full": (8192, 4096, 8192)}[size]
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    x = jax.device_put(x, jax.NamedSharding(mesh, P("x", None)))
    w = jax.device_put(w, jax.NamedSharding(mesh, P(None, "x")))
    naive = jax.shard_map(
        lambda x, w: jax.lax.all_gather(x, "x", tiled=True) @ w,
        mesh=mesh,
        in_specs=(P("x", None), P(None, "x")),
        out_specs=P(None, "x"),
    )
    flops, nbytes = 2 * m * k * n, 4 * (m * k + k * n + m * n)
    impls = {
        "naive": naive,
        "ring": lambda x, w: collective_matmul(x, w, mesh=mesh, axis="x"),
        "ring-bidi": lambda x, w: collective_matmul(x, w, mesh=mesh, axis="x", bidirectional=True),
    }
    return [
        Case(
            "collectives",
            f"all_gather_matmul {m}x{k}x{n} f32 (8 CPU devices)",
            name,
            jax.jit(fn),
            (x, w),
            flops=flops,
            bytes=nbytes,
        )
        for name, fn in impls.items()
    ]
