"""The compile report: every Pallas kernel, and the model's training step on TPU
slices, compiled ahead of time by the real compilers (libtpu for TPU v4/v5e/v5p/
v6e; Mosaic GPU + ptxas for Hopper) on this host. Per case and target: compiled
or the compiler's message, per-chip bytes (HBM: arguments, outputs, temporaries),
Mosaic GPU registers / spill bytes / SMEM, compile seconds.

    python -m pallax.bench.compile_report [--part kernels|model|all] [--targets v5e,h100]
        [--filter attention] [--json compile.json]

JSON is written after every case, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

_PARTS = ("kernels", "model", "all")
_TARGETS = ("v4", "v5e", "v5p", "v6e", "h100", "h200")


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pallax.bench.compile_report",
        description="Compile every kernel and the model step for TPU and Hopper, ahead of time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--part", default="all", choices=_PARTS, help="what to compile")
    p.add_argument(
        "--targets", default="v4,v5e,v5p,v6e,h100", help=f"comma-separated, of {_TARGETS}"
    )
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    p.add_argument("--json", default=None, help="write the results here (after every case)")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    bad = [t for t in targets if t not in _TARGETS]
    if bad or not targets:
        p.error(f"--targets {args.targets!r}: each must be one of {', '.join(_TARGETS)}")
    args.targets = targets
    if args.json is not None and not pathlib.Path(args.json).resolve().parent.is_dir():
        p.error(f"--json {args.json!r}: the folder {pathlib.Path(args.json).parent} does not exist")
    return args


def _row(case: str, target: str, result) -> dict:
    row = {"case": case, **dataclasses.asdict(result)}
    row["target"] = target
    row["total_bytes"] = result.total_bytes
    return row


def _kernel_rows(targets, name_filter):
    from pallax.bench.compile_cases import GPU_CASES, TPU_CASES
    from pallax.testing import GPU_TARGETS, compile_for

    for target in targets:
        cases, impl = (
            (GPU_CASES, "pallas_mosaic_gpu")
            if target in GPU_TARGETS
            else (
                TPU_CASES,
                "pallas_tpu",
            )
        )
        for case in cases:
            if name_filter in case.name:
                fn, args = case.build(impl)
                yield _row(case.name, target, compile_for(target, fn, *args))


def _model_rows(targets, name_filter):
    from pallax.bench.compile_cases import MODEL_CASES
    from pallax.testing import compile_for

    for case in MODEL_CASES:
        if case.chip in targets and name_filter in case.name:
            step, state, batch = case.build()
            result = compile_for(
                case.chip, step, state, batch, chips=case.chips, donate_argnums=(0,)
            )
            yield _row(case.name, f"{case.chip}-{case.chips}", result)


def _line(row: dict) -> str:
    if not row["ok"]:
        message = " | ".join(line for line in (row["error"] or "").splitlines()[:2] if line)
        return f"{row['case']:<58} {row['target']:<7} FAILED   {message[:240]}"
    mib = (row["total_bytes"] or 0) / 2**20
    text = f"{row['case']:<58} {row['target']:<7} ok {row['seconds']:6.1f}s {mib:10.1f} MiB/chip"
    for k in row["kernels"]:
        text += f"  [{k['name']}: {k['registers']} regs, {k['spill_bytes']} B spill, "
        text += f"{k['smem_bytes'] / 1024:.0f} KiB SMEM]"
    return text


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    rows = []
    parts = []
    if args.part in ("kernels", "all"):
        parts.append(_kernel_rows(args.targets, args.filter))
    if args.part in ("model", "all"):
        parts.append(_model_rows(args.targets, args.filter))
    for part in parts:
        for row in part:
            rows.append(row)
            print(_line(row), flush=True)
            if args.json:
                pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} compiled, {failed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
