"""Block sizes of the decode kernels."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Attributes:
    block_kv: cache rows per grid step (contiguous cache; a multiple of 8). The
      paged kernel streams one page per step instead.
    num_splits: split-K: the cache is cut into this many ranges processed in
      parallel and combined at the end; None picks one from B * K.
    """

    block_kv: int = 512
    num_splits: int | None = None

    def __post_init__(self):
        if not isinstance(self.block_kv, int) or self.block_kv <= 0 or self.block_kv % 8:
            raise ValueError(
                f"block_sizes.block_kv must be a positive multiple of 8, got {self.block_kv!r}"
            )
        if self.num_splits is not None and (
            not isinstance(self.num_splits, int) or self.num_splits <= 0
        ):
            raise ValueError(
                f"block_sizes.num_splits must be None or a positive int, got {self.num_splits!r}"
            )


def num_splits(blocks: DecodeBlockSizes, *, batch: int, kv_heads: int, num_blocks: int) -> int:
    """Enough (batch, head, split) programs to keep both TensorCores of a megacore chip
    and the DMA engines busy when B * K is small, never more splits than blocks."""
    if blocks.num_splits is not None:
        return max(1, min(blocks.num_splits, num_blocks))
    return max(1, min(num_blocks, -(-16 // (batch * kv_heads))))
