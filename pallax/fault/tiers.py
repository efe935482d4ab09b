"""Replicated checkpoint tiers on Orbax's emergency (P2P) checkpoint manager.

Every process writes the shards it holds to its own local tier (a RAM disk,
``/dev/shm`` by default) every ``memory_every`` steps, and the primary replica
writes a persistent checkpoint every ``persistent_every`` steps; both saves are
asynchronous (Orbax). On restore, Orbax's P2P manager reads each process's
shards from its own tier or, for a process that lost its tier (a replaced
host), fetches them from a peer of another data-parallel replica that holds the
same shards; only when no replica holds a step does it read persistent storage.

What this module adds to Orbax:

- the flat on-disk layout of a :class:`~pallax.model.train.TrainState`
  (``leaf_00012`` keys, rebuilt with the state's treedef, so NamedTuples
  survive);
- ``plan_restore``: which step every process can restore and from where
  (its own tier, a peer, persistent storage), agreed by all processes;
- integrity of the persistent tier: after a persistent step is final, process 0
  writes a manifest (SHA-256 of every file) next to it; a step whose files no
  longer match is reported and never loaded, and the next older one is used;
- ``corrupt_persistent`` (failure injection): alters a file of a final step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.experimental.emergency.p2p import args as p2p_args
from orbax.checkpoint.experimental.emergency.p2p import checkpoint_manager as p2p_manager
from orbax.checkpoint.experimental.emergency.p2p import options as p2p_options

_MAX_STEPS = 16  # local steps reported per process in plan_restore


def _flat(tree) -> dict[str, jax.Array]:
    return {f"leaf_{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _step_dirs(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _hash_files(step_dir: pathlib.Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        out[str(path.relative_to(step_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclasses.dataclass(frozen=True)
class RestorePlan:
    step: int | None  # None: nothing to restore (fresh start)
    source: str  # 'local' | 'peer' | 'persistent' | 'none' (for this process)
    rejected_persistent: tuple[int, ...] = ()  # persistent steps that failed verification


class ReplicatedTiers:
    """The local (in-memory) and persistent tiers of one training job.

    ``worker_dirs[i]`` is process i's local tier; every process knows all of them
    only to read its own (and, for the plan, to list what each holds through an
    all-gather — never by reading another host's disk).
    """

    def __init__(
        self,
        mesh,
        abstract_state,
        *,
        local_dir: str | os.PathLike,
        persistent_dir: str | os.PathLike,
        memory_every: int = 1,
        persistent_every: int = 100,
        replica_axis: str = "data",
        keep: int = 2,
    ):
        if memory_every < 1 or persistent_every < 1:
            raise ValueError(
                f"ReplicatedTiers: memory_every={memory_every} and persistent_every="
                f"{persistent_every} must be >= 1"
            )
        if replica_axis not in mesh.axis_names or mesh.shape[replica_axis] < 2:
            raise ValueError(
                f"ReplicatedTiers: needs >= 2 replicas on mesh axis {replica_axis!r}; "
                f"mesh is {dict(mesh.shape)}"
            )
        self.local_dir = pathlib.Path(local_dir)
        self.persistent_dir = pathlib.Path(persistent_dir)
        self.manifest_dir = self.persistent_dir.parent / (self.persistent_dir.name + ".manifests")
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.persistent_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        self.memory_every, self.persistent_every = memory_every, persistent_every
        self._treedef = jax.tree.structure(abstract_state)
        self._abstract = _flat(abstract_state)
        options = p2p_options.CheckpointManagerOptions(
            local=p2p_options.LocalCheckpointOptions(
                save_interval_steps=memory_every, max_to_keep=keep
            ),
            persistent=p2p_options.PersistentCheckpointOptions(
                save_interval_steps=persistent_every, max_to_keep=keep + 1
            ),
            replica_axis_index=mesh.axis_names.index(replica_axis),
        )
        self._manager = p2p_manager.CheckpointManager(
            mesh, self._abstract, self.local_dir, self.persistent_dir, options=options
        )
        self._unverified: list[int] = []  # persistent steps waiting for their manifest
        self._corrupt_at: set[int] = set()
        self.save_stall_s = 0.0

    # -- saving ---------------------------------------------------------------------------

    def save(self, step: int, state) -> bool:
        """Starts the asynchronous saves due at ``step``; returns whether one started."""
        begin = time.perf_counter()
        self._write_manifests()
        args = p2p_args.Composite(state=ocp.args.PyTreeSave(_flat(state)))
        saved = self._manager.save(step, args=args)
        if saved and step % self.persistent_every == 0:
            self._unverified.append(step)
        self.save_stall_s += time.perf_counter() - begin
        return saved

    def corrupt_persistent_after_save(self, step: int) -> None:
        """Failure injection: once persistent ``step`` is final (and its manifest written),
        one byte of its largest file is altered."""
        self._corrupt_at.add(step)

    def _write_manifests(self) -> None:
        """Manifests for persistent steps that Orbax has finalised (renamed in place)."""
        pending = []
        for step in self._unverified:
            step_dir = self.persistent_dir / str(step)
            if not step_dir.is_dir():
                pending.append(step)
                continue
            if jax.process_index() == 0:
                manifest = {"step": step, "files": _hash_files(step_dir)}
                tmp = self.manifest_dir / f"{step}.json.tmp"
                tmp.write_text(json.dumps(manifest))
                tmp.replace(self.manifest_dir / f"{step}.json")
                if step in self._corrupt_at:
                    corrupt_persistent(step_dir)
        self._unverified = pending

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    # -- restoring ------------------------------------------------------------------------

    def verify_persistent(self, step: int) -> bool:
        """Whether persistent ``step`` has a manifest and all its files still match it."""
        path = self.manifest_dir / f"{step}.json"
        if not path.is_file():
            return False
        expected = json.loads(path.read_text())["files"]
        return _hash_files(self.persistent_dir / str(step)) == expected

    def plan_restore(self, replica_groups: list[list[int]]) -> RestorePlan:
        """Agrees with all processes on the newest step that can be restored.

        ``replica_groups[r]`` lists the processes of replica r in shard order (the
        j-th process of every replica holds the same shards). A step is held in
        memory when, for every j, some replica's j-th process has it in its tier.
        Otherwise the newest persistent step whose manifest verifies is used.
        """
        mine = _step_dirs(self.local_dir)[-_MAX_STEPS:]
        padded = np.full((_MAX_STEPS,), -1, np.int64)
        padded[: len(mine)] = mine
        held = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, _MAX_STEPS)
        held_by = [set(int(s) for s in row if s >= 0) for row in held]
        positions = len(replica_groups[0])
        candidates = set().union(*held_by)
        in_memory = [
            s
            for s in sorted(candidates, reverse=True)
            if all(
                any(s in held_by[group[j]] for group in replica_groups) for j in range(positions)
            )
        ]
        if in_memory:
            step = in_memory[0]
            source = "local" if step in held_by[jax.process_index()] else "peer"
            return RestorePlan(step, source)
        # Persistent: process 0 verifies, everyone adopts its verdict.
        verdict = np.full((_MAX_STEPS + 1,), -1, np.int64)
        if jax.process_index() == 0:
            rejected = []
            for step in reversed(_step_dirs(self.persistent_dir)):
                if self.verify_persistent(step):
                    verdict[0] = step
                    break
                rejected.append(step)
            verdict[1 : 1 + len(rejected[:_MAX_STEPS])] = rejected[:_MAX_STEPS]
        verdict = np.asarray(multihost_utils.broadcast_one_to_all(verdict))
        rejected = tuple(int(s) for s in verdict[1:] if s >= 0)
        if verdict[0] < 0:
            return RestorePlan(None, "none", rejected)
        return RestorePlan(int(verdict[0]), "persistent", rejected)

    def discard_after(self, step: int) -> None:
        """Forgets every saved step newer than ``step`` (the run goes back to ``step``, so
        they belong to an abandoned future and would collide with the steps to come).

        Local steps are deleted; newer persistent steps are moved aside to
        ``<persistent>.discarded/`` (process 0), kept for forensics.
        """
        for newer in _step_dirs(self.local_dir):
            if newer > step:
                shutil.rmtree(self.local_dir / str(newer))
        if jax.process_index() == 0:
            aside = self.persistent_dir.parent / (self.persistent_dir.name + ".discarded")
            for newer in _step_dirs(self.persistent_dir):
                if newer > step:
                    aside.mkdir(exist_ok=True)
                    shutil.rmtree(aside / str(newer), ignore_errors=True)
                    (self.persistent_dir / str(newer)).rename(aside / str(newer))
                    (self.manifest_dir / f"{newer}.json").unlink(missing_ok=True)
        multihost_utils.sync_global_devices(f"pallax_discard_after_{step}")
        self._manager.reload()

    def restore(self, step: int):
        """The state saved at ``step``, in the shardings of ``abstract_state``."""
        args = p2p_args.Composite(state=ocp.args.PyTreeRestore(self._abstract))
        restored = self._manager.restore(step, args=args)
        flat = restored.state
        return jax.tree.unflatten(self._treedef, [flat[k] for k in sorted(flat)])


def corrupt_persistent(step_dir: pathlib.Path) -> pathlib.Path:
    """Alters one byte in the middle of the largest file under ``step_dir``."""
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    if not files:
        raise FileNotFoundError(f"corrupt_persistent: no files under {step_dir}")
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target
