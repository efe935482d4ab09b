"""How ``python -m pallax.train --processes N`` starts its processes: plain
(``launch``: N jax.distributed processes, the first one's output shown) or
supervised (``supervise``: --fault-tolerant, pallax.fault.Supervisor)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from pallax._procs import cpu_child_env, free_port


def launch(args, argv) -> int:
    """Starts args.processes copies of this command as jax.distributed processes."""
    port = free_port()
    procs = []
    for pid in range(args.processes):
        env = cpu_child_env(
            {
                "PALLAX_COORDINATOR": f"127.0.0.1:{port}",
                "PALLAX_NUM_PROCESSES": str(args.processes),
                "PALLAX_PROCESS_ID": str(pid),
            }
        )
        child = [a for a in argv if not a.startswith("--processes")]
        if "--processes" in argv:
            i = argv.index("--processes")
            child = argv[:i] + argv[i + 2 :]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pallax.train", *child],
                env=env,
                stdout=None if pid == 0 else subprocess.DEVNULL,
            )
        )
    codes = [p.wait() for p in procs]
    return max(codes)


_WORKER_FLAGS = (
    "preset", "steps", "batch", "seq_len", "microbatches", "lr", "mesh", "implementation",
    "processes", "checkpoint_dir", "checkpoint_every", "seed", "sample_tokens",
)  # fmt: skip


def supervise(args, injections) -> int:
    """--fault-tolerant: the workers run under a Supervisor (pallax.fault)."""
    import pathlib
    import tempfile

    from pallax.fault.supervisor import Supervisor

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    ft_dir = pathlib.Path(args.ft_dir or tempfile.mkdtemp(prefix="pallax-ft-", dir=shm))
    summary_path = ft_dir / "summary.json"
    worker_argv = ["--quiet", "--json", str(summary_path), "--fault-tolerant"]
    for name in _WORKER_FLAGS:
        if getattr(args, name) is not None:
            worker_argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for flag in ("tensor_parallel_collectives", "sdc_check"):
        if getattr(args, flag):
            worker_argv.append(f"--{flag.replace('_', '-')}")
    print(f"[supervisor] {args.processes} workers, run directory {ft_dir}")
    report = Supervisor(
        worker_argv,
        args.processes,
        ft_dir,
        injections,
        hot_standby=args.hot_standby,
        heartbeat_timeout=args.heartbeat_timeout,
        memory_every=args.memory_every,
    ).run()
    summary = json.loads(summary_path.read_text())
    summary["fault_tolerance"] = report
    for rec in report["recoveries"]:
        print(
            f"[supervisor] recovered from step {rec['restored_step']} ({rec['source']}"
            + (
                f"; rejected corrupt persistent {rec['rejected_persistent']}"
                if rec["rejected_persistent"]
                else ""
            )
            + f"): {rec['recovery_s']:.1f} s from detection to restored state "
            f"(teardown {rec['teardown_s']:.1f} s, restart {rec['restart_s']:.1f} s, "
            f"restore {rec['restore_s'] or 0:.2f} s); {rec['steps_redone']} step(s) redone"
        )
    for event in summary.get("sdc_events", []):
        print(
            f"[sdc] step {event['step']}: replica(s) {event['replicas']} (worker(s) "
            f"{event['workers']}) disagreed; replayed and continued"
        )
    goodput = report["goodput"]
    print(
        f"[goodput] {100 * goodput['goodput']:.1f}% of {goodput['wall_s']:.1f} s: "
        + ", ".join(
            f"{k[:-2]} {v:.1f} s"
            for k, v in goodput.items()
            if k.endswith("_s") and k != "wall_s" and v > 0.05
        )
    )
    print(
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; "
        f"params sha256 {summary['param_digest'][:16]}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.ft_dir is None:  # the tiers live in RAM: a run directory we made goes on success
        shutil.rmtree(ft_dir, ignore_errors=True)
    return 0
