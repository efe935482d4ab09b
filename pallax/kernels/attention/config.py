"""Block sizes of the attention implementations, and the VMEM the TPU kernels need."""

from __future__ import annotations

import dataclasses

from pallax.kernels._tpu_vmem import MiB, TpuVmem, vmem_of


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


@dataclasses.dataclass(frozen=True)
class TpuTileShapes:
    """What the TPU kernels' VMEM use depends on, besides the block sizes."""

    groups: int  # G = N / K query heads per grid step
    head_dim: int
    itemsize: int  # of q/k/v
    bias_heads: int = 0  # 0: no bias; 1: broadcast over heads; G: per head
    bias_itemsize: int = 4
    mask_heads: int = 0  # as bias_heads, for the mask (held as int32 tiles)


def _tiled(rows: int, cols: int, itemsize: int) -> int:
    """Bytes of a [rows, cols] VMEM buffer: (8 * packing, 128) tiles, padded."""
    sublanes = 8 * max(1, 4 // itemsize)
    return -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * itemsize


def tpu_vmem_bytes(blocks: AttentionBlockSizes, shapes: TpuTileShapes) -> int:
    """Estimated scoped VMEM of the largest of the forward, dq and dkv kernels.

    Pipelined operands are double-buffered; [rows, 1] f32 columns (lse, delta,
    running max and sum) are padded to 128 lanes; Mosaic's internal scratch for
    the [rows, block_kv] f32 logits and their derivatives is counted as 1.5
    tiles (calibrated against libtpu's reported allocations: 21.1 MiB forward and
    27.8 MiB dq at G = 8, 512 x 512 tiles, head_dim 128, bf16).
    """
    g, h, bq, bk = shapes.groups, shapes.head_dim, blocks.block_q, blocks.block_kv
    rows = g * bq
    q = _tiled(rows, h, shapes.itemsize)  # q, o, do, dq tiles
    kv = _tiled(bk, h, shapes.itemsize)
    col = g * _tiled(bq, 1, 4)
    logits = _tiled(rows, bk, 4)
    dense = shapes.bias_heads * _tiled(bq, bk, shapes.bias_itemsize)
    dense += shapes.mask_heads * _tiled(bq, bk, 4) + _tiled(bq, 1, 4) + _tiled(1, bk, 4)
    internal = 3 * logits // 2
    fwd = 2 * (q + 2 * kv + dense) + 2 * (q + col) + 2 * col + _tiled(rows, h, 4) + internal
    dbias = 2 * g * _tiled(bq, bk, 4) if shapes.bias_heads else 0
    bwd_in = 2 * (2 * q + 2 * kv + 2 * col + dense)
    dq = bwd_in + 2 * q + dbias + _tiled(rows, h, 4) + internal
    dkv = bwd_in + 4 * kv + 2 * _tiled(bk, h, 4) + internal
    return max(fwd, dq, dkv)


# Tiles are sized to use at most this share of the chip's default scoped VMEM
# (the estimate leaves out Mosaic's smaller internal buffers).
_TPU_BUDGET_SHARE = 0.75
# The logits tile [G * block_q, block_kv] f32 is a value, not a buffer: past
# 2 MiB the register allocator spills it (libtpu on v4: 11.7 MiB of spill slots
# at 4096 x 512).
_TPU_MAX_LOGITS = 2 * MiB


def tpu_block_sizes(
    *, q_len: int, kv_len: int, shapes: TpuTileShapes, device_kind: str | None
) -> AttentionBlockSizes:
    """The largest tiles (block_kv first, then block_q, powers of two) within the budget
    of ``device_kind``'s VMEM (:func:`pallax.kernels._tpu_vmem.vmem_of`)."""
    budget = int(vmem_of(device_kind).scoped_default * _TPU_BUDGET_SHARE)
    kv_cap = -(-kv_len // 128) * 128
    q_cap = -(-q_len // 8) * 8
    best = AttentionBlockSizes(block_q=8, block_kv=128)
    for bk in (512, 256, 128):
        for bq in (512, 256, 128, 64, 32, 16, 8):
            blocks = AttentionBlockSizes(block_q=min(bq, q_cap), block_kv=min(bk, kv_cap))
            fits = tpu_vmem_bytes(blocks, shapes) <= budget
            if fits and shapes.groups * blocks.block_q * blocks.block_kv * 4 <= _TPU_MAX_LOGITS:
                return blocks
    return best


def tpu_vmem_limit(
    blocks: AttentionBlockSizes, shapes: TpuTileShapes, device_kind: str | None
) -> int | None:
    """``vmem_limit_bytes`` for the TPU kernels with these tiles (None: the default is
    enough); ValueError when they cannot fit the chip's VMEM at all."""
    vmem: TpuVmem = vmem_of(device_kind)
    need = tpu_vmem_bytes(blocks, shapes)
    if need > vmem.capacity:
        raise ValueError(
            f"block_sizes {blocks} need about {need / MiB:.1f} MiB of VMEM per kernel with "
            f"G={shapes.groups} query heads per step and head_dim={shapes.head_dim}; "
            f"{device_kind or 'a portable TPU target'} has {vmem.capacity / MiB:.0f} MiB: "
            "use smaller blocks (or block_sizes=None)"
        )
    return vmem.limit_for(need)


def default_block_sizes(
    implementation: str,
    *,
    q_len: int,
    kv_len: int,
    shapes: TpuTileShapes | None = None,
    device_kind: str | None = None,
) -> AttentionBlockSizes:
    if implementation == "xla":
        return AttentionBlockSizes(block_q=min(512, q_len), block_kv=min(512, kv_len))
    if implementation == "pallas_mosaic_gpu":
        return AttentionBlockSizes(block_q=64, block_kv=64)  # 128 fits without bias/mask
    if shapes is None:
        raise ValueError("pallas_tpu block sizes need the tile shapes (TpuTileShapes)")
    return tpu_block_sizes(q_len=q_len, kv_len=kv_len, shapes=shapes, device_kind=device_kind)
