"""VMEM per TPU generation: what a Mosaic kernel's tiles must fit in.

Mosaic gives each kernel a *scoped* VMEM limit (16 MiB by default on v4, v5e
and v5p; 32 MiB on v6e) out of the TensorCore's physical VMEM (16 MiB on v4,
128 MiB on v5e and v6e, 64 MiB on v5p; JAX's ``tpu_info`` and the chips' docs).
A kernel may raise its limit up to the physical size with
``CompilerParams(vmem_limit_bytes=...)``. Block-size heuristics size tiles
against :func:`vmem_of` and ask for a larger limit only when they need it.
"""

from __future__ import annotations

import dataclasses

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class TpuVmem:
    """VMEM of one TensorCore, in bytes."""

    capacity: int
    scoped_default: int

    def limit_for(self, need: int) -> int | None:
        """The ``vmem_limit_bytes`` a kernel that needs ``need`` bytes should ask for:
        None (the default is enough), else ``need`` plus 25% headroom, capped at 90%
        of the capacity."""
        if need <= self.scoped_default:
            return None
        return min(int(need * 1.25), int(self.capacity * 0.9))


# Device-kind prefixes as jax.Device.device_kind spells them (compile-only devices
# of libtpu 0.0.48 report "TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite").
_BY_KIND = {
    "TPU v4": TpuVmem(capacity=16 * MiB, scoped_default=16 * MiB),
    "TPU v5 lite": TpuVmem(capacity=128 * MiB, scoped_default=16 * MiB),
    "TPU v5e": TpuVmem(capacity=128 * MiB, scoped_default=16 * MiB),
    "TPU v5": TpuVmem(capacity=64 * MiB, scoped_default=16 * MiB),  # v5p
    "TPU v6": TpuVmem(capacity=128 * MiB, scoped_default=32 * MiB),  # v6e, "TPU v6 lite"
}
# Unknown chip (or lowering without a device kind): what every supported chip has.
PORTABLE = TpuVmem(capacity=16 * MiB, scoped_default=16 * MiB)


def vmem_of(device_kind: str | None) -> TpuVmem:
    """VMEM of ``device_kind`` (longest matching prefix); :data:`PORTABLE` when unknown."""
    if not device_kind:
        return PORTABLE
    matches = [key for key in _BY_KIND if device_kind.startswith(key)]
    return _BY_KIND[max(matches, key=len)] if matches else PORTABLE
