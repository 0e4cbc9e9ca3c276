"""Test harness: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {len(devs)}"
    return devs


def _has_platform(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip where JAX sees no GPU. The suite pins JAX to the 8 fake CPU
    devices; on a GPU host run them with ``JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu``."""
    if _has_platform("gpu"):
        return
    skip = pytest.mark.skip(reason="needs a GPU: JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
