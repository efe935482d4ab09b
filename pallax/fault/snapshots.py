"""The in-memory tier: asynchronous per-step copies of the training state in host RAM.

``save`` makes an on-device copy of the state (one fast HBM pass, so the train
step may donate the original buffers) and starts its device-to-host transfers;
it returns at once and the copies finish while the next step runs. Each
process keeps the shards it can address. In a data-parallel job another
replica holds the same shards, which is what recovery from an intact replica
reads; this module is the local tier (the supervisor and the replica broadcast
are not built yet).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class _Snapshot:
    step: int
    treedef: Any
    device_copies: list[jax.Array] | None
    host: list[dict[int, np.ndarray]] | None = None
    shapes: list[tuple] | None = None
    dtypes: list[Any] | None = None


_copy = jax.jit(lambda leaves: [jnp.copy(x) for x in leaves])


class HostSnapshots:
    def __init__(self, keep: int = 2):
        if keep < 1:
            raise ValueError(f"HostSnapshots: keep must be >= 1, got {keep}")
        self._snapshots: collections.deque[_Snapshot] = collections.deque(maxlen=keep)

    def save(self, step: int, tree) -> None:
        """Starts copying ``tree`` (arrays, possibly sharded) to host RAM; non-blocking."""
        leaves, treedef = jax.tree.flatten(tree)
        copies = _copy(leaves)
        for leaf in copies:
            for shard in leaf.addressable_shards:
                shard.data.copy_to_host_async()
        self._snapshots.append(_Snapshot(step, treedef, copies))

    def _materialise(self, snap: _Snapshot) -> None:
        if snap.host is not None:
            return
        snap.host = [
            {shard.device.id: np.asarray(shard.data) for shard in leaf.addressable_shards}
            for leaf in snap.device_copies
        ]
        snap.shapes = [leaf.shape for leaf in snap.device_copies]
        snap.dtypes = [leaf.dtype for leaf in snap.device_copies]
        snap.device_copies = None  # free the device copies once the host has the data

    def steps(self) -> list[int]:
        return [s.step for s in self._snapshots]

    def latest_step(self) -> int | None:
        return self._snapshots[-1].step if self._snapshots else None

    def restore(self, shardings, step: int | None = None):
        """The snapshot at ``step`` (default: the newest) placed with ``shardings``."""
        if not self._snapshots:
            raise ValueError("HostSnapshots.restore: no snapshot has been saved")
        snap = next((s for s in reversed(self._snapshots) if step is None or s.step == step), None)
        if snap is None:
            raise ValueError(
                f"HostSnapshots.restore: no snapshot of step {step}; have {self.steps()}"
            )
        self._materialise(snap)
        out = []
        for host, shape, sharding in zip(
            snap.host, snap.shapes, jax.tree.leaves(shardings), strict=True
        ):
            arrays = [jax.device_put(host[d.id], d) for d in sharding.addressable_devices]
            out.append(jax.make_array_from_single_device_arrays(shape, sharding, arrays))
        return snap.step, jax.tree.unflatten(snap.treedef, out)

    def nbytes(self) -> int:
        """Host bytes held (snapshots not yet materialised are counted at device size)."""
        total = 0
        for snap in self._snapshots:
            if snap.host is not None:
                total += sum(a.nbytes for host in snap.host for a in host.values())
            else:
                total += sum(
                    s.data.nbytes for leaf in snap.device_copies for s in leaf.addressable_shards
                )
        return total
