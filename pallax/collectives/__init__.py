"""Overlapped-collective schedules: collective matmuls and the proof of overlap."""

from pallax.collectives import cost_model
from pallax.collectives.api import collective_matmul
from pallax.collectives.overlap import (
    CollectiveOverlap,
    OverlapReport,
    bracketed_dots,
    overlap_report,
)
from pallax.collectives.ring import all_gather_matmul, matmul_reduce_scatter

__all__ = [
    "CollectiveOverlap",
    "OverlapReport",
    "all_gather_matmul",
    "bracketed_dots",
    "collective_matmul",
    "cost_model",
    "matmul_reduce_scatter",
    "overlap_report",
]
