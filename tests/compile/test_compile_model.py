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


def test_generate_with_pallas_kernels_compiles_for_a_v5e_8_slice():
    """Prefill (attention) and the decode loop (decode_attention) per shard of the batch
    and heads, params sharded by the rule table."""
    import jax
    import jax.numpy as jnp

    from pallax.model import PRESETS
    from pallax.model.generate import generate
    from pallax.model.params import init_params, param_axes
    from pallax.sharding import MeshConfig, make_mesh, named_shardings
    from pallax.testing import compile_only_devices

    config = PRESETS["tiny"].replace(implementation="pallas_tpu", n_heads=8, dtype="bfloat16")
    mesh = make_mesh(
        MeshConfig(data=2, fsdp=2, tensor=2), list(compile_only_devices("v5e", chips=8))
    )
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    shardings = named_shardings(param_axes(config), mesh, shapes=shapes)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    prompts = jax.ShapeDtypeStruct(
        (8, 32),
        jnp.int32,
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))),
    )
    fn = lambda params, prompts: generate(params, config, prompts, 16, mesh=mesh)
    assert_compiles("v5e", fn, params, prompts, chips=8, what="generate tiny [pallas_tpu] on v5e-8")
