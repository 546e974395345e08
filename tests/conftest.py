"""Test set-up: 8 emulated CPU devices, set before jax is imported anywhere.

GPU tests (marked ``gpu``) are run on a GPU machine with ``pytest -m gpu``; there
the real devices are used and the CPU flag below is left out.
"""
import os
import sys

if "-m" not in sys.argv or "gpu" not in " ".join(sys.argv):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    """A fresh NumPy generator per test; the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)
