"""Block sizes of linear_cross_entropy: tokens per block and vocabulary columns per block."""

from __future__ import annotations

import dataclasses
import pathlib

from pallax.kernels import _tuning
from pallax.kernels._tpu_vmem import vmem_of


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyBlockSizes:
    """Attributes:
    block_tokens: rows of hidden per block (Pallas TPU: a multiple of 8; the XLA
      path ignores it: it processes all tokens of a vocabulary chunk at once).
    block_vocab: vocabulary columns per block (Pallas TPU: a multiple of 128,
      the lane width; XLA: the chunk its scan walks, any positive size).
    """

    block_tokens: int = 256
    block_vocab: int = 2048

    def __post_init__(self):
        for name in ("block_tokens", "block_vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"block_sizes.{name} must be a positive int, got {value!r}")

    def check(self, implementation: str) -> None:
        if implementation == "pallas_tpu":
            if self.block_tokens % 8:
                raise ValueError(
                    f"block_sizes.block_tokens={self.block_tokens} must be a multiple of 8 "
                    "for 'pallas_tpu'"
                )
            if self.block_vocab % 128:
                raise ValueError(
                    f"block_sizes.block_vocab={self.block_vocab} must be a multiple of 128 "
                    "for 'pallas_tpu'"
                )


def default_block_sizes(
    implementation: str, *, tokens: int, dim: int, vocab: int, device_kind: str | None
) -> LinearCrossEntropyBlockSizes:
    tuned = _tuning.lookup(pathlib.Path(__file__).parent, implementation, device_kind)
    if tuned:
        return LinearCrossEntropyBlockSizes(**tuned)
    if implementation == "xla":
        # A few [T, chunk] f32 temporaries live per step: 1024 columns keeps 8k
        # tokens at 32 MiB each.
        return LinearCrossEntropyBlockSizes(block_tokens=256, block_vocab=min(1024, vocab))
    return _tpu_block_sizes(tokens, dim, vocab, device_kind)


def tpu_vmem_bytes(blocks: LinearCrossEntropyBlockSizes, dim: int, itemsize: int = 2) -> int:
    """Estimated scoped VMEM of the largest TPU kernel (d_weight): double-buffered
    [bt, D] hidden, [D, bv] weight and d_weight tiles, the [D, bv] f32 accumulator,
    four [bt, 1] f32 columns padded to 128 lanes, and ~2 [bt, bv] f32 logit tiles.
    libtpu reported 16.27 MiB at D = 2048, 256 x 512 bf16 (this gives 16.5)."""
    bt, bv = blocks.block_tokens, blocks.block_vocab
    tiles = 2 * bt * dim * itemsize + 4 * dim * bv * itemsize + dim * bv * 4
    return tiles + 8 * bt * 128 * 4 + 2 * bt * bv * 4


def _tpu_block_sizes(tokens: int, dim: int, vocab: int, device_kind: str | None):
    """The largest tiles (block_vocab first) within 75% of the chip's default scoped VMEM."""
    budget = int(0.75 * vmem_of(device_kind).scoped_default)
    for bv in (1024, 512, 256, 128):
        for bt in (512, 256, 128, 64, 32, 16, 8):
            blocks = LinearCrossEntropyBlockSizes(
                block_tokens=min(bt, -(-tokens // 8) * 8),
                block_vocab=min(bv, -(-vocab // 128) * 128),
            )
            if tpu_vmem_bytes(blocks, dim) <= budget and bt >= min(128, tokens):
                return blocks
    return LinearCrossEntropyBlockSizes(block_tokens=8, block_vocab=128)
