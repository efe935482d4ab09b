"""Training: the loss falls, steps are deterministic and resumable, processes agree."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from pallax.model import PRESETS, data
from pallax.model.config import BOS, PAD
from pallax.model.train import TrainConfig, init_state, make_train_step, state_shardings
from pallax.sharding import MeshConfig, make_mesh
from pallax.testing import assert_allclose, run_processes, run_with_cpu_devices

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def mesh(cpu_devices):
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=cpu_devices)


@pytest.fixture(scope="module")
def rows():
    return data.PackedRows.build(64)


def _run(mesh, rows, steps, tc=None, state=None, iterator=None):
    tc = tc or TrainConfig(total_steps=steps, warmup_steps=2)
    state = state if state is not None else init_state(TINY, tc, mesh, jax.random.key(0))
    iterator = iterator or data.DataIterator(rows, 8, seed=0)
    step = make_train_step(TINY, tc, mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, next(iterator))
        losses.append(float(metrics["loss"]))
    return state, iterator, losses


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(tree))]


def test_loss_falls_on_the_shipped_corpus(mesh, rows):
    _, _, losses = _run(mesh, rows, 40)
    assert losses[-1] < losses[0] - 1.5, losses


def test_training_is_bit_deterministic(mesh, rows):
    a, _, _ = _run(mesh, rows, 4)
    b, _, _ = _run(mesh, rows, 4)
    assert _bits(a.params) == _bits(b.params)


def test_resuming_from_saved_state_equals_uninterrupted_training(mesh, rows):
    tc = TrainConfig(total_steps=6, warmup_steps=2)
    straight, _, _ = _run(mesh, rows, 6, tc)
    half, iterator, _ = _run(mesh, rows, 3, tc)
    saved_state, saved_data = jax.device_get(half), iterator.state()
    restored = jax.device_put(saved_state, state_shardings(TINY, tc, mesh))
    resumed_iterator = data.DataIterator(rows, 8)
    resumed_iterator.restore(saved_data)
    resumed, _, _ = _run(mesh, rows, 3, tc, state=restored, iterator=resumed_iterator)
    assert _bits(resumed.params) == _bits(straight.params)


def test_gradient_accumulation_matches_one_big_batch(mesh, rows):
    one, _, loss_one = _run(mesh, rows, 2, TrainConfig(total_steps=2, warmup_steps=1))
    acc, _, loss_acc = _run(
        mesh, rows, 2, TrainConfig(total_steps=2, warmup_steps=1, microbatches=2)
    )
    assert_allclose(np.array(loss_acc), np.array(loss_one), reduction_length=4096)
    for got, want in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params), strict=True):
        assert_allclose(got, want, reduction_length=4096)


def test_state_is_created_sharded(mesh):
    tc = TrainConfig()
    state = init_state(TINY, tc, mesh, jax.random.key(0))
    w_up = state.params["layers"]["w_up"]  # ('layers', 'embed', 'mlp') -> (None, fsdp, tensor)
    assert w_up.sharding.shard_shape(w_up.shape) == (2, 32, 128)
    mu = state.opt_state[1][0].mu["layers"]["w_up"]
    assert mu.sharding == w_up.sharding


def test_iterator_resumes_without_repeating_or_skipping(rows):
    first = data.DataIterator(rows, 8, seed=3)
    batches = [next(first) for _ in range(5)]
    second = data.DataIterator(rows, 8)
    second.restore({"position": 3, "seed": 3})
    for want in batches[3:]:
        got = next(second)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_packed_rows_mark_documents(rows):
    batch = rows.batch(np.arange(8))
    tokens, targets, segments, positions = (
        batch[k] for k in ("tokens", "targets", "segment_ids", "positions")
    )
    starts = tokens == BOS
    # A new document starts a new segment at position 0, and no target crosses documents.
    assert np.all(positions[starts] == 0)
    assert np.all(np.diff(segments, axis=1)[starts[:, 1:]] == 1)
    assert np.all(targets[:, :-1][starts[:, 1:]] == PAD)


def test_mesh_must_match_the_devices(cpu_devices):
    with pytest.raises(ValueError, match="multiply to 12, but there are 8 devices"):
        make_mesh(MeshConfig(data=3, fsdp=4), devices=cpu_devices)


def test_two_processes_train_like_one(tmp_path):
    code = """
from pallax.train import main
main(["--steps", "4", "--batch", "8", "--seq-len", "32", "--quiet", "--sample-tokens", "4",
      "--json", "{path}"])
"""
    one = tmp_path / "one.json"
    run_with_cpu_devices(code.format(path=one), num_devices=8)
    two = tmp_path / "two.json"
    # run_processes sets up jax.distributed itself: tell pallax.train it is process i of 2.
    launcher = """
import os
os.environ["PALLAX_NUM_PROCESSES"] = "2"
from pallax.train import main
main(["--steps", "4", "--batch", "8", "--seq-len", "32", "--quiet", "--sample-tokens", "4",
      "--json", "{path}"])
"""
    run_processes(launcher.format(path=two), num_processes=2, devices_per_process=4)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert_allclose(
        np.array(b["loss_history"]), np.array(a["loss_history"]), reduction_length=1 << 16
    )
    assert b["param_checksum"] == pytest.approx(a["param_checksum"], rel=1e-6)


def test_main_command_resumes_from_its_checkpoint(tmp_path):
    code = """
from pallax.train import main
main(["--steps", "{steps}", "--batch", "8", "--seq-len", "32", "--quiet", "--sample-tokens", "2",
      "--checkpoint-every", "3", "--json", "{out}"{extra}])
"""
    straight = tmp_path / "straight.json"
    run_with_cpu_devices(code.format(steps=6, out=straight, extra=""))
    ckpt = tmp_path / "ckpt"
    run_with_cpu_devices(
        code.format(steps=6, out=tmp_path / "first.json", extra=f', "--checkpoint-dir", "{ckpt}"')
    )
    # As if the job died after step 3: only the step-3 checkpoint survives.
    shutil.rmtree(ckpt / "6")
    run_with_cpu_devices(
        code.format(steps=6, out=tmp_path / "second.json", extra=f', "--checkpoint-dir", "{ckpt}"')
    )
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["first_step"] == 3 and second["data_state"]["position"] == 6
    assert second["param_checksum"] == json.loads(straight.read_text())["param_checksum"]
