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

import gc  # noqa: E402

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


def _memory_map_count() -> int | None:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return None


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code(request):
    """Frees each test module's compiled executables when the module ends.

    XLA:CPU keeps about three memory maps per cached executable. The whole suite compiles
    enough of them to pass Linux's default ``vm.max_map_count`` (65530); LLVM's JIT then
    fails to map code (a test error, then a segfault in the next compile). After clearing,
    a count still above half the limit means something keeps executables alive: say so here
    rather than crash later.
    """
    yield
    jax.clear_caches()
    gc.collect()
    count, limit = _memory_map_count(), _max_map_count()
    if count is not None and count > limit // 2:
        pytest.fail(f"{request.node.nodeid}: {count} memory maps remain after jax.clear_caches() "
                    f"(vm.max_map_count {limit}); compiled code is being kept alive")
