"""The context a model function is traced in when its params live on a mesh."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

from pallax.kernels import kernel_layout
from pallax.sharding import DEFAULT_RULES


@contextlib.contextmanager
def traced_on(mesh: jax.sharding.Mesh | None) -> Iterator[None]:
    """Inside ``jax.jit``: the model's sharding constraints (``pallax.sharding.shard``)
    use ``mesh``, and the Pallas kernels run per shard laid out by the rule table
    (``pallax.kernels.kernel_layout``). Without a mesh: nothing changes."""
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), kernel_layout(DEFAULT_RULES.mesh_axes):
        yield
