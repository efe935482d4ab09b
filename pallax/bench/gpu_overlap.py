"""Compiles the ring all-gather-matmul for a mocked 8-GPU topology and records how
the GPU scheduler brackets dots between collective-permute-start and -done.

Run on a machine with one NVIDIA GPU (gpu_check.sh does):
    python -m pallax.bench.gpu_overlap --json OUT.json
JAX's mock NCCL mode makes one GPU stand in for a multi-device topology at
compile time; nothing is executed. Not run in CI (no GPU there).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pallax.bench.gpu_overlap")
    parser.add_argument("--topology", default="1x1x8", help="slices x hosts x devices per host")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_mock_gpu_topology", args.topology)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from pallax.collectives import bracketed_dots, collective_matmul, overlap_report

    result: dict = {"topology": args.topology}
    try:
        devices = jax.devices()
        result["devices"] = len(devices)
        result["device_kind"] = devices[0].device_kind
        mesh = Mesh(np.asarray(devices[:8]), ("x",), axis_types=(AxisType.Auto,))
        x = jax.ShapeDtypeStruct((8 * 1024, 4096), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((4096, 8 * 2048), jnp.bfloat16)
        for name, bidi in (("ring", False), ("ring_bidirectional", True)):
            compiled = (
                jax.jit(
                    lambda x, w, b=bidi: collective_matmul(
                        x, w, mesh=mesh, axis="x", bidirectional=b
                    )
                )
                .lower(x, w)
                .compile()
            )
            text = compiled.as_text()
            result[name] = {
                "bracketed_dots": bracketed_dots(text),
                "overlappable": overlap_report(text).num_overlappable,
            }
    except Exception as e:  # recorded, not hidden: the note says what happened
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
