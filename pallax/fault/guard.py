"""SDC guard for a data-parallel training loop: fingerprint, replay, name, recover.

After each step every data-parallel replica must hold bit-identical
parameters. The guard fingerprints each replica's own buffers; on a mismatch
it does not commit the step: it restores the previous step from the in-memory
tier, replays the step deterministically, names the replicas whose result
disagrees with the replay, and continues from the replayed state, so the run
ends bit-identical to a fault-free one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jax.sharding import Mesh

from pallax.fault.fingerprint import disagreeing_replicas
from pallax.fault.sdc import flip_bit, replica_fingerprints
from pallax.fault.snapshots import HostSnapshots


def parse_injection(text: str) -> tuple[int, int]:
    """'bitflip:replica=1,step=20' -> (step, replica)."""
    kind, _, spec = text.partition(":")
    fields = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    if kind != "bitflip" or not {"replica", "step"} <= fields.keys():
        raise ValueError(f"--inject: expected 'bitflip:replica=R,step=S', got {text!r}")
    return int(fields["step"]), int(fields["replica"])


class SdcGuard:
    def __init__(
        self, mesh: Mesh, shardings, *, axis: str = "data", injections: dict[int, int] | None = None
    ):
        self.mesh, self.shardings, self.axis = mesh, shardings, axis
        self.injections = dict(injections or {})
        self.snapshots = HostSnapshots(keep=2)
        self.events: list[dict] = []

    def start(self, step: int, state) -> None:
        self.snapshots.save(step, state)

    def _inject(self, state, replica: int):
        """Flips one bit of one parameter on one device of ``replica`` (failure injection)."""
        axis_index = self.mesh.axis_names.index(self.axis)
        targets = {d.id for d in np.take(self.mesh.devices, replica, axis=axis_index).flat}
        name = "w_up"
        leaf = state.params["layers"][name]
        position = next(i for i, s in enumerate(leaf.addressable_shards) if s.device.id in targets)
        params = dict(
            state.params,
            layers=dict(
                state.params["layers"],
                **{name: flip_bit(leaf, device_index=position, element=7, bit=22)},
            ),
        )
        return state._replace(params=params)

    def check(self, step: int, state, replay: Callable):
        """``state`` is the result of step ``step``; ``replay(previous_state)`` redoes it.

        Returns the state to continue from (the replayed one after a mismatch).
        """
        if step in self.injections:
            state = self._inject(state, self.injections.pop(step))
        fps = replica_fingerprints(state.params, self.mesh, self.axis)
        if disagreeing_replicas(fps):
            _, previous = self.snapshots.restore(self.shardings)
            state = replay(previous)
            clean = replica_fingerprints(state.params, self.mesh, self.axis)
            bad = [r for r in range(len(fps)) if not np.array_equal(fps[r], clean[r])]
            self.events.append({"step": step, "replicas": bad, "replayed": True})
        self.snapshots.save(step + 1, state)
        return state
