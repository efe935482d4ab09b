"""Peak FLOP/s and memory bandwidth of the device a benchmark runs on.

Accelerators use the vendor's published dense bf16 peak and HBM bandwidth.
On a CPU there is no trustworthy datasheet number for this VM, so the peaks are
measured in the same run: an f32 matmul for FLOP/s and an elementwise copy for
bytes/s. Fractions of those are fractions of what this machine can actually do.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Peaks:
    device: str
    flops_per_s: float  # dense bf16 matmul (f32 on CPU)
    bytes_per_s: float  # main-memory bandwidth
    source: str

    def roofline_time(self, flops: float, bytes_moved: float) -> float:
        """The time a perfect kernel would take: bound by compute or by memory."""
        return max(flops / self.flops_per_s, bytes_moved / self.bytes_per_s)


# Keyed by a prefix of jax.Device.device_kind; the longest matching prefix wins.
# Sources:
#  TPU v4:  cloud.google.com/tpu/docs/v4 — 275 TFLOP/s bf16, 1200 GB/s HBM2.
#  TPU v5e: cloud.google.com/tpu/docs/v5e — 197 TFLOP/s bf16, 819 GB/s.
#  TPU v5p: cloud.google.com/tpu/docs/v5p — 459 TFLOP/s bf16, 2765 GB/s.
#  TPU v6e: cloud.google.com/tpu/docs/v6e — 918 TFLOP/s bf16, 1640 GB/s.
#  H100 SXM5: NVIDIA H100 datasheet — 989 TFLOP/s dense bf16, 3.35 TB/s HBM3.
#  H200 SXM:  NVIDIA H200 datasheet — 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e.
_TABLE: dict[str, tuple[float, float, str]] = {
    "TPU v4": (275e12, 1.2e12, "Google Cloud TPU v4 spec"),
    "TPU v5 lite": (197e12, 0.819e12, "Google Cloud TPU v5e spec"),
    "TPU v5e": (197e12, 0.819e12, "Google Cloud TPU v5e spec"),
    "TPU v5p": (459e12, 2.765e12, "Google Cloud TPU v5p spec"),
    "TPU v5": (459e12, 2.765e12, "Google Cloud TPU v5p spec"),
    "TPU v6 lite": (918e12, 1.64e12, "Google Cloud TPU v6e spec"),
    "TPU v6e": (918e12, 1.64e12, "Google Cloud TPU v6e spec"),
    "NVIDIA H100": (989e12, 3.35e12, "NVIDIA H100 SXM5 datasheet (dense bf16)"),
    "NVIDIA H200": (989e12, 4.8e12, "NVIDIA H200 SXM datasheet (dense bf16)"),
}


def table_peaks(device_kind: str) -> Peaks | None:
    matches = [key for key in _TABLE if device_kind.startswith(key)]
    if not matches:
        return None
    flops, bw, source = _TABLE[max(matches, key=len)]
    return Peaks(device_kind, flops, bw, source)


def _best_time(fn, *args, runs: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_peaks(
    *, matmul_sizes=(1024, 2048), copy_mib=(4, 16, 64, 256), runs: int = 5
) -> Peaks:
    """Measures this CPU's f32 matmul FLOP/s and copy bandwidth.

    Each is the best over several sizes and ``runs`` repetitions: small copies
    run from cache, so the bandwidth peak covers working sets that fit in
    cache as well as those that stream from DRAM, and no case can beat it.
    """
    matmul = jax.jit(lambda a, b: a @ b)
    flops = max(
        2 * n**3 / _best_time(matmul, a, a, runs=runs)
        for n in matmul_sizes
        for a in [jnp.ones((n, n), jnp.float32)]
    )
    copy = jax.jit(lambda x: x * 2.0)  # reads and writes every byte once
    bytes_per_s = max(
        2 * (mib << 20) / _best_time(copy, x, runs=runs)
        for mib in copy_mib
        for x in [jnp.ones(((mib << 20) // 4,), jnp.float32)]
    )
    return Peaks(
        device=f"cpu ({_cpu_name()}, {os.cpu_count()} cores)",
        flops_per_s=flops,
        bytes_per_s=bytes_per_s,
        source=(
            f"measured in this run: best f32 matmul of {matmul_sizes}, best copy of {copy_mib} MiB"
        ),
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def device_peaks() -> Peaks:
    """Peaks of JAX's default device: from the table, else measured (CPU)."""
    device = jax.devices()[0]
    peaks = table_peaks(device.device_kind)
    if peaks is not None:
        return peaks
    if device.platform == "cpu":
        return measure_cpu_peaks()
    raise ValueError(
        f"no roofline peaks for device kind {device.device_kind!r}; add it to _TABLE "
        "with a cited source"
    )
