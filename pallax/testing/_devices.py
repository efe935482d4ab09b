"""Fresh processes with simulated CPU devices.

The number of CPU devices is fixed when JAX's CPU backend starts, so a test
that needs a different count (or several ``jax.distributed`` processes) runs
its code in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_with_cpu_devices(
    code: str, *, num_devices: int = 8, timeout: float = 300.0, env: dict[str, str] | None = None
) -> str:
    """Runs ``code`` in a new Python process that sees ``num_devices`` CPU devices.

    Returns the process's stdout; raises AssertionError with its stderr when it fails.
    """
    child_env = {**os.environ, **(env or {})}
    flags = child_env.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "force_host_platform_device_count" not in f)
    child_env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}"
    child_env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"subprocess exited with {result.returncode}\n--- stdout\n{result.stdout}"
            f"\n--- stderr\n{result.stderr}"
        )
    return result.stdout
