"""The model's training step compiles for a TPU slice with XLA's TPU compiler
(compile-only devices), sharded data=2 x fsdp=2 x tensor=2 over a v5e-8, with XLA's
ops and with the Pallas kernels partitioned per shard inside."""

from __future__ import annotations

import pytest

from pallax.bench.compile_cases import HBM_BYTES, ModelCase
from pallax.testing import assert_compiles

pytestmark = [pytest.mark.compile, pytest.mark.timeout(600)]


def _compile(case: ModelCase):
    step, state, batch = case.build()
    return assert_compiles(
        case.chip, step, state, batch, chips=case.chips, donate_argnums=(0,), what=case.name
    )


@pytest.mark.parametrize("remat", ["none", "full"])
def test_train_step_with_pallas_kernels_compiles_for_a_v5e_8_slice(remat):
    xla = _compile(ModelCase("tiny", "v5e", 8, 512, remat, "xla"))
    pallas = _compile(ModelCase("tiny", "v5e", 8, 512, remat, "pallas_tpu"))
    for result in (xla, pallas):
        assert 0 < result.total_bytes < HBM_BYTES["v5e"]
        assert result.alias_bytes > 0  # the state is donated: updated in place
    assert pallas.total_bytes <= 1.1 * xla.total_bytes, (pallas.summary(), xla.summary())
