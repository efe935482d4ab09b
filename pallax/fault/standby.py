"""A hot-standby worker: ``python -m pallax.fault.standby``.

Imports Python, JAX, Optax, Orbax and pallax (without starting a JAX backend),
then waits on stdin for one JSON assignment ``{"env": {...}, "argv": [...],
"log": path}`` from the supervisor and becomes that worker of ``pallax.train``.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    import jax
    import jax.numpy  # noqa: F401
    import numpy  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401

    import pallax.fault
    import pallax.model.train
    import pallax.train

    line = sys.stdin.readline()
    if not line:
        return 0  # the supervisor ended without needing this standby
    assignment = json.loads(line)
    os.environ.update(assignment["env"])
    log = os.open(assignment["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    return pallax.train.main(assignment["argv"])


if __name__ == "__main__":
    sys.exit(main())
