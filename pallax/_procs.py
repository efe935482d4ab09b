"""Local CPU processes for jax.distributed jobs: a free coordinator port and the
environment of a child process (imports nothing from pallax)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_child_env(extra: dict[str, str] | None = None, *, num_devices: int | None = None):
    """This process's environment for a CPU-only child, plus ``extra``.

    A forced host device count is dropped (the child sets its own through
    ``jax_num_cpu_devices``) or, with ``num_devices``, replaced by that count.
    """
    env = {**os.environ, **(extra or {}), "JAX_PLATFORMS": "cpu"}
    flags = [
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    ]
    if num_devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env
