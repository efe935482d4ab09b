"""Helpers for testing code built on pallax (and pallax itself).

* :func:`tolerance` / :func:`assert_allclose`: tolerances by dtype and reduction length.
* :func:`assert_lowers_for_tpu` / :func:`assert_lowers_for_cuda`: check that a
  function's Pallas kernels lower for the hardware, on any machine.
* :func:`run_with_cpu_devices`: run a snippet in a fresh process with N simulated CPU devices.
* :func:`run_processes`: run a snippet in N local ``jax.distributed`` processes (gloo).
"""

from pallax.testing._devices import run_processes, run_with_cpu_devices
from pallax.testing._lowering import (
    assert_lowers_for_cuda,
    assert_lowers_for_tpu,
    gpu_interpret_races_found,
    tpu_interpret_races_found,
)
from pallax.testing._tolerance import assert_allclose, tolerance

__all__ = [
    "assert_allclose",
    "assert_lowers_for_cuda",
    "assert_lowers_for_tpu",
    "gpu_interpret_races_found",
    "run_processes",
    "run_with_cpu_devices",
    "tolerance",
    "tpu_interpret_races_found",
]
