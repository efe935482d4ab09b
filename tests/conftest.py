"""Test set-up: hypothesis profiles, 8 simulated CPU devices, hardware markers."""

from __future__ import annotations

import os
import pathlib


def _has_accelerator() -> bool:
    return any(pathlib.Path("/dev").glob("nvidia[0-9]*")) or any(
        pathlib.Path("/dev").glob("accel*")
    )


# On a host without an accelerator, JAX must not try libtpu or the CUDA plugin
# (both installed for the compile suite); the compile-only targets need it too.
if "JAX_PLATFORMS" not in os.environ and not _has_accelerator():
    os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Fixed before JAX's CPU backend starts; single-device tests still use device 0.
jax.config.update("jax_num_cpu_devices", 8)

# Kernel examples compile a new program per shape, so examples are few and slow.
settings.register_profile(
    "ci",
    max_examples=6,
    deadline=None,
    derandomize=True,  # the same examples on every CI run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_platform(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    # `-m gpu` / `-m tpu` select hardware tests; on a machine without the hardware
    # they would only fail, so say so plainly.
    for item in items:
        for platform in ("gpu", "tpu"):
            if platform in item.keywords and not _has_platform(platform):
                item.add_marker(pytest.mark.skip(reason=f"needs a real {platform.upper()}"))


@pytest.fixture(scope="session")
def cpu_devices():
    """The 8 simulated CPU devices."""
    devices = jax.devices("cpu")
    assert len(devices) >= 8, f"expected 8 simulated CPU devices, got {len(devices)}"
    return devices[:8]
