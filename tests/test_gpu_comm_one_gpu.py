"""The FFI backends (NCCL, NVLink) with one rank on one GPU: ``pytest -m gpu``.

One rank runs both handlers' whole host side (shape checks, an NCCL group with
a send/receive to itself, the peer-mapped workspace) and the NVLink kernels'
own-rank paths, and it runs where only one GPU is lent; the peer paths need
test_gpu_comm.py's 2+ GPUs. Results equal the portable path's bits.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from numpy.testing import assert_array_equal

from moe_helpers import make_layer, make_spec, random_routing, random_tokens, run_layer
from test_dispatch import ROUTINGS, dyadic_tokens, random_slots, random_valid, random_weights
from test_gpu_comm import SPR, _round_trip
from wideep_jax import moe_forward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
]

BACKENDS = ["nccl", "nvlink"]


def _args(rng, mesh, tokens, hidden, top_k, mode, dtype):
    sharding = NamedSharding(mesh, P("ep"))
    x = dyadic_tokens(rng, (tokens, hidden)).astype(dtype)
    slots = random_slots(rng, mode, tokens, top_k, 1, SPR)
    valid = random_valid(rng, mode, tokens)
    weights = random_weights(rng, slots.shape)
    return [jax.device_put(jnp.asarray(a), sharding) for a in (x, slots, weights, valid)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_rank_dispatch_combine_equal_xla(rng, backend, dtype):
    """Random and adversarial routings; odd rows (136 bf16 = 272 bytes) and 7168-wide ones."""
    mesh, fn = _round_trip(backend, 1, dtype)
    _, ref = _round_trip("xla", 1, dtype)
    for tokens, hidden in ((40, 136), (96, 7168)):
        for mode in ROUTINGS:
            args = _args(rng, mesh, tokens, hidden, 3, mode, dtype)
            for _ in range(2):  # a second call reuses the workspace / communicator
                for name, g, w in zip(("y", "x", "slot", "weight", "count"), fn(*args), ref(*args)):
                    assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                       err_msg=f"{backend} {mode} hidden={hidden}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens, hidden", [(0, 64), (6, 0)])
def test_one_rank_empty_tokens_or_rows_match_xla(rng, backend, tokens, hidden):
    """No tokens or no hidden bytes: nothing moves, counts / slots / weights are the portable path's."""
    mesh, fn = _round_trip(backend, 1, jnp.float32)
    _, ref = _round_trip("xla", 1, jnp.float32)
    args = _args(rng, mesh, tokens, hidden, 2, "random", jnp.float32)
    for _ in range(3):  # the garbage a skipped write leaves shows on reuse
        for got, want in zip(fn(*args), ref(*args)):
            assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_rank_moe_layer_and_gradients_equal_xla(rng, backend):
    """The whole layer (bf16, Pallas expert kernels, replicas) named onto the backend at EP1
    gives the portable path's bits; its f32 gradients (dispatch's backward: two combines,
    ordered) equal them up to f32 rounding."""
    spec = make_spec(kind="noaux_tc", top_k=8, shared=0, hidden=512, inter=256, experts=64, dtype=jnp.bfloat16)
    x = random_tokens(rng, 128, spec.hidden_size, jnp.bfloat16)
    routing = random_routing(rng, x.shape[0], spec.num_experts, spec.top_k)
    outs = {}
    for name in ("xla", backend):
        layer = make_layer(spec, ep=1, alltoall_backend=name, load_balancer={"num_slots": spec.num_experts + 2})
        outs[name] = [np.asarray(run_layer(layer, x, routing=r)[0], np.float32) for r in (None, routing)]
    for got, want in zip(outs[backend], outs["xla"]):
        assert_array_equal(got, want)

    spec = make_spec(top_k=4, shared=0, hidden=64, inter=32, experts=16)
    x = random_tokens(rng, 32, spec.hidden_size)
    grads = {}
    for name in ("xla", backend):
        layer = make_layer(spec, ep=1, alltoall_backend=name)
        loss = lambda w, x: jnp.sum(moe_forward(x, w, spec=spec, config=layer.config, mesh=layer.mesh)[0] ** 2)
        with jax.default_matmul_precision("highest"):
            grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(layer.weights(), x)
    np.testing.assert_allclose(np.asarray(grads[backend][1]), np.asarray(grads["xla"][1]), rtol=1e-4, atol=1e-5)
    for field in ("router", "w_gate_up", "w_down"):
        np.testing.assert_allclose(np.asarray(getattr(grads[backend][0], field)),
                                   np.asarray(getattr(grads["xla"][0], field)), rtol=1e-4, atol=1e-5, err_msg=field)


