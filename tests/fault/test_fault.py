"""Goodput accounting and model; SDC fingerprints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallax.fault import (
    GoodputScenario,
    GoodputTracker,
    disagreeing_replicas,
    fingerprint,
    simulate_goodput,
)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_tracker_splits_wall_time_into_buckets():
    clock = FakeClock()
    tracker = GoodputTracker(clock)
    with tracker.track("startup"):
        clock.now += 5
    for _ in range(4):
        with tracker.track("productive"):
            clock.now += 10
    with tracker.track("recovery"):
        clock.now += 3
    tracker.lose_progress(10)  # the last step before the failure is redone
    clock.now += 2  # untracked
    report = tracker.report()
    assert report["wall_s"] == 50
    assert report["productive_s"] == 30 and report["lost_progress_s"] == 10
    assert report["startup_s"] == 5 and report["recovery_s"] == 3 and report["other_s"] == 2
    assert report["goodput"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="unknown goodput bucket"), tracker.track("coffee"):
        pass


def test_model_reproduces_the_reports_85_and_97_percent():
    analytic = simulate_goodput()
    assert 0.83 <= analytic["persistent_only"] <= 0.88
    assert 0.96 <= analytic["in_memory"] <= 0.985
    simulated = simulate_goodput(method="monte_carlo", hours=24 * 60, seed=1)
    for design in ("persistent_only", "in_memory"):
        assert simulated[design] == pytest.approx(analytic[design], abs=0.03)


def test_model_responds_to_its_parameters():
    base = simulate_goodput()
    fewer_chips = simulate_goodput(GoodputScenario(chips=1024))
    assert fewer_chips["persistent_only"] > base["persistent_only"]
    slow_restore = simulate_goodput(GoodputScenario(replica_restore_hours=0.5))
    assert slow_restore["in_memory"] < base["in_memory"]
    with pytest.raises(ValueError, match="method"):
        simulate_goodput(method="guess")


def _tree(seed, dtype):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": jax.random.normal(keys[0], (7, 13)).astype(dtype),
        "b": [jax.random.normal(keys[1], (5,)).astype(dtype)],
        "step": jnp.int32(seed),
    }


@given(
    seed=st.integers(0, 100),
    leaf=st.integers(0, 2),
    position=st.integers(0, 10_000),
    bit=st.integers(0, 31),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_any_single_bit_flip_changes_the_fingerprint(seed, leaf, position, bit, dtype):
    tree = _tree(seed, dtype)
    leaves, treedef = jax.tree.flatten(tree)
    x = np.asarray(leaves[leaf]).copy()
    raw = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).reshape(-1)
    raw[position % raw.size] ^= np.asarray(1 << (bit % (8 * x.dtype.itemsize))).astype(raw.dtype)
    leaves[leaf] = jnp.asarray(x)
    flipped = jax.tree.unflatten(treedef, leaves)
    assert not np.array_equal(fingerprint(tree), fingerprint(flipped))
    np.testing.assert_array_equal(fingerprint(tree), jax.jit(fingerprint)(_tree(seed, dtype)))


def test_swapped_elements_change_the_fingerprint():
    x = jnp.arange(8, dtype=jnp.float32)
    assert not np.array_equal(fingerprint(x), fingerprint(x[::-1]))


def test_majority_names_the_bad_replica():
    good, bad = np.zeros((3, 2), np.uint32), np.ones((3, 2), np.uint32)
    assert disagreeing_replicas([good, good, good]) == []
    assert disagreeing_replicas([good, bad, good]) == [1]
    assert disagreeing_replicas([good, bad]) == [0, 1]  # no majority: replay must decide


def test_replica_fingerprints_name_the_replica_with_a_flipped_bit(cpu_devices):
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    from pallax.fault import flip_bit, replica_fingerprints

    mesh = Mesh(
        np.asarray(cpu_devices).reshape(4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2
    )
    params = {
        "w": jax.device_put(
            jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, PartitionSpec(None, "tensor"))
        ),
        "b": jax.device_put(jnp.ones(8), NamedSharding(mesh, PartitionSpec())),
    }
    clean = replica_fingerprints(params, mesh, "data")
    assert clean.shape[0] == 4 and disagreeing_replicas(clean) == []
    # Device 5 is (data=2, tensor=1) in this mesh: corrupt its copy of "w".
    corrupted = dict(params, w=flip_bit(params["w"], device_index=5, element=3, bit=30))
    fps = replica_fingerprints(corrupted, mesh, "data")
    assert disagreeing_replicas(fps) == [2]


def test_scanner_passes_healthy_devices(cpu_devices):
    from pallax.fault import scan

    results = scan(cpu_devices[:2])
    assert len(results) == 2 and all(r.ok and r.matmul_exact for r in results), results
    assert all(r.attention_max_error < 1e-5 for r in results)


def test_host_snapshots_survive_donation_and_restore_bit_identically(cpu_devices):
    from pallax.fault import HostSnapshots
    from pallax.model import PRESETS, data
    from pallax.model.train import TrainConfig, init_state, make_train_step, state_shardings
    from pallax.sharding import MeshConfig, make_mesh

    config, tc = PRESETS["tiny"], TrainConfig(total_steps=4, warmup_steps=1)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=cpu_devices)
    state = init_state(config, tc, mesh, jax.random.key(0))
    step = make_train_step(config, tc, mesh)
    iterator = data.DataIterator(data.PackedRows.build(32), 8)
    snapshots = HostSnapshots(keep=2)
    expected = {}
    for i in range(3):
        state, _ = step(state, next(iterator))  # donates the previous state's buffers
        snapshots.save(i + 1, state)
        expected[i + 1] = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
    assert snapshots.steps() == [2, 3] and snapshots.nbytes() > 0
    restored_step, restored = snapshots.restore(state_shardings(config, tc, mesh))
    assert restored_step == 3
    got = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(restored))]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, expected[3], strict=True))
    _, older = snapshots.restore(state_shardings(config, tc, mesh), step=2)
    got = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(older))]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, expected[2], strict=True))
    assert older.params["layers"]["w_up"].sharding == state.params["layers"]["w_up"].sharding
    with pytest.raises(ValueError, match="no snapshot of step 1"):
        snapshots.restore(state_shardings(config, tc, mesh), step=1)
