"""Block sizes of the RMSNorm kernels: a frozen, self-validating dataclass,
tuned values looked up by device kind, and a heuristic fallback."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from pallax.kernels import _tuning

# One warpgroup (128 threads) owns 64 rows in the WGMMA register layout that the
# Mosaic GPU kernel uses for its row reductions.
GPU_BLOCK_ROWS = 64
# Per-block budget of the TPU kernel's input tile. The kernel holds the input
# and output tiles double-buffered plus f32 temporaries, so 1 MiB of input keeps
# the working set well inside the 16 MiB default scoped VMEM of v4/v5e/v5p/v6e.
_TPU_INPUT_TILE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class RmsNormBlockSizes:
    """Tile shape of one grid step.

    Attributes:
      block_rows: rows per grid step (a multiple of 8, the TPU sublane count;
        exactly 64 for the Mosaic GPU kernel).
      block_cols: columns per step of the Mosaic GPU kernel's loop over the
        feature axis (a multiple of 64 that divides it); None picks one. TPU
        tiles always span the whole feature axis, so it must be None there.
    """

    block_rows: int
    block_cols: int | None = None

    def __post_init__(self):
        if not isinstance(self.block_rows, int) or self.block_rows <= 0 or self.block_rows % 8:
            raise ValueError(
                f"block_sizes.block_rows must be a positive multiple of 8, got {self.block_rows!r}"
            )
        if self.block_cols is not None and (
            not isinstance(self.block_cols, int) or self.block_cols <= 0 or self.block_cols % 64
        ):
            raise ValueError(
                f"block_sizes.block_cols must be None or a positive multiple of 64, "
                f"got {self.block_cols!r}"
            )

    def check(self, implementation: str, *, dim: int) -> None:
        """Raises ValueError when these blocks cannot tile a [rows, dim] input."""
        if implementation == "pallas_tpu" and self.block_cols is not None:
            raise ValueError(
                f"block_sizes.block_cols={self.block_cols} is not used by 'pallas_tpu' "
                "(its tiles span the whole feature axis); leave it None"
            )
        if implementation == "pallas_mosaic_gpu":
            if self.block_rows != GPU_BLOCK_ROWS:
                raise ValueError(
                    f"block_sizes.block_rows must be {GPU_BLOCK_ROWS} for 'pallas_mosaic_gpu' "
                    f"(one warpgroup), got {self.block_rows}"
                )
            if self.block_cols is not None and dim % self.block_cols:
                raise ValueError(
                    f"block_sizes.block_cols={self.block_cols} must divide the feature axis "
                    f"x.shape[-1]={dim}"
                )


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def resolve_block_sizes(
    implementation: str,
    given: RmsNormBlockSizes | None,
    *,
    rows: int,
    dim: int,
    dtype,
    device_kind: str | None,
) -> RmsNormBlockSizes:
    """The user's block sizes with unset fields filled in, checked against the input."""
    if given is None:
        given = default_block_sizes(
            implementation, rows=rows, dim=dim, dtype=dtype, device_kind=device_kind
        )
    elif implementation == "pallas_mosaic_gpu" and given.block_cols is None:
        default = default_block_sizes(
            implementation, rows=rows, dim=dim, dtype=dtype, device_kind=device_kind
        )
        given = dataclasses.replace(given, block_cols=default.block_cols)
    given.check(implementation, dim=dim)
    return given


def default_block_sizes(
    implementation: str, *, rows: int, dim: int, dtype, device_kind: str | None
) -> RmsNormBlockSizes:
    """Tuned block sizes for ``device_kind`` if stored, else a heuristic."""
    tuned = _tuning.lookup(pathlib.Path(__file__).parent, implementation, device_kind)
    if implementation == "pallas_mosaic_gpu":
        # Widest chunk whose [64, cols] tile stays at <= 32 KiB of SMEM, leaving
        # room for several CTAs per SM.
        itemsize = np.dtype(dtype).itemsize
        widths = [c for c in (512, 256, 128, 64) if dim % c == 0 and 64 * c * itemsize <= 32768]
        cols = tuned.get("block_cols") or (widths[0] if widths else 64)
        if dim % cols:
            cols = widths[0] if widths else 64
        return RmsNormBlockSizes(block_rows=GPU_BLOCK_ROWS, block_cols=cols)
    if "block_rows" in tuned:
        return RmsNormBlockSizes(block_rows=min(tuned["block_rows"], _round_up(rows, 8)))
    itemsize = np.dtype(dtype).itemsize
    # Packed dtypes fill a (16, 128) bf16 / (32, 128) int8 vreg: keep whole vregs.
    min_rows = 8 * max(1, 4 // itemsize)
    block_rows = _pow2_floor(_TPU_INPUT_TILE_BYTES // (dim * itemsize))
    block_rows = max(min_rows, min(block_rows, 1024, _round_up(rows, min_rows)))
    return RmsNormBlockSizes(block_rows=_round_up(block_rows, 8))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
