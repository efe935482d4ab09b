"""The per-shard plan of a kernel call (pallax.kernels._partition): pure arithmetic on
partition specs, checked without running anything."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from pallax.kernels._partition import Rule, _reduced_axes, plan

MESH = {"data": 2, "fsdp": 2, "tensor": 4}
ATTENTION = Rule(
    "attention",
    ("b t n h", "b s k h", "b s k h", "b"),
    ("b t n h", "b s k h", "b k g t ."),
    ("query", "key", "value", "lengths"),
    unshardable=(("t", "the query sequence"), ("s", "the key/value sequence")),
    followers=("lengths",),
)


def _plan(rule, specs, shapes):
    return plan(rule, specs, shapes, MESH)


def test_the_most_sharded_operand_decides_and_followers_do_not_vote():
    shapes = [(4, 64, 8, 16), (4, 64, 1, 16), (4, 64, 1, 16), (4,)]
    chosen = _plan(ATTENTION, [P(), P(("data", "fsdp")), P("data"), P("tensor")], shapes)
    assert chosen["b"] == ("data", "fsdp")
    assert chosen == {"b": ("data", "fsdp"), "n": (), "k": (), "g": ()}


def test_one_kv_head_stays_whole_and_the_group_is_split():
    shapes = [(4, 64, 8, 16), (4, 64, 1, 16), (4, 64, 1, 16), (4,)]
    chosen = _plan(ATTENTION, [P(None, None, "tensor"), P(), P(), P()], shapes)
    assert (chosen["n"], chosen["k"], chosen["g"]) == (("tensor",), (), ("tensor",))
    out, dk, lse = _reduced_axes(ATTENTION, chosen)
    assert out == () and lse == ()
    assert dk == ("tensor",)  # dK of the one head summed over the devices holding queries


def test_kv_heads_split_with_the_query_heads():
    shapes = [(4, 64, 8, 16), (4, 64, 4, 16), (4, 64, 4, 16), (4,)]
    chosen = _plan(ATTENTION, [P(None, None, "tensor"), P(), P(), P()], shapes)
    assert (chosen["n"], chosen["k"], chosen["g"]) == (("tensor",), ("tensor",), ())
    assert _reduced_axes(ATTENTION, chosen) == [(), (), ()]  # no sum: each holds its heads


def test_kv_heads_that_do_not_divide_the_axes_are_an_error():
    shapes = [(4, 64, 8, 16), (4, 64, 2, 16), (4, 64, 2, 16), (4,)]
    with pytest.raises(ValueError, match="2 key/value heads cannot be split over mesh axes"):
        _plan(ATTENTION, [P(None, None, "tensor"), P(), P(), P()], shapes)


@pytest.mark.parametrize("operand", [0, 1])
def test_a_sharded_sequence_names_operand_dimension_and_axes(operand):
    shapes = [(4, 64, 8, 16), (4, 64, 1, 16), (4, 64, 1, 16), (4,)]
    specs = [P(), P(), P(), P()]
    specs[operand] = P(None, "tensor")
    name, what = [("query", "the query sequence"), ("key", "the key/value sequence")][operand]
    with pytest.raises(
        ValueError,
        match=rf"{name} dimension 1 \({what}, size 64\) is sharded "
        r"over mesh axes \('tensor',\)",
    ):
        _plan(ATTENTION, specs, shapes)


def test_a_broadcast_dimension_is_never_sharded_and_its_gradient_is_summed():
    rule = Rule("bias", ("b n t s", ". n t s"), ("b n t s", ". n t s"), ("x", "bias"))
    chosen = _plan(rule, [P("data", "tensor"), P()], [(4, 8, 16, 16), (1, 8, 16, 16)])
    assert _reduced_axes(rule, chosen) == [(), ("data",)]


def test_tied_factor_follows_its_leader_and_is_not_summed():
    rule = Rule(
        "paged",
        ("b t", "p x", "b j"),
        ("b t",),
        ("q", "pool", "table"),
        followers=("table",),
        tied=(("p", "b"),),
    )
    chosen = _plan(rule, [P("data"), P("tensor"), P()], [(4, 8), (32, 8), (4, 8)])
    assert chosen["p"] == ("data",)
    assert _reduced_axes(rule, chosen) == [()]
    with pytest.raises(ValueError, match="'p' \\(size 3\\) must split over mesh axes"):
        _plan(rule, [P("data"), P(), P()], [(4, 8), (3, 8), (4, 8)])


def test_combined_factors_are_left_to_the_kernel_function():
    rule = Rule("ce", ("t d", "d v"), ("t", "t"), ("h", "w"), combined=("v",))
    chosen = _plan(rule, [P("data"), P(None, "tensor")], [(8, 4), (4, 64)])
    assert chosen["v"] == ("tensor",)
    assert _reduced_axes(rule, chosen) == [(), ()]
