"""Block sizes of linear_cross_entropy: tokens per block and vocabulary columns per block."""

from __future__ import annotations

import dataclasses
import pathlib

from pallax.kernels import _tuning


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
    # TPU: the [block_tokens, D] accumulator (f32) and [D, block_vocab] weight tile
    # (double-buffered) stay within ~8 MiB of VMEM for D <= 4096.
    block_vocab = 512 if dim <= 2048 else 256
    block_tokens = 256 if dim <= 2048 else 128
    return LinearCrossEntropyBlockSizes(
        block_tokens=min(block_tokens, -(-tokens // 8) * 8),
        block_vocab=min(block_vocab, -(-vocab // 128) * 128),
    )
