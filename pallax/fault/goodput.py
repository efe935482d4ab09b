"""Goodput: the share of wall time spent on productive training steps.

``GoodputTracker`` splits a run's wall time into productive steps and badput
buckets (start-up, checkpoint save/restore stalls, recovery, replay, progress
lost to a disruption), with an injectable clock so its policy is testable.

``simulate_goodput`` models a job of N chips with a per-chip failure rate, for
the two recovery designs the Gemini report contrasts: periodic checkpoints to
persistent storage only, and redundant in-memory replicas with fast recovery
from an intact replica (report: 85% -> 97% for the largest job).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np

BUCKETS = (
    "productive",
    "startup",
    "checkpoint_save",
    "checkpoint_restore",
    "recovery",
    "replay",
    "lost_progress",
    "other",
)


class GoodputTracker:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._start = clock()
        self.seconds = dict.fromkeys(BUCKETS, 0.0)

    @contextlib.contextmanager
    def track(self, bucket: str) -> Iterator[None]:
        if bucket not in BUCKETS:
            raise ValueError(f"unknown goodput bucket {bucket!r}; expected one of {BUCKETS}")
        begin = self._clock()
        try:
            yield
        finally:
            self.seconds[bucket] += self._clock() - begin

    def lose_progress(self, seconds: float) -> None:
        """Reclassifies productive time whose result a disruption threw away."""
        moved = min(seconds, self.seconds["productive"])
        self.seconds["productive"] -= moved
        self.seconds["lost_progress"] += moved

    def report(self) -> dict[str, float]:
        wall = max(self._clock() - self._start, 1e-12)
        tracked = sum(self.seconds.values())
        seconds = dict(self.seconds, other=self.seconds["other"] + max(wall - tracked, 0.0))
        return {
            "wall_s": wall,
            "goodput": seconds["productive"] / wall,
            **{f"{k}_s": v for k, v in seconds.items()},
        }


@dataclasses.dataclass(frozen=True)
class GoodputScenario:
    """A training job and its recovery design. Times in hours.

    Defaults describe an Ultra-like job. The Gemini report gives no failure
    rates; the per-chip rate is the one Meta reports for a 16,384-GPU job
    (419 unexpected interruptions in 54 days: "The Llama 3 Herd of Models",
    2024, sec. 3.3.4), about 2e-5 per chip-hour. The other figures are stated
    assumptions, chosen to be typical rather than fitted to a source.
    """

    chips: int = 16384
    failure_rate_per_chip_hour: float = 419 / (54 * 24 * 16384)
    step_hours: float = 10 / 3600
    # Persistent-only design (PaLM era): blocking saves, reload after a restart.
    checkpoint_interval_hours: float = 20 / 60
    checkpoint_save_hours: float = 1 / 60
    persistent_restore_hours: float = 10 / 60
    # In-memory design: every step snapshotted to a replica's RAM asynchronously,
    # recovery = restart + copy from an intact replica.
    snapshot_overhead_fraction: float = 0.01
    replica_restore_hours: float = 2 / 60
    rare_persistent_interval_hours: float = 3.0
    rare_persistent_save_hours: float = 0.5 / 60


def _analytic(failures_per_hour, lost_per_failure, overhead_fraction) -> float:
    # Per productive hour: the overhead, plus per failure its restore and the
    # expected lost work. goodput = productive / (productive + badput).
    badput = overhead_fraction + failures_per_hour * lost_per_failure
    return 1.0 / (1.0 + badput)


def simulate_goodput(
    scenario: GoodputScenario = GoodputScenario(),
    *,
    method: str = "analytic",
    hours: float = 24 * 30,
    seed: int = 0,
) -> dict[str, float]:
    """Goodput of the persistent-only and the in-memory design.

    method 'analytic': first-order expectation (lost work = half an interval);
    'monte_carlo': failures as a Poisson process over ``hours`` of wall time.
    """
    s = scenario
    rate = s.chips * s.failure_rate_per_chip_hour
    designs = {
        "persistent_only": dict(
            interval=s.checkpoint_interval_hours,
            save=s.checkpoint_save_hours,
            restore=s.persistent_restore_hours,
            overhead=0.0,
        ),
        "in_memory": dict(
            interval=s.step_hours,
            save=0.0,
            restore=s.replica_restore_hours,
            overhead=s.snapshot_overhead_fraction
            + s.rare_persistent_save_hours / s.rare_persistent_interval_hours,
        ),
    }
    out = {"job_mtbf_hours": 1.0 / rate}
    for name, d in designs.items():
        if method == "analytic":
            out[name] = _analytic(
                rate, d["restore"] + d["interval"] / 2, d["overhead"] + d["save"] / d["interval"]
            )
        elif method == "monte_carlo":
            out[name] = _monte_carlo(rate, hours, seed, **d)
        else:
            raise ValueError(f"method must be 'analytic' or 'monte_carlo', got {method!r}")
    return out


def _monte_carlo(rate, hours, seed, *, interval, save, restore, overhead) -> float:
    rng = np.random.default_rng(seed)
    clock, productive, since_save = 0.0, 0.0, 0.0
    next_failure = rng.exponential(1 / rate)
    while clock < hours:
        # Work until the next save point or the next failure, whichever is first.
        to_save = (interval - since_save) * (1 + overhead)
        if clock + to_save <= next_failure:
            clock += to_save + save
            productive += interval - since_save
            since_save = 0.0
            if clock > next_failure:  # failed during the save: the save is lost
                productive -= interval
                clock = next_failure + restore
                next_failure = clock + rng.exponential(1 / rate)
        else:
            worked = (next_failure - clock) / (1 + overhead)
            productive += worked
            productive -= since_save + worked  # back to the last save
            since_save = 0.0
            clock = next_failure + restore
            next_failure = clock + rng.exponential(1 / rate)
    return productive / clock
