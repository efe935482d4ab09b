"""Fault tolerance building blocks: goodput accounting and its model, SDC fingerprints.

Here: goodput accounting and model, per-replica fingerprints, a bit-flip
injector, the known-answer scanner, the local in-memory snapshot tier. Still to
come (see the fault-tolerance issue): the supervisor with recovery from an
intact replica across processes, kill/corrupt injection flags and deterministic
replay in the training loop.
"""

from pallax.fault.fingerprint import disagreeing_replicas, fingerprint, leaf_fingerprint
from pallax.fault.goodput import BUCKETS, GoodputScenario, GoodputTracker, simulate_goodput
from pallax.fault.guard import SdcGuard, parse_injection
from pallax.fault.sdc import ScanResult, flip_bit, replica_fingerprints, scan
from pallax.fault.snapshots import HostSnapshots

__all__ = [
    "BUCKETS",
    "GoodputScenario",
    "GoodputTracker",
    "HostSnapshots",
    "ScanResult",
    "SdcGuard",
    "disagreeing_replicas",
    "fingerprint",
    "flip_bit",
    "leaf_fingerprint",
    "parse_injection",
    "replica_fingerprints",
    "scan",
    "simulate_goodput",
]
