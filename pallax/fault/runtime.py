"""The worker's side of a supervised, fault-tolerant training run.

A worker started by :class:`~pallax.fault.supervisor.Supervisor` finds its
settings in the environment (``PALLAX_FT_*``). It restores the newest state any
intact replica holds, writes a heartbeat file after every phase and step, saves
to the replicated tiers after every step, dies on an injected ``kill``, and
leaves a report of its goodput buckets for the supervisor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import jax

from pallax.fault.goodput import GoodputTracker
from pallax.fault.inject import EXIT_KILLED, Injection
from pallax.fault.tiers import ReplicatedTiers, RestorePlan

ENV_DIR, ENV_ATTEMPT, ENV_SPAWNED = "PALLAX_FT_DIR", "PALLAX_FT_ATTEMPT", "PALLAX_FT_SPAWNED"
ENV_MEMORY_EVERY = "PALLAX_FT_MEMORY_EVERY"


def active() -> bool:
    """Whether this process is a worker of a supervised fault-tolerant run."""
    return ENV_DIR in os.environ


def local_tier_dir(ft_dir: pathlib.Path, worker: int) -> pathlib.Path:
    return ft_dir / "tiers" / f"worker{worker}"


def heartbeat_path(ft_dir: pathlib.Path, worker: int) -> pathlib.Path:
    return ft_dir / "heartbeat" / f"worker{worker}.json"


def write_json(path: pathlib.Path, payload: dict) -> None:
    """Atomic (write + rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def replica_groups(mesh, axis: str = "data") -> list[list[int]]:
    """Processes of each replica, in shard order (j-th entries hold the same shards)."""
    devices = mesh.devices
    groups = []
    for r in range(mesh.shape[axis]):
        seen = []
        for d in devices.take(r, axis=mesh.axis_names.index(axis)).flat:
            if d.process_index not in seen:
                seen.append(d.process_index)
        groups.append(seen)
    return groups


@dataclasses.dataclass
class WorkerRuntime:
    ft_dir: pathlib.Path
    attempt: int
    worker: int
    spawned: float
    tiers: ReplicatedTiers
    kills: dict[int, str]  # step -> 'kill' | 'hang' (injected for this worker)
    tracker: GoodputTracker = dataclasses.field(default_factory=GoodputTracker)
    plan: RestorePlan | None = None
    restore_s: float = 0.0
    steps_done: int = 0
    marks: dict[str, float] = dataclasses.field(default_factory=dict)
    begun: int = -1  # the step this worker last started (tells a hung worker from waiters)

    @classmethod
    def from_env(
        cls, mesh, abstract_state, *, persistent_dir, persistent_every, injections, marks=None
    ):
        """``marks``: wall-clock times of the worker's start-up phases (reported)."""
        ft_dir = pathlib.Path(os.environ[ENV_DIR])
        worker = jax.process_index()
        tiers = ReplicatedTiers(
            mesh,
            abstract_state,
            local_dir=local_tier_dir(ft_dir, worker),
            persistent_dir=persistent_dir,
            memory_every=int(os.environ.get(ENV_MEMORY_EVERY, "1")),
            persistent_every=persistent_every,
        )
        for injection in injections:
            if injection.kind == "corrupt-persistent":
                tiers.corrupt_persistent_after_save(injection.step)
        kills = {
            i.step: i.kind for i in injections if i.kind in ("kill", "hang") and i.worker == worker
        }
        runtime = cls(
            ft_dir,
            int(os.environ.get(ENV_ATTEMPT, "0")),
            worker,
            float(os.environ.get(ENV_SPAWNED, time.time())),
            tiers,
            kills,
        )
        now = time.time()
        runtime.tracker.seconds["startup"] += now - runtime.spawned
        runtime.marks = {k: v - runtime.spawned for k, v in {**(marks or {}), "tiers": now}.items()}
        runtime.heartbeat("started", None)
        return runtime

    def heartbeat(self, phase: str, step: int | None) -> None:
        write_json(
            heartbeat_path(self.ft_dir, self.worker),
            {
                "attempt": self.attempt,
                "phase": phase,
                "step": step,
                "time": time.time(),
                "steps_done": self.steps_done,
                "buckets": self.tracker.seconds,
                "plan": None if self.plan is None else dataclasses.asdict(self.plan),
                "restore_s": self.restore_s,
                "startup_marks": self.marks,
                "begun": self.begun,
            },
        )

    def restore(self, mesh, state):
        """(state, first step): the newest state an intact replica (or, failing that,
        a verified persistent checkpoint) holds; ``state`` itself on a fresh start."""
        begin = time.perf_counter()
        with self.tracker.track("checkpoint_restore"):
            self.plan = self.tiers.plan_restore(replica_groups(mesh))
            self.tiers.discard_after(-1 if self.plan.step is None else self.plan.step)
            if self.plan.step is not None:
                state = self.tiers.restore(self.plan.step)
                jax.block_until_ready(state)
            else:  # a fresh start: step 0 goes to the tiers like any other step
                self.tiers.save(0, state)
        self.restore_s = time.perf_counter() - begin
        first = 0 if self.plan.step is None else self.plan.step
        self.heartbeat("restored", first)
        return state, first

    def before_step(self, step: int) -> None:
        kind = self.kills.get(step)
        if kind is not None:
            print(f"worker {self.worker}: injected {kind} before step {step}", flush=True)
            if kind == "hang":  # alive but silent: the supervisor's heartbeat timeout
                while True:
                    time.sleep(3600)
            os._exit(EXIT_KILLED)
        self.begun = step
        self.heartbeat("training", step)

    def after_step(self, step: int, state, seconds: float, *, compiled: bool) -> None:
        """``state`` is the result of step ``step`` (``seconds`` of compute)."""
        self.tracker.seconds["productive" if compiled else "startup"] += seconds
        self.steps_done += 1
        with self.tracker.track("checkpoint_save"):
            self.tiers.save(step + 1, state)
        self.heartbeat("training", step + 1)

    def previous_state(self, step: int):
        """The state before ``step``, from the local tier (for an SDC replay)."""
        with self.tracker.track("checkpoint_restore"):
            self.tiers.wait()
            return self.tiers.restore(step)

    def finish(self, summary: dict) -> dict:
        with self.tracker.track("checkpoint_save"):
            self.tiers.close()
        self.heartbeat("finished", summary.get("steps"))
        return {
            "attempt": self.attempt,
            "plan": dataclasses.asdict(self.plan) if self.plan else None,
            "restore_s": self.restore_s,
            "buckets": self.tracker.seconds,
        }


__all__ = ["Injection", "WorkerRuntime", "active", "replica_groups"]