def _dispatch_operands(backend, capacity=4, hidden=8, top_k=2):
    """A one-rank plan's operands in the layout ``backend``'s dispatch handler takes."""
    send_token = jnp.zeros((1, capacity), jnp.int32)
    send_count = jnp.full((1,), capacity, jnp.int32)
    send_slot = jnp.zeros((1, capacity, top_k), jnp.int32)
    send_weight = jnp.ones((1, capacity, top_k), jnp.float32)
    if backend == "nccl":
        send_meta = jnp.concatenate([send_slot, send_slot], axis=-1)
        return (jnp.ones((1, capacity, hidden), jnp.float32), send_meta, send_count)
    return (jnp.ones((capacity, hidden), jnp.float32), send_token, send_count, send_slot, send_weight)


def _call(backend, target, out_types, *operands):
    from wideep_jax.comm import ffi_lib
    from wideep_jax.comm.ffi_primitive import ordered_ffi_call

    groups = [[jax.devices()[0]]]
    if backend == "nccl":
        attrs = dict(comm=np.int64(ffi_lib.nccl_communicators(groups)), timeout_ms=np.int64(10_000))
    else:
        attrs = dict(workspace=np.int64(ffi_lib.nvlink_workspace(groups, 1 << 20)), timeout_ms=np.int64(10_000),
                     max_ctas=np.int64(0), send_ctas=np.int64(0))
    fn = jax.jit(lambda *ops: ordered_ffi_call(f"wideep_{backend}_{target}", out_types, *ops, **attrs))
    return jax.block_until_ready(fn(*operands))


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("case", ["nccl x", "nccl meta", "nccl count", "nccl x dtype",
                                  "nvlink x", "nvlink slot", "nvlink weight", "nvlink count", "nvlink x dtype"])
