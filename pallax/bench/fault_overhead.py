"""What fault tolerance costs per step: ``python -m pallax.bench.fault_overhead``.

Runs the same training job (4 jax.distributed worker processes, 2 data replicas)
plain, under the supervisor with the in-memory tier written every step and every
5 steps, and with SDC fingerprints on top, and reports the mean and median time
of a loop iteration (step + saves + checks, compilation excluded) against the
plain run's. On a CPU host the asynchronous writes compete with the "devices"
for the same cores, so the figures overstate what an accelerator host pays.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CONFIGS = {
    "plain": [],
    "tiers every step": ["--fault-tolerant"],
    "tiers every 5 steps": ["--fault-tolerant", "--memory-every", "5"],
    "tiers every step + SDC fingerprints": ["--fault-tolerant", "--sdc-check"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pallax.bench.fault_overhead")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        for name, extra in CONFIGS.items():
            out = os.path.join(d, "run.json")
            cmd = [sys.executable, "-m", "pallax.train", "--processes", "4", "--quiet"]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch)]
            cmd += ["--seq-len", str(args.seq_len), "--sample-tokens", "2", "--json", out]
            cmd += ["--checkpoint-every", "1000", *extra]
            if "--fault-tolerant" in extra:
                cmd += ["--ft-dir", os.path.join(d, name.replace(" ", "_"))]
            subprocess.run(cmd, check=True, capture_output=True)
            with open(out) as f:
                summary = json.load(f)
            rows[name] = {
                "mean_iteration_s": summary["mean_iteration_s"],
                "median_iteration_s": summary["median_iteration_s"],
                "median_step_s": summary["median_step_s"],
            }
    base = rows["plain"]["mean_iteration_s"]
    print(f"{'configuration':40s} {'mean it. s':>10s} {'median s':>9s} {'overhead':>9s}")
    for name, row in rows.items():
        row["overhead"] = row["mean_iteration_s"] / base - 1
        print(
            f"{name:40s} {row['mean_iteration_s']:10.3f} {row['median_iteration_s']:9.3f} "
            f"{100 * row['overhead']:8.1f}%"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
