"""Microbenchmarks reported against the device's roofline.

``python -m pallax.bench [--suite NAME ...] [--json PATH] [--plot PATH]``.
"""

from pallax.bench._harness import Case, Result, run_case, time_call
from pallax.bench._roofline import Peaks, device_peaks, measure_cpu_peaks, table_peaks

__all__ = [
    "Case",
    "Peaks",
    "Result",
    "device_peaks",
    "measure_cpu_peaks",
    "run_case",
    "table_peaks",
    "time_call",
]
