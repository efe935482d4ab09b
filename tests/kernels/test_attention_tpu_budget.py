"""Block sizes of the TPU attention kernels from each chip's VMEM budget (the
compile suite checks them against libtpu; these check the arithmetic)."""

from __future__ import annotations

import pytest

from pallax.kernels import AttentionBlockSizes, _dispatch, lowering_platform
from pallax.kernels._tpu_vmem import PORTABLE, MiB, vmem_of
from pallax.kernels.attention.config import (
    TpuTileShapes,
    tpu_block_sizes,
    tpu_vmem_bytes,
    tpu_vmem_limit,
)

KINDS = ["TPU v4", "TPU v5 lite", "TPU v5", "TPU v5p", "TPU v6 lite", None]


@pytest.mark.parametrize(
    ("kind", "capacity", "scoped"),
    [
        ("TPU v4", 16, 16),
        ("TPU v5 lite", 128, 16),
        ("TPU v5e", 128, 16),
        ("TPU v5", 64, 16),
        ("TPU v5p", 64, 16),
        ("TPU v6 lite", 128, 32),
        ("TPU v6e", 128, 32),
        ("TPU7x", 16, 16),  # unknown: the portable budget
        (None, 16, 16),
    ],
)
def test_vmem_by_device_kind(kind, capacity, scoped):
    vmem = vmem_of(kind)
    assert (vmem.capacity, vmem.scoped_default) == (capacity * MiB, scoped * MiB)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dense", [0, 1, 2])  # none, shared bias + mask, per-head bias + mask
def test_default_blocks_fit_the_budget(kind, groups, head_dim, dense):
    heads = {0: 0, 1: 1, 2: groups}[dense]
    shapes = TpuTileShapes(groups, head_dim, 2, bias_heads=heads, mask_heads=heads)
    blocks = tpu_block_sizes(q_len=32768, kv_len=32768, shapes=shapes, device_kind=kind)
    assert blocks.block_q % 8 == 0 and blocks.block_kv % 128 == 0
    assert tpu_vmem_bytes(blocks, shapes) <= 0.75 * vmem_of(kind).scoped_default
    assert groups * blocks.block_q * blocks.block_kv * 4 <= 2 * MiB  # the logits value
    assert tpu_vmem_limit(blocks, shapes, kind) is None  # the default limit is enough


def test_short_sequences_shrink_the_blocks():
    shapes = TpuTileShapes(1, 128, 2)
    blocks = tpu_block_sizes(q_len=5, kv_len=200, shapes=shapes, device_kind="TPU v5 lite")
    assert blocks == AttentionBlockSizes(block_q=8, block_kv=256)


def test_issue_shape_used_to_overflow():
    """G = 8 with 512 x 512 tiles: 4096 query rows per step, the estimate is over 16 MiB
    (libtpu: 21.1 MiB forward, 27.8 MiB dq); the default picks 128 x 512."""
    shapes = TpuTileShapes(8, 128, 2)
    assert tpu_vmem_bytes(AttentionBlockSizes(512, 512), shapes) > 27 * MiB
    default = tpu_block_sizes(q_len=2048, kv_len=2048, shapes=shapes, device_kind="TPU v5 lite")
    assert default == AttentionBlockSizes(block_q=128, block_kv=512)


def test_explicit_large_blocks_raise_the_limit_or_fail_clearly():
    shapes, big = TpuTileShapes(8, 128, 2), AttentionBlockSizes(512, 512)
    limit = tpu_vmem_limit(big, shapes, "TPU v5 lite")
    assert 16 * MiB < limit <= 0.9 * 128 * MiB
    with pytest.raises(ValueError, match=r"TPU v4 has 16 MiB.*block_sizes=None"):
        tpu_vmem_limit(big, shapes, "TPU v4")
    with pytest.raises(ValueError, match="portable TPU target"):
        tpu_vmem_limit(big, shapes, None)
    assert PORTABLE.limit_for(PORTABLE.scoped_default) is None


def test_lowering_platform_carries_the_device_kind():
    assert _dispatch.device_kind() == "cpu"
    with lowering_platform("tpu", device_kind="TPU v5 lite"):
        assert _dispatch.device_kind() == "TPU v5 lite"
    with lowering_platform("tpu"):
        assert _dispatch.device_kind() is None
    with pytest.raises(TypeError, match="device_kind"), lowering_platform("tpu", device_kind=5):
        pass
