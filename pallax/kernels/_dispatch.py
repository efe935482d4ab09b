"""Choosing an implementation for a kernel call, and Pallas interpret mode.

Every op takes ``implementation=None | 'xla' | 'pallas_tpu' | 'pallas_mosaic_gpu'``.
``resolve`` turns that request into a :class:`KernelMode` before anything is
traced, so a request that cannot run here fails with a clear ``ValueError``
instead of an error from deep inside a lowering.

Two context managers change what "here" means:

* :func:`interpret_mode` (or ``PALLAX_INTERPRET=1``) runs Pallas kernels in the
  Pallas interpreter, so TPU and Mosaic GPU kernels execute on a CPU.
* :func:`lowering_platform` says the caller is lowering for another platform
  (``jax.export`` with ``platforms=['tpu']``); kernels are then emitted for that
  hardware even though the process runs on a CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Literal

import jax

Implementation = Literal["xla", "pallas_tpu", "pallas_mosaic_gpu"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "pallas_tpu", "pallas_mosaic_gpu")
# The platform each Pallas backend compiles for.
_NATIVE_PLATFORM = {"pallas_tpu": "tpu", "pallas_mosaic_gpu": "gpu"}


@dataclasses.dataclass(frozen=True)
class InterpretConfig:
    """Options of the Pallas interpreters (a subset both of them accept)."""

    detect_races: bool = False


@dataclasses.dataclass(frozen=True)
class KernelMode:
    """The resolved choice: which implementation, and whether it is interpreted."""

    implementation: str
    interpret: InterpretConfig | None = None


_interpret_ctx: contextvars.ContextVar[InterpretConfig | None] = contextvars.ContextVar(
    "pallax_interpret", default=None
)
_platform_ctx: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pallax_lowering_platform", default=None
)
_kind_ctx: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pallax_lowering_device_kind", default=None
)


@contextlib.contextmanager
def interpret_mode(*, detect_races: bool = False) -> Iterator[InterpretConfig]:
    """Runs Pallas kernels requested inside the block in the Pallas interpreter.

    TPU kernels use ``pltpu.InterpretParams`` (which simulates DMAs and
    semaphores, and with ``detect_races=True`` reports data races); Mosaic GPU
    kernels use ``plgpu.InterpretGPUParams``. The choice is made when a call is
    traced: a function jitted inside the block keeps it.
    """
    config = InterpretConfig(detect_races=detect_races)
    token = _interpret_ctx.set(config)
    try:
        yield config
    finally:
        _interpret_ctx.reset(token)


@contextlib.contextmanager
def lowering_platform(
    platform: Literal["tpu", "cuda"], *, device_kind: str | None = None
) -> Iterator[None]:
    """Emits kernels for ``platform`` while tracing inside the block.

    Use it around ``jax.export.export(..., platforms=[platform])`` on a machine
    without that hardware; :func:`pallax.testing.assert_lowers_for_tpu` does.
    ``device_kind`` (e.g. ``'TPU v5 lite'``, a compile-only device's
    ``device_kind``) picks that chip's block sizes and VMEM budget; without it
    kernels use sizes that fit every supported chip of the platform.
    The platform is read while tracing and ``jax.jit`` caches traces by
    function, so export a function that was not traced for another platform.
    """
    if platform not in ("tpu", "cuda"):
        raise ValueError(f"lowering_platform: platform must be 'tpu' or 'cuda', got {platform!r}")
    if device_kind is not None and not isinstance(device_kind, str):
        raise TypeError(f"lowering_platform: device_kind must be a str, got {device_kind!r}")
    token = _platform_ctx.set("gpu" if platform == "cuda" else platform)
    kind_token = _kind_ctx.set(device_kind)
    try:
        yield
    finally:
        _kind_ctx.reset(kind_token)
        _platform_ctx.reset(token)


def interpret_config() -> InterpretConfig | None:
    """The active interpreter settings, or None when kernels are compiled."""
    if _platform_ctx.get() is not None:
        return None
    config = _interpret_ctx.get()
    if config is None and os.environ.get("PALLAX_INTERPRET", "").lower() in ("1", "true", "yes"):
        config = InterpretConfig()
    return config


def current_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the lowering target if one is set, else JAX's default backend."""
    target = _platform_ctx.get()
    if target is not None:
        return target
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def device_kind() -> str | None:
    """The device kind that block sizes are chosen for: the lowering target's when one is
    set (None if it names no kind), else the default device's."""
    if _platform_ctx.get() is not None:
        return _kind_ctx.get()
    return jax.devices()[0].device_kind


def resolve(
    op: str,
    implementation: str | None,
    *,
    available: tuple[str, ...],
    supports: Callable[[str], str | None] = lambda impl: None,
) -> KernelMode:
    """Resolves ``implementation`` for ``op``.

    Args:
      op: the op's name, for messages.
      implementation: the user's request.
      available: the implementations ``op`` has.
      supports: returns None when the implementation can handle this call's
        shapes and dtypes, else a sentence saying why not. ``None`` requests
        fall back to 'xla' when the best kernel cannot take the call; explicit
        requests raise with that sentence.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: unknown implementation={implementation!r}; "
            f"expected None or one of {IMPLEMENTATIONS}"
        )
    if implementation is not None and implementation not in available:
        raise ValueError(
            f"{op}: implementation={implementation!r} does not exist for this op; "
            f"available: {available}"
        )
    platform = current_platform()
    interpret = interpret_config()
    if implementation is None:
        best = {"tpu": "pallas_tpu", "gpu": "pallas_mosaic_gpu"}.get(platform, "xla")
        if best not in available or supports(best) is not None:
            best = "xla"
        # Interpret mode is for explicit Pallas requests; None on a CPU stays on XLA.
        return KernelMode(best, interpret if best != "xla" and platform == "cpu" else None)
    if implementation == "xla":
        return KernelMode("xla")
    reason = supports(implementation)
    if reason is not None:
        raise ValueError(f"{op}: implementation={implementation!r} cannot run this call: {reason}")
    native = _NATIVE_PLATFORM[implementation]
    if interpret is not None:
        return KernelMode(implementation, interpret)
    if platform != native:
        hint = (
            "wrap the call in `with pallax.kernels.interpret_mode():` or set PALLAX_INTERPRET=1 "
            "to run it in the Pallas interpreter"
            if platform == "cpu"
            else f"it needs a {native.upper()}"
        )
        raise ValueError(
            f"{op}: implementation={implementation!r} cannot run on platform {platform!r}: {hint}"
        )
    return KernelMode(implementation)


_hlo_interpreter: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pallax_hlo_interpreter", default=False
)


@contextlib.contextmanager
def hlo_interpreter() -> Iterator[None]:
    """Interpreted TPU kernels traced inside the block use Pallas's HLO interpreter
    (``interpret=True``: plain HLO, no host callbacks) instead of the TPU interpreter,
    so that a partitioner can place them per shard (``_partition.per_shard``)."""
    token = _hlo_interpreter.set(True)
    try:
        yield
    finally:
        _hlo_interpreter.reset(token)


def tpu_interpret_params(config: InterpretConfig | None):
    """The ``interpret=`` argument of a TPU ``pallas_call``: False, or the interpreter's params."""
    if config is None:
        return False
    if _hlo_interpreter.get() and not config.detect_races:
        return True
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(detect_races=config.detect_races)
