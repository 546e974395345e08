"""The NCCL backend across processes (``jax.distributed``, one GPU per process): ``pytest -m gpu``.

Each worker owns one GPU; the EP group spans both processes, so ``auto`` must
pick ``nccl`` and the communicators' unique id travels through the
distributed key-value store. The layer's output must equal the portable
path's bit for bit on every process's shard. A second test runs
tests/multiprocess_child.py on the GPUs: the layer against the dense
reference and the online balancer in every re-sharding mode across processes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import pytest
from process_helpers import child_env, free_port, run_processes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2, reason="needs 2+ CUDA GPUs"),
]

WORKER = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
pid, port, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid)
from moe_helpers import make_layer, make_spec, run_layer
from wideep_jax.comm import resolve_alltoall_backend

mesh = jax.make_mesh((n,), ("ep",), devices=jax.devices()[:n])
assert resolve_alltoall_backend("auto", mesh, "ep") == "nccl"
spec = make_spec(top_k=4, hidden=256, inter=128, experts=16, dtype=jnp.bfloat16)
x_host = np.random.default_rng(0).standard_normal((64 * n, 256)).astype(jnp.bfloat16)
outs = {}
for name in ("xla", "nccl"):
    layer = make_layer(spec, ep=n, alltoall_backend=name)
    sharding = NamedSharding(layer.mesh, P("ep"))
    x = jax.make_array_from_callback(x_host.shape, sharding, lambda index: x_host[index])
    for _ in range(20):  # repeated calls: no deadlock across processes
        y, stats = run_layer(layer, x)
    outs[name] = [np.asarray(s.data, np.float32) for s in y.addressable_shards]
    assert int(stats.expert_counts.sum()) == x_host.shape[0] * spec.top_k
for a, b in zip(outs["xla"], outs["nccl"]):
    np.testing.assert_array_equal(a, b)
print("WORKER OK", pid, flush=True)
jax.distributed.shutdown()
"""


TESTS = Path(__file__).resolve().parent


def _run_on_two_gpus(args_of_pid, timeout: float) -> list[str]:
    """Runs ``python *args_of_pid(pid, port)`` for pid 0 and 1, one GPU each; returns their
    stdout (see :func:`run_processes`: a failing or hung process fails the test)."""
    port = free_port()
    envs = [child_env(CUDA_VISIBLE_DEVICES=str(pid), XLA_PYTHON_CLIENT_MEM_FRACTION="0.1") for pid in range(2)]
    return run_processes([[sys.executable, *args_of_pid(pid, port)] for pid in range(2)], envs, timeout=timeout)


def test_nccl_backend_across_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = _run_on_two_gpus(lambda pid, port: [str(script), str(pid), str(port), "2"], timeout=300)
    for pid, out in enumerate(outs):
        assert f"WORKER OK {pid}" in out, out[-3000:]


def test_layer_and_online_eplb_across_two_gpu_processes(tmp_path):
    """tests/multiprocess_child.py with one GPU per process (EP2, ``auto`` = ``nccl``):
    the host master copy lands in pinned_host memory across processes."""
    seed = int.from_bytes(os.urandom(4), "little") % 2**31
    print(f"seed {seed}")
    outs = _run_on_two_gpus(lambda pid, port: [str(TESTS / "multiprocess_child.py"), str(pid), "2", str(port),
                                                str(tmp_path), str(seed), "gpu"], timeout=400)
    for pid, out in enumerate(outs):
        assert f"OK <{pid}>" in out, out[-3000:]
