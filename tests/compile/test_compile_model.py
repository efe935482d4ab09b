"""The model's training step compiles for a TPU slice with XLA's TPU compiler
(compile-only devices), sharded data=2 x fsdp=2 x tensor=2 over a v5e-8."""

from __future__ import annotations

import pytest

from pallax.bench.compile_cases import HBM_BYTES, ModelCase
from pallax.testing import assert_compiles

pytestmark = [pytest.mark.compile, pytest.mark.timeout(600)]


@pytest.mark.parametrize("remat", ["none", "full"])
def test_train_step_compiles_for_a_v5e_8_slice(remat):
    case = ModelCase("tiny", "v5e", 8, 512, remat, "xla")
    step, state, batch = case.build()
    result = assert_compiles(
        "v5e", step, state, batch, chips=8, donate_argnums=(0,), what=case.name
    )
    assert 0 < result.total_bytes < HBM_BYTES["v5e"]
    assert result.alias_bytes > 0  # the state is donated: updated in place
