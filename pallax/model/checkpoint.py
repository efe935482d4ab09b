"""Persistent checkpoints of the training state and the data position, with Orbax.

The state is saved sharded (each process writes its shards) and restored
directly into the shardings the train step expects.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from pallax.model.train import TrainState


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
        self._manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
        )

    def restore(self, step: int, shardings: TrainState, like: TrainState):
        """(state in ``shardings``, data state) saved at ``step``; ``like`` gives shapes."""
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return TrainState(*restored.state), dict(restored.data)

    def wait(self) -> None:
        self._manager.wait_until_finished()
