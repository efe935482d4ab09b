"""Benchmark suites: each maps a size ('smoke', 'cpu', 'full') to a list of Cases."""

from pallax.bench.suites import rms_norm

SUITES = {
    "rms_norm": rms_norm.cases,
}
