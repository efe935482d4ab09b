"""The Mosaic TPU kernels compile with libtpu for v4, v5e, v5p and v6e at production
shapes, forward and gradient (compile-only devices; nothing runs). A failure is the
compiler's own message, naming the case, the chip and the shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallax.bench.compile_cases import TPU_CASES
from pallax.collectives import collective_matmul
from pallax.testing import TPU_CHIPS, assert_compiles, target_mesh

pytestmark = [pytest.mark.compile, pytest.mark.timeout(600)]


@pytest.mark.parametrize("chip", list(TPU_CHIPS))
@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.name)
def test_compiles_for_tpu(case, chip):
    fn, args = case.build("pallas_tpu")
    result = assert_compiles(chip, fn, *args, what=f"{case.name} [pallas_tpu]")
    assert result.total_bytes is not None and result.total_bytes > 0


@pytest.mark.parametrize("chip", list(TPU_CHIPS))
def test_collective_matmul_kernel_compiles_on_a_slice(chip):
    """The remote-DMA ring kernel over the 4 chips of a slice (all-gather of x's rows
    behind the matmuls), forward and gradient. The kernel keeps its operands whole in
    VMEM, so it takes ~12 MiB of them (larger ones are declined with a clear error and
    None uses the XLA ring): 2048 x 1024 @ 1024 x 2048 bf16."""
    mesh = target_mesh(chip, {"tensor": 4})
    x = jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("tensor")))
    w = jax.ShapeDtypeStruct(
        (1024, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "tensor"))
    )

    def f(x, w):
        y = lambda x, w: collective_matmul(
            x, w, mesh=mesh, axis="tensor", implementation="pallas_tpu"
        )
        return jax.value_and_grad(lambda x, w: y(x, w).astype(jnp.float32).sum(), (0, 1))(x, w)

    assert_compiles(chip, f, x, w, what="collective_matmul all_gather [pallas_tpu] on 4 chips")
