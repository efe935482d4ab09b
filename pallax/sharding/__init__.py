"""Meshes and logical-axis rules for data / FSDP / tensor / sequence parallelism."""

from pallax.sharding.mesh import MESH_AXES, MeshConfig, make_mesh
from pallax.sharding.rules import (
    DEFAULT_RULES,
    Rules,
    assert_sufficiently_sharded,
    logical_to_spec,
    named_shardings,
    shard,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "Rules",
    "assert_sufficiently_sharded",
    "logical_to_spec",
    "make_mesh",
    "named_shardings",
    "shard",
]
