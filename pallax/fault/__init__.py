"""Fault tolerance for JAX training jobs, after the Gemini report's recipe.

- replicated checkpoint tiers (:class:`ReplicatedTiers`, on Orbax's emergency P2P
  manager): every step to each process's RAM disk, every M steps to persistent
  storage, restore from the newest step an intact replica holds, persistent
  manifests so a corrupted checkpoint is never loaded;
- the supervisor (:class:`Supervisor`, ``python -m pallax.train --fault-tolerant``)
  and its worker side (:class:`WorkerRuntime`): restart on a lost worker with a
  replacement (optionally a hot standby), recovery report, goodput;
- SDC: per-device fingerprints, :class:`SdcGuard` (replay, name, recover),
  the known-answer :func:`scan`, the bit-flip injector;
- goodput accounting (:class:`GoodputTracker`) and its model (:func:`simulate_goodput`);
- deterministic failure injection (:func:`parse_injection`).
"""

from pallax.fault.fingerprint import disagreeing_replicas, fingerprint, leaf_fingerprint
from pallax.fault.goodput import BUCKETS, GoodputScenario, GoodputTracker, simulate_goodput
from pallax.fault.guard import PersistentSdcError, SdcGuard
from pallax.fault.inject import EXIT_KILLED, Injection, parse_injection
from pallax.fault.runtime import WorkerRuntime
from pallax.fault.sdc import (
    ScanResult,
    device_fingerprints,
    flip_bit,
    replica_fingerprints,
    scan,
)
from pallax.fault.snapshots import HostSnapshots
from pallax.fault.supervisor import Supervisor
from pallax.fault.tiers import ReplicatedTiers, RestorePlan, corrupt_persistent

__all__ = [
    "BUCKETS",
    "EXIT_KILLED",
    "GoodputScenario",
    "GoodputTracker",
    "HostSnapshots",
    "Injection",
    "PersistentSdcError",
    "ReplicatedTiers",
    "RestorePlan",
    "ScanResult",
    "SdcGuard",
    "Supervisor",
    "WorkerRuntime",
    "corrupt_persistent",
    "device_fingerprints",
    "disagreeing_replicas",
    "fingerprint",
    "flip_bit",
    "leaf_fingerprint",
    "parse_injection",
    "replica_fingerprints",
    "scan",
    "simulate_goodput",
]
