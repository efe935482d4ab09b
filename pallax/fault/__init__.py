"""Fault tolerance building blocks: goodput accounting and its model, SDC fingerprints.

Still to come (see the fault-tolerance issue): replicated in-memory state,
the supervisor with recovery from an intact replica, failure injection,
deterministic replay and the idle-device scanner.
"""

from pallax.fault.fingerprint import disagreeing_replicas, fingerprint, leaf_fingerprint
from pallax.fault.goodput import BUCKETS, GoodputScenario, GoodputTracker, simulate_goodput

__all__ = [
    "BUCKETS",
    "GoodputScenario",
    "GoodputTracker",
    "disagreeing_replicas",
    "fingerprint",
    "leaf_fingerprint",
    "simulate_goodput",
]
