"""Block sizes of the gated-MLP kernels."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from pallax.kernels import _tuning

# Working-set budget of one grid step (inputs double-buffered + f32 accumulators),
# under the 16 MiB default scoped VMEM of TPU v4/v5e/v5p/v6e.
_VMEM_BUDGET = 12 << 20


@dataclasses.dataclass(frozen=True)
class GatedMlpBlockSizes:
    """Attributes:
    block_rows: tokens per block (a multiple of 8).
    block_ff: hidden (F) columns per block (a multiple of 128, the lane width).
    """

    block_rows: int = 256
    block_ff: int = 256

    def __post_init__(self):
        if not isinstance(self.block_rows, int) or self.block_rows <= 0 or self.block_rows % 8:
            raise ValueError(
                f"block_sizes.block_rows must be a positive multiple of 8, got {self.block_rows!r}"
            )
        if not isinstance(self.block_ff, int) or self.block_ff <= 0 or self.block_ff % 128:
            raise ValueError(
                f"block_sizes.block_ff must be a positive multiple of 128, got {self.block_ff!r}"
            )


def working_set_bytes(blocks: GatedMlpBlockSizes, dim: int, itemsize: int) -> int:
    bm, bf = blocks.block_rows, blocks.block_ff
    tiles = (2 * bm * dim + 3 * dim * bf) * itemsize  # x, dy|y; w_gate, w_up, w_down
    accumulators = max(bm * dim, 3 * dim * bf) * 4  # dx | (dw_gate, dw_up, dw_down)
    return 2 * tiles + accumulators + 4 * bm * bf * 4  # + f32 temporaries of a tile


def default_block_sizes(
    *, rows: int, dim: int, ff: int, dtype, device_kind: str | None
) -> GatedMlpBlockSizes:
    tuned = _tuning.lookup(pathlib.Path(__file__).parent, "pallas_tpu", device_kind)
    if tuned:
        return GatedMlpBlockSizes(**tuned)
    itemsize = np.dtype(dtype).itemsize
    max_rows = max(8, -(-rows // 8) * 8)
    max_ff = max(128, -(-ff // 128) * 128)
    for bf in (512, 256, 128):
        for bm in (512, 256, 128, 64, 32, 16, 8):
            blocks = GatedMlpBlockSizes(min(bm, max_rows), min(bf, max_ff))
            if working_set_bytes(blocks, dim, itemsize) <= _VMEM_BUDGET:
                return blocks
    return GatedMlpBlockSizes(8, 128)
