"""python -m pallax.bench: run suites, print a table, write JSON and a roofline plot."""

from __future__ import annotations

import argparse
import contextlib
import sys

import jax

from pallax.bench._harness import run_case
from pallax.bench._report import plot_roofline, print_rows, print_table, write_json
from pallax.bench._roofline import device_peaks
from pallax.bench.suites import SUITES


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m pallax.bench", description=__doc__)
    parser.add_argument(
        "--suite",
        action="append",
        choices=sorted(SUITES),
        help="suite to run (repeatable; default: all)",
    )
    parser.add_argument(
        "--size",
        choices=("smoke", "cpu", "full"),
        default=None,
        help="problem sizes (default: 'cpu' on a CPU, 'full' on an accelerator)",
    )
    parser.add_argument(
        "--runs", type=int, default=10, help="timed runs per case (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (compiles)")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a roofline plot (PNG)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # 8 simulated CPU devices for the multi-device suites, if the backend has not
    # started yet (when called from a test, use the devices there are).
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", 8)
    size = args.size or ("cpu" if jax.devices()[0].platform == "cpu" else "full")
    peaks = device_peaks()
    results, reports = [], {}
    for name in args.suite or sorted(SUITES):
        suite = SUITES[name]
        if hasattr(suite, "report"):
            reports[name] = suite.report(size)
            print_rows(name, reports[name])
        for case in suite.cases(size):
            results.append(run_case(case, peaks, warmup=args.warmup, runs=args.runs))
        if args.json:  # after every suite, so a run cut short by a time box keeps its results
            write_json(args.json, results, peaks, reports)
    print_table(results, peaks)
    if args.plot:
        plot_roofline(args.plot, results, peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
