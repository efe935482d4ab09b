"""overlap_report on compiled 8-device programs: ring schedules overlap, naive ones cannot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec

from pallax.collectives import (
    all_gather_matmul,
    bracketed_dots,
    collective_matmul,
    matmul_reduce_scatter,
    overlap_report,
)

P = PartitionSpec


@pytest.fixture(scope="module")
def mesh(cpu_devices):
    return Mesh(np.asarray(cpu_devices), ("x",), axis_types=(AxisType.Auto,))


def _report(fn, *args):
    return overlap_report(jax.jit(fn).lower(*args).compile())


X = jax.ShapeDtypeStruct((64, 32), jnp.float32)
W = jax.ShapeDtypeStruct((32, 48), jnp.float32)


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidi"])
def test_every_ring_step_has_an_independent_dot(mesh, kind, bidirectional):
    x = X if kind == "all_gather" else jax.ShapeDtypeStruct((64, 64), jnp.float32)
    w = W if kind == "all_gather" else jax.ShapeDtypeStruct((64, 48), jnp.float32)
    report = _report(
        lambda x, w: collective_matmul(
            x, w, mesh=mesh, axis="x", kind=kind, bidirectional=bidirectional
        ),
        x,
        w,
    )
    permutes = [c for c in report.collectives if c.opcode.startswith("collective-permute")]
    assert len(permutes) == 7 * (2 if bidirectional else 1), str(report)
    # The bar is "every ring step but the last"; the schedule meets it for all.
    assert all(c.independent_dots for c in permutes), str(report)


def test_backward_of_the_ring_is_also_overlapped(mesh):
    def loss(x, w):
        return jnp.sum(collective_matmul(x, w, mesh=mesh, axis="x") ** 2)

    report = _report(jax.grad(loss, argnums=(0, 1)), X, W)
    permutes = [c for c in report.collectives if c.opcode.startswith("collective-permute")]
    assert len(permutes) >= 14, str(report)  # the dx reduce-scatter ring and the dw ring
    assert all(c.independent_dots for c in permutes), str(report)


def test_all_gather_then_matmul_has_nothing_to_overlap(mesh):
    naive = jax.shard_map(
        lambda x, w: jax.lax.all_gather(x, "x", tiled=True) @ w,
        mesh=mesh,
        in_specs=(P("x", None), P(None, "x")),
        out_specs=P(None, "x"),
    )
    report = _report(naive, X, W)
    gathers = [c for c in report.collectives if c.opcode.startswith("all-gather")]
    assert gathers and not any(c.independent_dots for c in gathers), str(report)


def test_matmul_then_reduce_scatter_has_nothing_to_overlap(mesh):
    naive = jax.shard_map(
        lambda x, w: jax.lax.psum_scatter(x @ w, "x", tiled=True),
        mesh=mesh,
        in_specs=(P(None, "x"), P("x", None)),
        out_specs=P("x", None),
    )
    report = _report(
        naive,
        jax.ShapeDtypeStruct((64, 64), jnp.float32),
        jax.ShapeDtypeStruct((64, 48), jnp.float32),
    )
    assert report.collectives and report.num_overlappable == 0, str(report)


def test_parser_on_handwritten_hlo():
    hlo = """
HloModule m

%fused (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %d = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,4], b: f32[4,4]) -> (f32[4,4], f32[4,4]) {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %ag-start = (f32[4,4]{1,0}, f32[4,4]{1,0}) all-gather-start(%a), dimensions={0}
  %ag-done = f32[4,4]{1,0} all-gather-done(%ag-start)
  %independent = f32[4,4]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused
  %dependent = f32[4,4]{1,0} dot(%ag-done, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (f32[4,4]{1,0}, f32[4,4]{1,0}) tuple(%independent, %dependent)
}
"""
    report = overlap_report(hlo)
    assert [c.name for c in report.collectives] == ["ag-start"]
    assert report.collectives[0].independent_dots == ("independent",)
    assert set(report.dots) == {"d", "independent", "dependent"}
    assert "1 collectives with independent dots" in str(report)


def test_accepts_lowered_and_compiled(mesh):
    f = jax.jit(
        jax.shard_map(
            lambda x, w: all_gather_matmul(x, w, axis_name="x"),
            mesh=mesh,
            in_specs=(P("x", None), P(None, "x")),
            out_specs=P(None, "x"),
        )
    )
    lowered = f.lower(X, W)
    assert (
        overlap_report(lowered).num_overlappable
        == overlap_report(lowered.compile()).num_overlappable
    )
    g = jax.jit(
        jax.shard_map(
            lambda x, w: matmul_reduce_scatter(x, w, axis_name="x"),
            mesh=mesh,
            in_specs=(P(None, "x"), P("x", None)),
            out_specs=P("x", None),
        )
    )
    assert (
        overlap_report(
            g.lower(
                jax.ShapeDtypeStruct((64, 64), jnp.float32),
                jax.ShapeDtypeStruct((64, 48), jnp.float32),
            )
        ).num_overlappable
        == 7
    )


def test_bracketed_dots_counts_dots_scheduled_inside_async_pairs():
    hlo = """
HloModule m, is_scheduled=true

ENTRY %main (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %cp-start = (f32[4,4]{1,0}, f32[4,4]{1,0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1},{1,0}}
  %d1 = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %d2 = f32[4,4]{1,0} dot(%d1, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %cp-done = f32[4,4]{1,0} collective-permute-done(%cp-start)
  %cp-start.1 = (f32[4,4]{1,0}, f32[4,4]{1,0}, u32[], u32[]) collective-permute-start(%cp-done), source_target_pairs={{0,1},{1,0}}
  %cp-done.1 = f32[4,4]{1,0} collective-permute-done(%cp-start.1)
  ROOT %d3 = f32[4,4]{1,0} dot(%cp-done.1, %d2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    assert bracketed_dots(hlo) == {"cp-start": 2, "cp-start.1": 0}
