"""Block sizes of the attention implementations."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
    """Attributes:
      block_q: query rows per tile.
      block_kv: key/value rows per tile.
    Pallas TPU needs multiples of 8 (block_q) and 128 (block_kv, the lane axis of
    the logits tile); Mosaic GPU needs block_q = 64 (one warpgroup's rows of
    packed query heads) and block_kv 64 or 128; the XLA path takes any positive size.
    """

    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"block_sizes.{name} must be a positive int, got {value!r}")

    def check(self, implementation: str) -> None:
        if implementation == "pallas_tpu" and (self.block_q % 8 or self.block_kv % 128):
            raise ValueError(
                f"block_sizes {self} do not fit 'pallas_tpu': block_q must be a multiple of 8 "
                "and block_kv a multiple of 128"
            )
        if implementation == "pallas_mosaic_gpu" and (
            self.block_q != 64 or self.block_kv not in (64, 128)
        ):
            raise ValueError(
                f"block_sizes {self} do not fit 'pallas_mosaic_gpu': block_q must be 64 "
                "and block_kv 64 or 128"
            )


def default_block_sizes(implementation: str, *, q_len: int, kv_len: int) -> AttentionBlockSizes:
    if implementation == "xla":
        return AttentionBlockSizes(block_q=min(512, q_len), block_kv=min(512, kv_len))
    if implementation == "pallas_mosaic_gpu":
        return AttentionBlockSizes(block_q=64, block_kv=64)  # 128 fits without bias/mask
    # 512 x 512 tiles: the [G*512, 512] f32 logits of a group of G <= 8 heads plus
    # double-buffered q/k/v/o tiles stay within a 16-32 MiB scoped VMEM budget.
    return AttentionBlockSizes(
        block_q=min(512, -(-q_len // 8) * 8), block_kv=min(512, -(-kv_len // 128) * 128)
    )
