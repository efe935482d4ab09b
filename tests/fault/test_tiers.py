"""Replicated tiers (one process, 8 CPU devices): exact round trips, the restore
plan, persistent manifests that reject a corrupted checkpoint, discard_after."""

from __future__ import annotations

import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pallax.fault import ReplicatedTiers, corrupt_persistent


class _State(NamedTuple):
    w: jax.Array
    opt: tuple
    step: jax.Array


def _setup(cpu_devices):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    shard = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    rep = NamedSharding(mesh, PartitionSpec())
    state = _State(
        jax.device_put(jnp.arange(32.0).reshape(4, 8), shard),
        (jax.device_put(jnp.ones((4, 8), jnp.bfloat16), shard),),
        jax.device_put(jnp.int32(0), rep),
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    return mesh, state, abstract


def _advance(state, k):
    return jax.tree.map(lambda x: x + k, state)


def _tiers(mesh, abstract, root):
    return ReplicatedTiers(
        mesh,
        abstract,
        local_dir=root / "local",
        persistent_dir=root / "persistent",
        persistent_every=2,
    )


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.sharding == y.sharding
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_plan(cpu_devices, tmp_path):
    mesh, state, abstract = _setup(cpu_devices)
    tiers = _tiers(mesh, abstract, tmp_path)
    for step in range(5):
        tiers.save(step, _advance(state, step))
    tiers.wait()
    plan = tiers.plan_restore([[0], [0]])
    assert (plan.step, plan.source) == (4, "local")
    _assert_same(tiers.restore(4), _advance(state, 4))
    _assert_same(tiers.restore(3), _advance(state, 3))
    assert all(tiers.verify_persistent(s) for s in (0, 2, 4))
    tiers.close()


def test_lost_tier_falls_back_to_a_verified_persistent_step(cpu_devices, tmp_path):
    mesh, state, abstract = _setup(cpu_devices)
    tiers = _tiers(mesh, abstract, tmp_path)
    for step in range(5):
        tiers.save(step, _advance(state, step))
    tiers.close()
    corrupt_persistent(tmp_path / "persistent" / "4")
    shutil.rmtree(tmp_path / "local")  # the host and its in-memory tier are gone

    tiers = _tiers(mesh, abstract, tmp_path)
    assert not tiers.verify_persistent(4)
    plan = tiers.plan_restore([[0], [0]])
    assert (plan.step, plan.source, plan.rejected_persistent) == (2, "persistent", (4,))
    _assert_same(tiers.restore(2), _advance(state, 2))
    tiers.discard_after(2)  # the corrupted step is moved aside, never loaded
    assert (tmp_path / "persistent.discarded" / "4").is_dir()
    assert not (tmp_path / "persistent" / "4").exists()
    for step in (3, 4):  # and the run can write those steps again
        tiers.save(step, _advance(state, step))
    tiers.wait()
    assert tiers.verify_persistent(4)
    _assert_same(tiers.restore(4), _advance(state, 4))
    tiers.close()


def test_manifest_missing_means_unverified(cpu_devices, tmp_path):
    mesh, state, abstract = _setup(cpu_devices)
    tiers = _tiers(mesh, abstract, tmp_path)
    tiers.save(0, state)
    tiers.wait()
    assert tiers.verify_persistent(0)
    (tmp_path / "persistent.manifests" / "0.json").unlink()
    assert not tiers.verify_persistent(0)
    tiers.close()


def test_bad_arguments(cpu_devices, tmp_path):
    mesh, _, abstract = _setup(cpu_devices)
    with pytest.raises(ValueError, match="memory_every=0"):
        ReplicatedTiers(mesh, abstract, local_dir=tmp_path, persistent_dir=tmp_path, memory_every=0)
    one = jax.make_mesh((1, 8), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match="needs >= 2 replicas"):
        ReplicatedTiers(one, abstract, local_dir=tmp_path, persistent_dir=tmp_path)
