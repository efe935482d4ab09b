"""Helpers for testing code built on pallax (and pallax itself).

* :func:`tolerance` / :func:`assert_allclose`: tolerances by dtype and reduction length.
* :func:`assert_lowers_for_tpu` / :func:`assert_lowers_for_cuda`: check that a
  function's Pallas kernels lower for the hardware, on any machine.
* :func:`compile_for` / :func:`assert_compiles`: compile with the real TPU (libtpu) and
  Hopper (Mosaic GPU + ptxas) compilers against compile-only devices, on a CPU host;
  :func:`target_mesh` builds a mesh of a compile-only TPU slice.
* :func:`run_with_cpu_devices`: run a snippet in a fresh process with N simulated CPU devices.
* :func:`run_processes`: run a snippet in N local ``jax.distributed`` processes (gloo).
"""

from pallax.testing._compile import (
    GPU_TARGETS,
    TARGETS,
    TPU_CHIPS,
    CompileResult,
    KernelResources,
    assert_compiles,
    compile_for,
    compile_only_devices,
    target_mesh,
)
from pallax.testing._devices import run_processes, run_with_cpu_devices
from pallax.testing._lowering import (
    assert_lowers_for_cuda,
    assert_lowers_for_tpu,
    gpu_interpret_races_found,
    tpu_interpret_races_found,
)
from pallax.testing._tolerance import assert_allclose, tolerance

__all__ = [
    "GPU_TARGETS",
    "TARGETS",
    "TPU_CHIPS",
    "CompileResult",
    "KernelResources",
    "assert_allclose",
    "assert_compiles",
    "assert_lowers_for_cuda",
    "assert_lowers_for_tpu",
    "compile_for",
    "compile_only_devices",
    "gpu_interpret_races_found",
    "run_processes",
    "run_with_cpu_devices",
    "target_mesh",
    "tolerance",
    "tpu_interpret_races_found",
]
