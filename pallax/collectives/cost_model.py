"""A first-order cost model of collective matmul schedules.

Times are in seconds; bandwidths in bytes/s per direction of one link.

On a ring of n devices, an all-gather of an array whose full size is B bytes
moves (n - 1)/n * B into every device over its incoming link: with one
direction that takes (n - 1)/n * B / bw; a bidirectional ring uses both
directions and halves it. A reduce-scatter moves the same bytes; an all-reduce
is a reduce-scatter followed by an all-gather.

A schedule that overlaps the collective with the matmul runs at best in
max(compute, communication) (the lower bound) and at worst in their sum (the
upper bound, which is also what the naive collective-then-matmul schedule
takes). The ring estimate is step by step: n - 1 steps of max(chunk compute,
chunk transfer), then the last chunk's compute.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Schedule = Literal["naive", "ring", "ring_bidirectional"]


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # one direction of one ICI link / NVLink path used by the ring


# Sources:
#  TPU specs (FLOP/s, HBM): cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}.
#  ICI per link and direction: "How to Scale Your Model" (jax-ml, 2025), TPU chapter:
#   v4 4.5e10, v5e 4.5e10, v5p 9e10, v6e 9e10 bytes/s.
#  H100/H200: NVIDIA datasheets; NVLink 4 gives 900 GB/s per GPU in total,
#   450 GB/s per direction through the NVSwitch fabric.
CHIPS: dict[str, ChipSpec] = {
    "tpu_v4": ChipSpec("TPU v4", 275e12, 1.2e12, 4.5e10),
    "tpu_v5e": ChipSpec("TPU v5e", 197e12, 0.819e12, 4.5e10),
    "tpu_v5p": ChipSpec("TPU v5p", 459e12, 2.765e12, 9e10),
    "tpu_v6e": ChipSpec("TPU v6e", 918e12, 1.64e12, 9e10),
    "h100": ChipSpec("H100 SXM (NVLink 4)", 989e12, 3.35e12, 450e9),
    "h200": ChipSpec("H200 SXM (NVLink 4)", 989e12, 4.8e12, 450e9),
}


def compute_time(flops: float, chip: ChipSpec) -> float:
    return flops / chip.peak_flops


def all_gather_time(total_bytes: float, n: int, chip: ChipSpec, *, bidirectional=False) -> float:
    """Ring all-gather of an array of ``total_bytes`` (gathered size) over ``n`` devices."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * total_bytes / (chip.link_bytes_per_s * (2 if bidirectional else 1))


def reduce_scatter_time(
    total_bytes: float, n: int, chip: ChipSpec, *, bidirectional=False
) -> float:
    """Ring reduce-scatter of an array of ``total_bytes`` (unscattered size)."""
    return all_gather_time(total_bytes, n, chip, bidirectional=bidirectional)


def all_reduce_time(total_bytes: float, n: int, chip: ChipSpec, *, bidirectional=False) -> float:
    return 2 * all_gather_time(total_bytes, n, chip, bidirectional=bidirectional)


@dataclasses.dataclass(frozen=True)
class Prediction:
    schedule: str
    compute_s: float
    communication_s: float
    estimate_s: float
    lower_bound_s: float  # perfect overlap
    upper_bound_s: float  # no overlap

    @property
    def overlap_fraction(self) -> float:
        """Share of the communication hidden behind compute in the estimate."""
        if self.communication_s == 0:
            return 1.0
        exposed = self.estimate_s - self.compute_s
        return round(max(0.0, min(1.0, 1 - exposed / self.communication_s)), 9)


def predict(
    *,
    m: int,
    k: int,
    n_cols: int,
    devices: int,
    chip: ChipSpec,
    kind: Literal["all_gather", "reduce_scatter"] = "all_gather",
    schedule: Schedule = "ring",
    bytes_per_element: int = 2,
) -> Prediction:
    """Predicted time per device of a tensor-parallel [m, k] @ [k, n_cols] over ``devices``.

    all_gather: the [m, k] activations are gathered (each device holds m/devices
      rows) and each device computes [m, k] @ [k, n_cols/devices].
    reduce_scatter: each device computes [m, k/devices] @ [k/devices, n_cols]
      and the [m, n_cols] partial sums are reduce-scattered by rows.
    """
    flops = 2 * m * k * n_cols / devices
    moved = m * (k if kind == "all_gather" else n_cols) * bytes_per_element
    bidirectional = schedule == "ring_bidirectional"
    comm = all_gather_time(moved, devices, chip, bidirectional=bidirectional)
    compute = compute_time(flops, chip)
    lower, upper = max(compute, comm), compute + comm
    if schedule == "naive" or devices == 1:
        estimate = upper
    else:
        step_compute = compute / devices
        step_comm = comm / (devices - 1)
        estimate = (devices - 1) * max(step_compute, step_comm) + step_compute
    return Prediction(schedule, compute, comm, estimate, lower, upper)


def choose_schedule(**problem) -> Prediction:
    """The schedule with the smallest estimate (ties go to the simpler one)."""
    order: tuple[Schedule, ...] = ("naive", "ring", "ring_bidirectional")
    predictions = [predict(schedule=s, **problem) for s in order]
    return min(predictions, key=lambda p: p.estimate_s)
