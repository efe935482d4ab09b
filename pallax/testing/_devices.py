"""Fresh processes with simulated CPU devices.

The number of CPU devices is fixed when JAX's CPU backend starts, so a test
that needs a different count (or several ``jax.distributed`` processes) runs
its code in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pallax._procs import cpu_child_env, free_port


def run_with_cpu_devices(
    code: str, *, num_devices: int = 8, timeout: float = 300.0, env: dict[str, str] | None = None
) -> str:
    """Runs ``code`` in a new Python process that sees ``num_devices`` CPU devices.

    Returns the process's stdout; raises AssertionError with its stderr when it fails.
    """
    child_env = cpu_child_env(env, num_devices=num_devices)
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


# Prepended to each process's code by run_processes.
_DISTRIBUTED_PRELUDE = """
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", {devices_per_process})
jax.distributed.initialize(
    coordinator_address="127.0.0.1:{port}", num_processes={num_processes}, process_id={process_id}
)
"""


def run_processes(
    code: str, *, num_processes: int = 2, devices_per_process: int = 2, timeout: float = 300.0
) -> list[str]:
    """Runs ``code`` in ``num_processes`` local processes joined by ``jax.distributed``.

    The coordinator listens on 127.0.0.1; CPU collectives use gloo. Each process
    sees ``devices_per_process`` local CPU devices and all of them globally.
    Returns each process's stdout (in process order); raises AssertionError with
    the failing processes' stderr.
    """
    port = free_port()
    env = cpu_child_env()
    procs = []
    for pid in range(num_processes):
        prelude = _DISTRIBUTED_PRELUDE.format(
            devices_per_process=devices_per_process,
            port=port,
            num_processes=num_processes,
            process_id=pid,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", prelude + textwrap.dedent(code)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    outputs, failures = [], []
    for pid, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"process {pid} timed out after {timeout}s") from None
        outputs.append(out)
        if proc.returncode != 0:
            failures.append(f"--- process {pid} exited with {proc.returncode}\n{err[-4000:]}")
    if failures:
        raise AssertionError("\n".join(failures))
    return outputs
