"""Cases, timing and results of the benchmark suites."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from pallax.bench._roofline import Peaks


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed call.

    Attributes:
      suite: the suite's name ('rms_norm').
      name: the workload, shared by every implementation of it ('fwd 8192x4096 bf16').
      implementation: what is timed ('pallax[xla]', 'jnp', 'cudnn', ...).
      fn: a jitted function; ``fn(*args)`` is timed.
      args: its arguments, already on the device.
      flops: useful floating-point operations of one call.
      bytes: the minimum bytes one call must move to and from main memory.
    """

    suite: str
    name: str
    implementation: str
    fn: Callable[..., Any]
    args: tuple
    flops: float
    bytes: float


@dataclasses.dataclass(frozen=True)
class Result:
    suite: str
    name: str
    implementation: str
    median_s: float
    min_s: float
    runs: int
    flops_per_s: float
    bytes_per_s: float
    roofline_fraction: float  # roofline time / median time
    intensity: float  # flops per byte
    error: str | None = None


def time_call(fn: Callable, args: Sequence, *, warmup: int = 2, runs: int = 10) -> list[float]:
    """Wall times of ``runs`` calls after ``warmup`` calls (the first one compiles)."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def run_case(case: Case, peaks: Peaks, *, warmup: int = 2, runs: int = 10) -> Result:
    try:
        times = time_call(case.fn, case.args, warmup=warmup, runs=runs)
    except Exception as e:  # a peer that does not run here (e.g. cuDNN) is reported, not fatal
        nan = float("nan")
        return Result(
            case.suite,
            case.name,
            case.implementation,
            nan,
            nan,
            0,
            nan,
            nan,
            nan,
            case.flops / max(case.bytes, 1),
            error=f"{type(e).__name__}: {e}"[:300],
        )
    median = statistics.median(times)
    return Result(
        suite=case.suite,
        name=case.name,
        implementation=case.implementation,
        median_s=median,
        min_s=min(times),
        runs=runs,
        flops_per_s=case.flops / median,
        bytes_per_s=case.bytes / median,
        roofline_fraction=peaks.roofline_time(case.flops, case.bytes) / median,
        intensity=case.flops / max(case.bytes, 1),
    )
