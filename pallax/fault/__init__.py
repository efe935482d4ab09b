"""Fault tolerance building blocks: goodput accounting and its model, SDC fingerprints.

Here: goodput accounting and model, per-replica fingerprints, a bit-flip
injector, the known-answer scanner. Still to come (see the fault-tolerance
issue): replicated in-memory state, the supervisor with recovery from an intact
replica, kill/corrupt injection and deterministic replay in the training loop.
"""

from pallax.fault.fingerprint import disagreeing_replicas, fingerprint, leaf_fingerprint
from pallax.fault.goodput import BUCKETS, GoodputScenario, GoodputTracker, simulate_goodput
from pallax.fault.sdc import ScanResult, flip_bit, replica_fingerprints, scan

__all__ = [
    "BUCKETS",
    "GoodputScenario",
    "GoodputTracker",
    "ScanResult",
    "disagreeing_replicas",
    "fingerprint",
    "flip_bit",
    "leaf_fingerprint",
    "replica_fingerprints",
    "scan",
    "simulate_goodput",
]
