"""Lowering checks for TPU and CUDA that run on a machine without either."""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallax.kernels import lowering_platform

# The custom calls that carry a Mosaic kernel in the lowered module.
_MARKERS = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu"}


def _assert_lowers(platform: str, fn: Callable, *args, **kwargs) -> jax.export.Exported:
    # jit caches traces by function, and the platform is read while tracing: a
    # fresh wrapper makes sure `fn` is traced again for this platform.
    def fresh(*a, **k):
        return fn(*a, **k)

    with lowering_platform(platform):
        exported = jax.export.export(jax.jit(fresh), platforms=[platform])(*args, **kwargs)
    text = exported.mlir_module()
    if _MARKERS[platform] not in text:
        raise AssertionError(
            f"{getattr(fn, '__name__', fn)} lowered for {platform} without a Mosaic kernel "
            f"(no {_MARKERS[platform]!r} in the module): did it fall back to XLA?"
        )
    return exported


def assert_lowers_for_tpu(fn: Callable, *args, **kwargs) -> jax.export.Exported:
    """Exports ``jax.jit(fn)`` for TPU and checks it holds a Mosaic TPU kernel.

    Args may be arrays or ``jax.ShapeDtypeStruct``; nothing is allocated for them.
    """
    return _assert_lowers("tpu", fn, *args, **kwargs)


def assert_lowers_for_cuda(fn: Callable, *args, **kwargs) -> jax.export.Exported:
    """Exports ``jax.jit(fn)`` for CUDA and checks it holds a Mosaic GPU kernel."""
    return _assert_lowers("cuda", fn, *args, **kwargs)


def tpu_interpret_races_found() -> bool:
    """Whether the TPU interpreter's race detector (``detect_races=True``) found a race.

    Reads the interpreter's global state (a private JAX module: there is no
    public accessor in JAX 0.11). Reset it with ``pltpu.reset_tpu_interpret_mode_state()``.
    """
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    races = interpret_pallas_call.races
    return bool(races is not None and races.races_found)


def gpu_interpret_races_found() -> bool:
    """Whether the Mosaic GPU interpreter's race detector (``detect_races=True``) found a
    race in the last interpreted kernel (a private JAX module, as for the TPU one)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    races = gpu_callbacks._races
    return bool(races is not None and races.races_found)
