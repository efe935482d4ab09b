"""RmsNormBlockSizes: validation, heuristic and tuned lookup."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallax.kernels import _tuning
from pallax.kernels.rms_norm import config
from pallax.kernels.rms_norm.config import RmsNormBlockSizes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_rows=0), "block_rows must be a positive multiple of 8"),
        (dict(block_rows=12), "block_rows must be a positive multiple of 8, got 12"),
        (dict(block_rows=8.0), "block_rows"),
        (
            dict(block_rows=8, block_cols=100),
            "block_cols must be None or a positive multiple of 64",
        ),
    ],
)
def test_invalid_block_sizes_are_rejected_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RmsNormBlockSizes(**kwargs)


def test_block_sizes_are_frozen_and_hashable():
    blocks = RmsNormBlockSizes(16)
    with pytest.raises(AttributeError):
        blocks.block_rows = 32
    assert hash(blocks) == hash(RmsNormBlockSizes(16))


@given(
    rows=st.integers(1, 1 << 20),
    dim=st.integers(1, 65536),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_tpu_heuristic_is_valid_and_bounded(rows, dim, dtype):
    blocks = config.default_block_sizes(
        "pallas_tpu", rows=rows, dim=dim, dtype=dtype, device_kind=None
    )
    blocks.check("pallas_tpu", dim=dim)
    assert blocks.block_rows <= max(1024, 16)
    assert blocks.block_rows <= max(config._round_up(rows, 16), 16)
    # The input tile stays within budget unless the minimum tile already exceeds it.
    itemsize = jnp.dtype(dtype).itemsize
    assert blocks.block_rows * dim * itemsize <= max(config._TPU_INPUT_TILE_BYTES, 16 * dim * 4)


@given(
    dim=st.sampled_from([64, 128, 192, 320, 4096, 12288]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_gpu_heuristic_divides_the_feature_axis(dim, dtype):
    blocks = config.default_block_sizes(
        "pallas_mosaic_gpu", rows=1000, dim=dim, dtype=dtype, device_kind=None
    )
    blocks.check("pallas_mosaic_gpu", dim=dim)
    assert 64 * blocks.block_cols * jnp.dtype(dtype).itemsize <= 32768


def test_tuned_values_are_looked_up_by_longest_device_kind_prefix(tmp_path):
    table = {"pallas_tpu": {"TPU v5": {"block_rows": 64}, "TPU v5 lite": {"block_rows": 512}}}
    (tmp_path / "tuned_block_sizes.json").write_text(json.dumps(table))
    assert _tuning.lookup(tmp_path, "pallas_tpu", "TPU v5 lite") == {"block_rows": 512}
    assert _tuning.lookup(tmp_path, "pallas_tpu", "TPU v5p") == {"block_rows": 64}
    assert _tuning.lookup(tmp_path, "pallas_tpu", "TPU v4") == {}
    assert _tuning.lookup(tmp_path, "pallas_tpu", None) == {}
    assert _tuning.lookup(tmp_path, "pallas_mosaic_gpu", "TPU v5") == {}


def test_shipped_tuned_table_is_well_formed():
    import pathlib

    path = pathlib.Path(config.__file__).parent / "tuned_block_sizes.json"
    table = json.loads(path.read_text())
    for implementation, by_device in table.items():
        assert implementation in ("pallas_tpu", "pallas_mosaic_gpu")
        for fields in by_device.values():
            RmsNormBlockSizes(**{"block_rows": 64, **fields})
