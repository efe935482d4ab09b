"""Device meshes for data, FSDP, tensor and sequence parallelism."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Outermost to innermost: the axes that communicate most (tensor) are last, so
# they map to neighbouring devices (the fastest links of a torus or an NVLink island).
MESH_AXES = ("dcn_data", "data", "fsdp", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; at most one may be -1 (filled from the device count).

    ``dcn_data`` is data parallelism across slices or hosts connected by the data
    centre network; the others live within a slice (ICI / NVLink).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    dcn_data: int = 1

    def __post_init__(self):
        sizes = self._sizes()
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or (v < 1 and v != -1)}
        if bad:
            raise ValueError(f"MeshConfig: axis sizes must be positive ints or -1, got {bad}")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {sizes}")

    def _sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes for ``num_devices``, the -1 axis filled in."""
        sizes = self._sizes()
        known = math.prod(v for v in sizes.values() if v != -1)
        if -1 in sizes.values():
            if num_devices % known:
                raise ValueError(
                    f"MeshConfig: the fixed axes {sizes} multiply to {known}, which does not "
                    f"divide the {num_devices} devices"
                )
            sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(
                f"MeshConfig: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                f"but there are {num_devices} devices"
            )
        return sizes

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """'data=2,fsdp=2,tensor=2' -> MeshConfig (unnamed axes keep their defaults)."""
        fields = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name not in MESH_AXES:
                raise ValueError(
                    f"MeshConfig.parse: expected AXIS=SIZE with AXIS in {MESH_AXES}, got {item!r}"
                )
            fields[name] = int(value)
        if -1 in fields.values():
            fields.setdefault("fsdp", 1)  # the named -1 axis takes the rest, not fsdp's default
        return cls(**fields)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ``MESH_AXES`` sized by ``config``.

    Axis types are ``Auto``: pallax annotates arrays with sharding constraints
    and lets GSPMD propagate the rest (JAX 0.11's ``jax.make_mesh`` default is
    Explicit, where every op's output sharding is part of its type; pallax's
    kernels and collectives are written against GSPMD + shard_map instead).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.axis_sizes(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    if sizes["dcn_data"] > 1 and hasattr(devices[0], "slice_index"):
        from jax.experimental import mesh_utils

        ici = tuple(1 if name == "dcn_data" else sizes[name] for name in MESH_AXES)
        dcn = tuple(sizes["dcn_data"] if name == "dcn_data" else 1 for name in MESH_AXES)
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
