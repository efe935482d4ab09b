"""SDC guard for a data-parallel training loop: fingerprint, replay, name, recover.

After each step every data-parallel replica must hold bit-identical
parameters. The guard fingerprints each device's own buffers; on a mismatch
it does not commit the step: it takes the previous step's state from the
in-memory tier (its own :class:`HostSnapshots`, or the job's replicated tiers),
replays the step deterministically, names the devices whose result disagrees
with the replay (and their replicas and worker processes), and continues from
the replayed state, so the run ends bit-identical to a fault-free one. When
the replicas still disagree after the replay, the fault is not transient:
:class:`PersistentSdcError` names the workers so that the supervisor replaces
them and recovers from an intact replica.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jax.sharding import Mesh

from pallax.fault.fingerprint import disagreeing_replicas
from pallax.fault.inject import Injection
from pallax.fault.sdc import device_fingerprints, flip_bit
from pallax.fault.snapshots import HostSnapshots


class PersistentSdcError(RuntimeError):
    def __init__(self, step: int, workers: list[int], replicas: list[int]):
        super().__init__(
            f"step {step}: replicas {replicas} (workers {workers}) still disagree after a "
            "deterministic replay: a persistent fault, the workers must be replaced"
        )
        self.step, self.workers, self.replicas = step, workers, replicas


def _bad_devices(mesh: Mesh, fps: np.ndarray, reference: np.ndarray) -> list:
    """Mesh devices whose fingerprint (``[*mesh.shape, L, 2]``) differs from ``reference``."""
    mask = np.any(fps != reference, axis=(-2, -1))
    return [mesh.devices[idx] for idx in zip(*np.nonzero(mask), strict=True)]


class SdcGuard:
    """Per-step replica fingerprints; replay from the previous step on a mismatch.

    ``previous_state(step)`` returns the state before ``step`` (placed in the
    train step's shardings); by default the guard keeps its own asynchronous
    host snapshots for that. ``injections`` are ``bitflip`` injections.
    """

    def __init__(
        self,
        mesh: Mesh,
        shardings,
        *,
        axis: str = "data",
        injections: list[Injection] = (),
        previous_state: Callable[[int], object] | None = None,
    ):
        self.mesh, self.shardings, self.axis = mesh, shardings, axis
        self.injections = {i.step: i for i in injections if i.kind == "bitflip"}
        self._previous = previous_state
        self.snapshots = HostSnapshots(keep=2) if previous_state is None else None
        self.events: list[dict] = []

    def start(self, step: int, state) -> None:
        if self.snapshots is not None:
            self.snapshots.save(step, state)

    def _inject(self, state, injection: Injection):
        """Flips one bit of one parameter on one device (failure injection)."""
        if injection.worker is not None:
            targets = [d for d in self.mesh.devices.flat if d.process_index == injection.worker]
        else:
            axis_index = self.mesh.axis_names.index(self.axis)
            targets = list(np.take(self.mesh.devices, injection.replica, axis=axis_index).flat)
        if not targets:
            raise ValueError(f"--inject {injection.spec()}: no such device in the mesh")
        leaf = state.params["layers"]["w_up"]
        local = [s.device for s in leaf.addressable_shards]
        position = local.index(targets[0]) if targets[0] in local else -1
        flipped = flip_bit(leaf, device_index=position, element=7, bit=22)
        layers = dict(state.params["layers"], w_up=flipped)
        return state._replace(params=dict(state.params, layers=layers))

    def check(self, step: int, state, replay: Callable):
        """``state`` is the result of step ``step``; ``replay(previous_state)`` redoes it.

        Returns the state to continue from (the replayed one after a mismatch).
        """
        injection = self.injections.pop(step, None)
        if injection is not None:
            state = self._inject(state, injection)
        fps = device_fingerprints(state.params, self.mesh)
        axis = self.mesh.axis_names.index(self.axis)
        if disagreeing_replicas(np.moveaxis(fps, axis, 0)):
            if self._previous is not None:
                previous = self._previous(step)
            else:
                _, previous = self.snapshots.restore(self.shardings)
            state = replay(previous)
            clean = device_fingerprints(state.params, self.mesh)
            bad = _bad_devices(self.mesh, fps, clean)
            coords = {d.id: idx for idx, d in np.ndenumerate(self.mesh.devices)}
            replicas = sorted({int(coords[d.id][axis]) for d in bad})
            workers = sorted({int(d.process_index) for d in bad})
            self.events.append(
                {"step": step, "replicas": replicas, "workers": workers, "replayed": True}
            )
            still = disagreeing_replicas(np.moveaxis(clean, axis, 0))
            if still:  # two replicas give no majority: every disagreeing replica is suspect
                suspects = [d for r in still for d in np.take(self.mesh.devices, r, axis).flat]
                raise PersistentSdcError(
                    step, sorted({int(d.process_index) for d in suspects}), still
                )
        if self.snapshots is not None:
            self.snapshots.save(step + 1, state)
        return state
