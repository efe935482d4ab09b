"""Logical axis names and the one table that maps them to mesh axes.

Arrays are annotated with logical names ('batch', 'embed', 'heads', ...); the
rule table decides which mesh axes shard each name. Parameter and activation
shardings both derive from it, so changing a parallelism strategy is changing
one table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical name -> mesh axes, plus the names that may fall back to replication.

    Attributes:
      table: ((logical_name, mesh_axes), ...); mesh_axes is a tuple (possibly empty).
      replicate_if_indivisible: names whose dimension is replicated, not an error,
        when the mesh axes do not divide it. The default lists 'kv_heads': with
        multi-query attention there is one KV head, which cannot be split over
        'tensor' and is small enough to replicate.
    """

    table: tuple[tuple[str, MeshAxes], ...]
    replicate_if_indivisible: frozenset[str] = frozenset({"kv_heads"})

    def __post_init__(self):
        names = [name for name, _ in self.table]
        if len(names) != len(set(names)):
            raise ValueError(f"Rules: duplicate logical names in {names}")

    def mesh_axes(self, name: str | None) -> MeshAxes:
        if name is None:
            return ()
        for logical, axes in self.table:
            if logical == name:
                return axes
        raise ValueError(f"no rule for logical axis {name!r}; known: {[n for n, _ in self.table]}")

    def replace(self, **updates: MeshAxes | str | None) -> Rules:
        """A copy with some names remapped: ``rules.replace(embed=None, mlp=('tensor',))``."""
        norm = {k: _as_axes(v) for k, v in updates.items()}
        table = tuple((name, norm.pop(name, axes)) for name, axes in self.table)
        return dataclasses.replace(self, table=table + tuple(norm.items()))


def _as_axes(value: MeshAxes | str | None) -> MeshAxes:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


DEFAULT_RULES = Rules(
    table=(
        ("batch", ("dcn_data", "data", "fsdp")),
        ("length", ("sequence",)),
        ("embed", ("fsdp",)),  # parameters' d_model axis: FSDP shards weights over it
        ("act_embed", ()),  # activations' d_model axis
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),  # replicated when indivisible (MQA: one KV head)
        ("head_dim", ()),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
        ("layers", ()),
        ("kv_length", ()),
    )
)


def logical_to_spec(
    axes: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    name: str = "array",
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have logical names ``axes``.

    With ``shape`` and ``mesh``, each sharded dimension must be divisible by the
    product of its mesh axes' sizes: otherwise a ValueError names the array,
    the dimension and the axes (or, for names in ``rules.replicate_if_indivisible``,
    the dimension is replicated). Mesh axes of size 1 are dropped from the spec.
    """
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"{name}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    used: dict[str, int] = {}
    spec = []
    for dim, logical in enumerate(axes):
        mesh_axes = rules.mesh_axes(logical)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
            missing = [a for a in rules.mesh_axes(logical) if a not in mesh.shape]
            if missing:
                raise ValueError(
                    f"{name}: rule for {logical!r} uses mesh axes {missing} that "
                    f"are not in the mesh {tuple(mesh.axis_names)}"
                )
        for a in mesh_axes:
            if a in used:
                raise ValueError(
                    f"{name}: mesh axis {a!r} would shard both dimension {used[a]} "
                    f"({axes[used[a]]!r}) and dimension {dim} ({logical!r}) of {tuple(axes)}"
                )
        if shape is not None and mesh is not None and mesh_axes:
            ways = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[dim] % ways:
                if logical in rules.replicate_if_indivisible:
                    mesh_axes = ()
                else:
                    raise ValueError(
                        f"{name}: dimension {dim} ({logical!r}) of shape {tuple(shape)} has size "
                        f"{shape[dim]}, not divisible by mesh axes {mesh_axes} of total size {ways}"
                    )
        for a in mesh_axes:
            used[a] = dim
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def shard(
    x: jax.Array,
    axes: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
) -> jax.Array:
    """Constrains ``x``'s sharding by logical names.

    Uses ``mesh`` or the mesh set with ``jax.set_mesh``; with neither (unsharded
    code) it returns ``x`` unchanged, so models run the same on one device.
    """
    mesh = mesh if mesh is not None else _context_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, rules, shape=x.shape, mesh=mesh, name=f"array {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _context_mesh() -> jax.sharding.AbstractMesh | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def named_shardings(
    tree_of_axes: Any,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    shapes: Any = None,
) -> Any:
    """Maps a pytree of logical-axis tuples to NamedShardings.

    ``shapes`` (a matching pytree of arrays or ShapeDtypeStructs) turns on the
    divisibility checks; errors name the leaf by its path.
    """
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    if shapes is None:
        return jax.tree.map(
            lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules, mesh=mesh)),
            tree_of_axes,
            is_leaf=is_axes,
        )
    paths_and_axes = jax.tree_util.tree_flatten_with_path(tree_of_axes, is_leaf=is_axes)[0]
    treedef = jax.tree.structure(tree_of_axes, is_leaf=is_axes)
    leaves = jax.tree.leaves(shapes)
    if len(leaves) != len(paths_and_axes):
        raise ValueError(
            f"named_shardings: {len(paths_and_axes)} axis annotations for {len(leaves)} arrays"
        )
    out = [
        NamedSharding(
            mesh,
            logical_to_spec(
                axes, rules, shape=leaf.shape, mesh=mesh, name=jax.tree_util.keystr(path)
            ),
        )
        for (path, axes), leaf in zip(paths_and_axes, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def assert_sufficiently_sharded(params: Any, mesh: Mesh, min_fraction: float = 0.9) -> None:
    """Asserts that the params' per-device bytes are within ``min_fraction`` of ideal.

    Ideal is the total divided by the mesh's device count. Lists the largest
    leaves that are not sharded over every mesh axis when it fails.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    total = sum(math.prod(x.shape) * x.dtype.itemsize for _, x in leaves)
    per_device = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for _, x in leaves
    )
    fraction = (total / mesh.size) / per_device if per_device else 1.0
    if fraction < min_fraction:
        worst = sorted(
            leaves,
            key=lambda kv: (
                -math.prod(kv[1].sharding.shard_shape(kv[1].shape)) * kv[1].dtype.itemsize
            ),
        )[:5]
        details = ", ".join(
            f"{jax.tree_util.keystr(p)} {x.shape} -> per device {x.sharding.shard_shape(x.shape)}"
            for p, x in worst
        )
        raise AssertionError(
            f"params are {fraction:.3f} sharded (per-device bytes {per_device} vs ideal "
            f"{total / mesh.size:.0f} on {mesh.size} devices), below {min_fraction}; "
            f"largest per-device leaves: {details}"
        )
