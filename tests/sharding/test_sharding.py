"""Meshes, the logical-axis rule table and the checks built on it (8 CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType, PartitionSpec

from pallax.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    assert_sufficiently_sharded,
    logical_to_spec,
    make_mesh,
    named_shardings,
    shard,
)

P = PartitionSpec


def _mesh(cpu_devices, **sizes):
    return make_mesh(MeshConfig(**sizes), devices=cpu_devices)


@given(
    sizes=st.sampled_from(
        [
            dict(data=2, fsdp=2, tensor=2),
            dict(fsdp=-1),
            dict(data=-1, fsdp=1, tensor=4),
            dict(data=2, fsdp=1, sequence=2, tensor=-1),
            dict(dcn_data=2, fsdp=-1),
        ]
    )
)
def test_mesh_config_fills_the_free_axis(sizes):
    resolved = MeshConfig(**sizes).axis_sizes(8)
    assert np.prod(list(resolved.values())) == 8
    for name, size in sizes.items():
        assert size == -1 or resolved[name] == size


@pytest.mark.parametrize(
    "sizes, devices, match",
    [
        (dict(data=-1, fsdp=-1), 8, "at most one axis may be -1"),
        (dict(data=3, fsdp=-1), 8, "multiply to 3, which does not divide the 8 devices"),
        (dict(data=2, fsdp=2, tensor=1), 8, r"multiply to 4, but there are 8 devices"),
        (dict(data=0), 8, "positive ints or -1"),
    ],
)
def test_mesh_config_errors(sizes, devices, match):
    with pytest.raises(ValueError, match=match):
        MeshConfig(**sizes).axis_sizes(devices)


def test_mesh_config_parses_flags():
    assert MeshConfig.parse("data=2,fsdp=2,tensor=2") == MeshConfig(data=2, fsdp=2, tensor=2)
    assert MeshConfig.parse("data=-1,tensor=2").axis_sizes(8)["data"] == 4
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        MeshConfig.parse("model=2")


def test_make_mesh_uses_auto_axes_in_a_fixed_order(cpu_devices):
    mesh = _mesh(cpu_devices, data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == dict(dcn_data=1, data=2, fsdp=2, sequence=1, tensor=2)
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_logical_to_spec_drops_trivial_axes_and_joins_batch_axes(cpu_devices):
    mesh = _mesh(cpu_devices, data=2, fsdp=2, tensor=2)
    spec = logical_to_spec(("batch", "length", "act_embed"), shape=(8, 16, 32), mesh=mesh)
    assert spec == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), shape=(32, 64), mesh=mesh) == P("fsdp", "tensor")
    # Without a mesh the table is used as written.
    assert logical_to_spec(("heads", None)) == P("tensor", None)


def test_mqa_single_kv_head_is_replicated_while_query_heads_are_sharded(cpu_devices):
    mesh = _mesh(cpu_devices, fsdp=2, tensor=4)
    q_proj = logical_to_spec(("embed", "heads", "head_dim"), shape=(64, 8, 16), mesh=mesh)
    kv_proj = logical_to_spec(("embed", "kv_heads", "head_dim"), shape=(64, 1, 16), mesh=mesh)
    assert q_proj == P("fsdp", "tensor", None)
    assert kv_proj == P("fsdp", None, None)
    # GQA with as many KV heads as the tensor axis: sharded like query heads.
    gqa = logical_to_spec(("embed", "kv_heads", "head_dim"), shape=(64, 4, 16), mesh=mesh)
    assert gqa == P("fsdp", "tensor", None)


def test_indivisible_dimension_is_an_error_naming_array_dimension_and_axis(cpu_devices):
    mesh = _mesh(cpu_devices, fsdp=2, tensor=4)
    with pytest.raises(ValueError, match=r"w_q: dimension 1 \('heads'\).*size 6.*\('tensor',\)"):
        logical_to_spec(("embed", "heads", "head_dim"), shape=(64, 6, 16), mesh=mesh, name="w_q")


def test_a_mesh_axis_cannot_shard_two_dimensions():
    with pytest.raises(ValueError, match="mesh axis 'tensor' would shard both dimension 0"):
        logical_to_spec(("heads", "mlp"))


def test_unknown_logical_name_and_wrong_rank():
    with pytest.raises(ValueError, match="no rule for logical axis 'model'"):
        logical_to_spec(("model",))
    with pytest.raises(ValueError, match="2 logical axes"):
        logical_to_spec(("batch", "length"), shape=(1, 2, 3))


def test_rules_replace_remaps_names():
    rules = DEFAULT_RULES.replace(embed=None, act_embed="tensor")
    assert rules.mesh_axes("embed") == () and rules.mesh_axes("act_embed") == ("tensor",)
    assert rules.mesh_axes("batch") == DEFAULT_RULES.mesh_axes("batch")


def test_named_shardings_follow_the_tree_and_check_divisibility(cpu_devices):
    mesh = _mesh(cpu_devices, fsdp=2, tensor=4)
    axes = {"w_up": ("embed", "mlp"), "norm": ("act_embed",)}
    shapes = {
        "w_up": jax.ShapeDtypeStruct((32, 64), jnp.float32),
        "norm": jax.ShapeDtypeStruct((32,), jnp.float32),
    }
    shardings = named_shardings(axes, mesh, shapes=shapes)
    assert shardings["w_up"].spec == P("fsdp", "tensor")
    assert shardings["norm"].spec == P(None)
    bad = {**shapes, "w_up": jax.ShapeDtypeStruct((32, 66), jnp.float32)}
    with pytest.raises(ValueError, match=r"\['w_up'\]: dimension 1 \('mlp'\)"):
        named_shardings(axes, mesh, shapes=bad)


def test_shard_constrains_inside_jit_and_is_a_no_op_without_a_mesh(cpu_devices):
    mesh = _mesh(cpu_devices, data=2, tensor=4)
    x = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
    assert shard(x, ("batch", "mlp")) is x
    f = jax.jit(lambda x: shard(x * 2, ("batch", "mlp"), mesh=mesh))
    y = f(x)
    assert y.sharding.spec == P("data", "tensor")
    np.testing.assert_array_equal(y, x * 2)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: shard(x, ("batch", None)))(x)
        assert y.sharding.is_equivalent_to(jax.NamedSharding(mesh, P("data", None)), 2)


def test_assert_sufficiently_sharded(cpu_devices):
    mesh = _mesh(cpu_devices, fsdp=2, tensor=4)
    axes = {"w": ("embed", "mlp"), "b": ("act_embed",)}
    params = {"w": jnp.ones((64, 128)), "b": jnp.ones((128,))}
    sharded = jax.device_put(params, named_shardings(axes, mesh))
    assert_sufficiently_sharded(sharded, mesh, min_fraction=0.9)
    replicated = jax.device_put(params, jax.NamedSharding(mesh, P()))
    with pytest.raises(AssertionError, match=r"0\.125 sharded.*\['w'\]"):
        assert_sufficiently_sharded(replicated, mesh, min_fraction=0.9)
