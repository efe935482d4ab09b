"""The supervisor of a fault-tolerant multi-process training job.

``python -m pallax.train --processes 4 --fault-tolerant ...`` runs a Supervisor.
It launches the workers (``jax.distributed`` processes on 127.0.0.1), watches
their exit codes and heartbeat files, and when a worker is lost:

1. ends the others (a process cannot rejoin a running JAX CPU job, so recovery
   restarts the whole job; survivors keep their in-memory tier, which lives in
   a RAM disk that outlives the process, as on a real host);
2. wipes the lost worker's tier (its host is gone) and starts a replacement;
3. restarts the job, whose workers restore the newest step any intact replica
   holds (persistent storage only when none does; see ``tiers.py``), and resume.

A worker is *lost* when it exits with the injected-kill status, is killed by
SIGKILL, stops making progress for ``heartbeat_timeout`` seconds while the others
began a later step (a hung host), or is named by the SDC guard as persistently
faulty. If every worker stops at the same step the job is restarted as a whole,
every tier kept. Any other failure with no worker lost
is a bug, not a fault: the supervisor stops and shows the log.

With ``hot_standby`` the supervisor keeps one warm process per worker started
and waiting (Python, JAX, Orbax and pallax imported) and refills the pool in the
background, so a restart skips process start-up and imports.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from pallax._procs import cpu_child_env, free_port
from pallax.fault import runtime
from pallax.fault.goodput import GoodputTracker
from pallax.fault.inject import EXIT_KILLED, Injection

EXIT_SDC = 87  # a worker named by the SDC guard as persistently faulty exits with this
JOB_HANG = -1  # in a set of lost workers: the whole job stopped progressing
_LOST_CODES = {
    EXIT_KILLED: "killed (injected)",
    EXIT_SDC: "persistent SDC",
    -signal.SIGKILL: "SIGKILL",
}


class _StandbyPool:
    """Warm processes (``python -m pallax.fault.standby``) waiting for an assignment."""

    def __init__(self, size: int):
        self.size, self._ready = size, []
        self.refill()

    def refill(self) -> None:
        while len(self._ready) < self.size:
            self._ready.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pallax.fault.standby"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=cpu_child_env({}),
                    text=True,
                )
            )

    def take(self, env: dict[str, str], argv: list[str], log: pathlib.Path):
        if not self._ready:  # a failure before the pool was refilled: start spares now
            self.refill()
        proc = self._ready.pop(0)
        proc.stdin.write(json.dumps({"env": env, "argv": argv, "log": str(log)}) + "\n")
        proc.stdin.close()
        return proc

    def close(self) -> None:
        for proc in self._ready:
            proc.kill()
            proc.wait()
        self._ready = []


@dataclasses.dataclass
class Supervisor:
    argv: list[str]  # a worker's pallax.train arguments, without --processes/--inject
    processes: int
    ft_dir: pathlib.Path
    injections: list[Injection] = dataclasses.field(default_factory=list)
    hot_standby: bool = False
    heartbeat_timeout: float = 120.0
    max_restarts: int = 5
    memory_every: int = 1
    echo: Callable[[str], None] = print

    def __post_init__(self):
        self.ft_dir = pathlib.Path(self.ft_dir).absolute()
        self.pending = list(self.injections)
        self.events: list[dict] = []
        self.heartbeats: dict[tuple[int, int], dict] = {}  # (attempt, worker) -> last seen
        self.phase_seen: dict[tuple[int, str], float] = {}  # (attempt, phase) -> all workers

    # -- one attempt ------------------------------------------------------------------------

    def _spawn(self, attempt: int, pool: _StandbyPool | None):
        port = free_port()
        argv = list(self.argv)
        for injection in self.pending:
            argv += ["--inject", injection.spec()]
        procs = []
        for worker in range(self.processes):
            env = {
                "PALLAX_COORDINATOR": f"127.0.0.1:{port}",
                "PALLAX_NUM_PROCESSES": str(self.processes),
                "PALLAX_PROCESS_ID": str(worker),
                runtime.ENV_DIR: str(self.ft_dir),
                runtime.ENV_ATTEMPT: str(attempt),
                runtime.ENV_SPAWNED: repr(time.time()),
                runtime.ENV_MEMORY_EVERY: str(self.memory_every),
            }
            log = self.ft_dir / "logs" / f"attempt{attempt}-worker{worker}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            if pool is not None:
                procs.append(pool.take(env, argv, log))
            else:
                with open(log, "w") as out:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "pallax.train", *argv],
                            env=cpu_child_env(env),
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )
        return procs

    def _read_heartbeats(self, attempt: int) -> None:
        for worker in range(self.processes):
            path = runtime.heartbeat_path(self.ft_dir, worker)
            try:
                beat = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if beat.get("attempt") == attempt:
                self.heartbeats[(attempt, worker)] = beat
        for phase in ("started", "restored", "training", "finished"):
            beats = [self.heartbeats.get((attempt, w)) for w in range(self.processes)]
            if (attempt, phase) not in self.phase_seen and all(
                b is not None and _phase_rank(b["phase"]) >= _phase_rank(phase) for b in beats
            ):
                self.phase_seen[(attempt, phase)] = time.time()

    def _hung(self, attempt: int, codes, now: float) -> dict[int, str]:
        """Workers that stopped making progress. When one worker hangs the others soon
        wait for it in a collective, so after the timeout all are silent: the hung ones
        are those that never began the step the others began. If none lags, the whole
        job is stuck: every worker is restarted (``JOB_HANG``) and no tier is dropped."""
        beats = {
            w: b
            for w in range(self.processes)
            if (b := self.heartbeats.get((attempt, w))) is not None
            and b["phase"] == "training"
            and b["steps_done"] > 0  # the first step compiles: no timeout before it ends
            and codes[w] is None
        }
        stalled = {w for w, b in beats.items() if now - b["time"] > self.heartbeat_timeout}
        if not stalled:
            return {}
        ahead = max(b["begun"] for b in beats.values())
        laggards = {w for w in stalled if beats[w]["begun"] < ahead}
        if laggards:
            return {w: f"no progress for {now - beats[w]['time']:.0f} s" for w in laggards}
        if len(stalled) == len(beats) == self.processes:
            return {JOB_HANG: f"no worker progressed for {self.heartbeat_timeout:.0f} s"}
        return {}

    def _watch(self, attempt: int, procs, pool) -> dict[int, str]:
        """Waits for the attempt to end; returns the lost workers ({} on success)."""
        while True:
            self._read_heartbeats(attempt)
            if pool is not None and (attempt, "training") in self.phase_seen:
                pool.refill()  # once the job trains again, so that the spares do not slow it
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                return {}
            hung = self._hung(attempt, codes, time.time())
            if hung or any(c not in (None, 0) for c in codes):
                time.sleep(0.5)  # collect workers lost at the same moment
                codes = [p.poll() for p in procs]
                lost = {w: _LOST_CODES[c] for w, c in enumerate(codes) if c in _LOST_CODES}
                lost.update(hung)
                if not lost:
                    bad = next(w for w, c in enumerate(codes) if c not in (None, 0))
                    log = self.ft_dir / "logs" / f"attempt{attempt}-worker{bad}.log"
                    raise RuntimeError(
                        f"worker {bad} failed with exit status {codes[bad]} and no worker was "
                        f"lost: a bug, not a fault; log {log}:\n{log.read_text()[-3000:]}"
                    )
                return lost
            time.sleep(0.05)

    # -- the job ----------------------------------------------------------------------------

    def run(self) -> dict:
        """Runs the job to completion; returns the fault-tolerance report."""
        start = time.time()
        for sub in ("heartbeat", "logs"):
            shutil.rmtree(self.ft_dir / sub, ignore_errors=True)
        pool = _StandbyPool(self.processes) if self.hot_standby else None
        spawned_at, attempt = {}, 0
        try:
            while True:
                spawned_at[attempt] = time.time()
                procs = self._spawn(attempt, pool)
                lost = self._watch(attempt, procs, pool)
                if not lost:
                    break
                detected = time.time()
                for proc in procs:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                    proc.wait()
                self._read_heartbeats(attempt)
                for worker in lost:  # a lost host takes its in-memory tier with it
                    if worker != JOB_HANG:
                        shutil.rmtree(
                            runtime.local_tier_dir(self.ft_dir, worker), ignore_errors=True
                        )
                reached = max(
                    (b["step"] or 0 for (a, _), b in self.heartbeats.items() if a == attempt),
                    default=0,
                )
                self.pending = [
                    i
                    for i in self.pending
                    if not (
                        i.kind in ("kill", "hang") and i.worker in lost and i.step <= reached + 1
                    )
                    and not (i.kind not in ("kill", "hang") and i.step < reached)
                ]
                self.events.append(
                    {
                        "attempt": attempt,
                        "lost": {str(w): why for w, why in sorted(lost.items())},
                        "step_reached": reached,
                        "detected_at": detected,
                        "teardown_s": time.time() - detected,
                    }
                )
                self.echo(
                    f"[supervisor] attempt {attempt}: lost "
                    + ", ".join(
                        f"worker {w} ({why})" if w != JOB_HANG else f"the whole job ({why})"
                        for w, why in sorted(lost.items())
                    )
                    + f" at step {reached}; restarting with a replacement"
                    + (" from the hot standby pool" if pool else "")
                )
                attempt += 1
                if attempt > self.max_restarts:
                    raise RuntimeError(f"gave up after {self.max_restarts} restarts")
        finally:
            if pool is not None:
                pool.close()
        return self._report(start, attempt, spawned_at)

    def _report(self, start: float, last: int, spawned_at: dict[int, float]) -> dict:
        end = time.time()
        recoveries = []
        for event in self.events:
            nxt = event["attempt"] + 1
            beat0 = self.heartbeats.get((nxt, 0), {})
            plan = beat0.get("plan") or {}
            restored = self.phase_seen.get((nxt, "restored"), end)
            recoveries.append(
                {
                    **{k: v for k, v in event.items() if k != "detected_at"},
                    "restored_step": plan.get("step"),
                    "source": plan.get("source"),
                    "sources": {
                        str(w): (self.heartbeats.get((nxt, w), {}).get("plan") or {}).get("source")
                        for w in range(self.processes)
                    },
                    "rejected_persistent": plan.get("rejected_persistent", []),
                    "steps_redone": max(event["step_reached"] - (plan.get("step") or 0), 0),
                    "restart_s": self.phase_seen.get((nxt, "started"), end) - spawned_at[nxt],
                    "restore_s": beat0.get("restore_s"),
                    "worker0_startup_marks": beat0.get("startup_marks"),
                    "recovery_s": restored - event["detected_at"],
                }
            )
        now = [start]  # the tracker's clock: the job's start, then its end
        tracker = GoodputTracker(clock=lambda: now[0])
        now[0] = end
        for attempt in range(last + 1):
            buckets = dict(self.heartbeats.get((attempt, 0), {}).get("buckets", {}))
            if attempt > 0:  # a restarted job's start-up is recovery time
                buckets["recovery"] = buckets.get("recovery", 0.0) + buckets.pop("startup", 0.0)
            for name, seconds in buckets.items():
                tracker.seconds[name] += seconds
        for event, rec in zip(self.events, recoveries, strict=True):
            tracker.seconds["recovery"] += event["teardown_s"]
            beat = self.heartbeats.get((event["attempt"], 0), {})
            per_step = beat.get("buckets", {}).get("productive", 0.0) / max(
                beat.get("steps_done", 0), 1
            )
            tracker.lose_progress(rec["steps_redone"] * per_step)
        return {
            "processes": self.processes,
            "hot_standby": self.hot_standby,
            "injections": [i.spec() for i in self.injections],
            "attempts": last + 1,
            "recoveries": recoveries,
            "goodput": tracker.report(),
        }


def _phase_rank(phase: str) -> int:
    return ("started", "restored", "training", "finished").index(phase)