def test_dispatch_outputs_of_the_wrong_shape_are_refused(case):
    """The handlers write as many rows as the inputs hold: a smaller output is an error
    naming it, its shape and the allowed one (it was overrun)."""
    backend, what = case.split(" ", 1)
    ops = _dispatch_operands(backend)
    if backend == "nccl":
        outs = {"x": S((1, 4, 8), jnp.float32), "meta": S((1, 4, 4), jnp.int32), "count": S((1,), jnp.int32)}
    else:
        outs = {"x": S((1, 4, 8), jnp.float32), "slot": S((1, 4, 2), jnp.int32),
                "weight": S((1, 4, 2), jnp.float32), "count": S((1,), jnp.int32)}
    _call(backend, "dispatch", tuple(outs.values()), *ops)  # the right shapes run
    if what == "x dtype":
        outs["x"] = S((1, 4, 8), jnp.bfloat16)
        expected = "output recv_x's dtype differs"
    else:
        good = outs[what]
        outs[what] = S(good.shape[:-1] + (good.shape[-1] + 1,), good.dtype)
        name = "recv_" + what
        expected = (f"output {name} is [{', '.join(map(str, outs[what].shape))}]; "
                    f"allowed: [{', '.join(map(str, good.shape))}]")
    with pytest.raises(Exception, match=expected.replace("[", r"\[").replace("]", r"\]")):
        _call(backend, "dispatch", tuple(outs.values()), *ops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_output_of_the_wrong_shape_is_refused(backend):
    partial = jnp.ones((1, 4, 8), jnp.float32)
    rows = jnp.full((1,), 4, jnp.int32)
    if backend == "nccl":
        ops, good, bad = (partial, rows, rows), S((1, 4, 8), jnp.float32), S((1, 3, 8), jnp.float32)
        expected = r"output back is \[1, 3, 8\]; allowed: \[1, 4, 8\]"
    else:
        token_row = jnp.arange(4, dtype=jnp.int32)[:, None]
        ops, good, bad = (partial, rows, token_row), S((4, 8), jnp.float32), S((4, 7), jnp.float32)
        expected = r"output y is \[4, 7\]; allowed: \[4, 8\]"
    _call(backend, "combine", (good,), *ops)
    with pytest.raises(Exception, match=expected):
        _call(backend, "combine", (bad,), *ops)


def test_nccl_count_past_capacity_is_an_error_and_the_communicator_survives(rng):
    """NCCL reads the counts on the host: a count past the capacity is an error naming it
    (the exchange still runs clamped, so peers do not hang) and later calls work."""
    from wideep_jax.comm import get_alltoall_backend
    from wideep_jax.dispatch import make_dispatch_plan

    mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])
    comm = get_alltoall_backend("nccl", mesh=mesh, axis="ep")

    def body(x, extra):
        plan = make_dispatch_plan(jnp.zeros((8, 2), jnp.int32) + jnp.array([0, 1]), jnp.ones((8, 2)),
                                  jnp.ones(8, bool), num_ranks=1, slots_per_rank=2)
        plan = plan._replace(send_count=plan.send_count + extra)
        return comm.dispatch(x, plan, axis_name="ep").x

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), P()), out_specs=P("ep"), check_vma=False))
    x = jax.device_put(dyadic_tokens(rng, (8, 64)), NamedSharding(mesh, P("ep")))
    with pytest.raises(Exception, match=r"row count 9 is outside \[0, capacity=8\]"):
        jax.block_until_ready(fn(x, 1))
    assert_array_equal(np.asarray(fn(x, 0))[0], np.asarray(x))


_TRAP_SCRIPT = """
import jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from wideep_jax.comm import get_alltoall_backend
from wideep_jax.dispatch import make_dispatch_plan
mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])
comm = get_alltoall_backend("nvlink", mesh=mesh, axis="ep")
CASE = {case!r}
def body(x):
    plan = make_dispatch_plan(jnp.zeros((8, 2), jnp.int32) + jnp.array([0, 1]), jnp.ones((8, 2)),
                              jnp.ones(8, bool), num_ranks=1, slots_per_rank=2)
    if CASE == "count":
        plan = plan._replace(send_count=plan.send_count + 1)
    if CASE == "token":
        plan = plan._replace(send_token=plan.send_token.at[0, 3].set(8))
    recv = comm.dispatch(x, plan, axis_name="ep")
    if CASE == "row":
        plan = plan._replace(token_row=plan.token_row.at[5, 0].set(8))
    return comm.combine(recv.x, plan, recv.count, axis_name="ep")
fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), check_vma=False))
x = jax.device_put(jnp.ones((8, 64), jnp.bfloat16), jax.sharding.NamedSharding(mesh, P("ep")))
print("value", float(fn(x).sum()), flush=True)
"""


@pytest.mark.parametrize("case, expected", [
    ("count", "got a row count to receive 9; allowed: 0..8"),
    ("token", "got a token index 8; allowed: 0..7"),
    ("row", "got a token's row 8; allowed: -1..7"),
])
def test_nvlink_plan_index_out_of_range_stops_with_a_message(case, expected):
    """The NVLink kernels read counts and rows on the device: one outside its range stops
    the kernel at once with a message (it read and wrote past its buffers before)."""
    env = dict(os.environ, WIDEEP_COMM_TIMEOUT_S="20", WIDEEP_ALLTOALL="")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_TRAP_SCRIPT.format(case=case))],
                          capture_output=True, text=True, timeout=240, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "value" not in proc.stdout, text[-3000:]
    assert expected in text, text[-3000:]
