"""The FFI all-to-all backends (NCCL, one-sided NVLink) on real GPUs: ``pytest -m gpu``.

Everything is compared to the portable XLA path exactly: dispatch and
combine only move data, and combine sums each token's partial rows in the
same rank order, so equal bits are the bar (not a tolerance).
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

from moe_helpers import count_compiles, make_layer, make_spec, random_routing, random_tokens, run_layer
from test_dispatch import ROUTINGS, dyadic_tokens, random_slots, random_valid, random_weights
from wideep_jax import moe_forward
from wideep_jax.experts import shared_experts
from wideep_jax.comm import get_alltoall_backend, resolve_alltoall_backend
from wideep_jax.dispatch import make_dispatch_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2, reason="needs 2+ CUDA GPUs"),
]

BACKENDS = ["nccl", "nvlink"]
SPR = 3


def _ranks() -> list[int]:
    return sorted({2, min(4, jax.device_count())})


def _round_trip(backend_name: str, num_ranks: int, dtype, slots_per_rank: int = SPR, **grid):
    """``grid``: NvlinkAllToAll's max_ctas / send_ctas (nvlink only)."""
    mesh = jax.make_mesh((num_ranks,), ("ep",), devices=jax.devices()[:num_ranks])
    if grid:
        from wideep_jax.comm.nvlink import NvlinkAllToAll

        backend = NvlinkAllToAll(mesh, "ep", **grid)
    else:
        backend = get_alltoall_backend(backend_name, mesh=mesh, axis="ep")

    def body(x, slots, weights, valid):
        plan = make_dispatch_plan(slots, weights, valid, num_ranks=num_ranks, slots_per_rank=slots_per_rank)
        recv = backend.dispatch(x, plan, axis_name="ep")
        live = recv.valid_rows()
        pair_weight = jnp.where(recv.slot >= 0, recv.weight, 0.0).sum(-1)
        partial = jnp.where(live[:, :, None], recv.x * pair_weight[:, :, None].astype(x.dtype), 0)
        y = backend.combine(partial, plan, recv.count, axis_name="ep")
        # Padding rows are unspecified: zero them so outputs compare exactly.
        rx = jnp.where(live[:, :, None], recv.x, 0)
        return y, rx, recv.slot, recv.weight, recv.count

    spec = P("ep")
    return mesh, jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 5,
                                       check_vma=False))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_combine_equal_xla(rng, backend, dtype):
    """Random and adversarial routings (one slot, one rank, every rank, no valid token)."""
    tokens, top_k, hidden = 40, 4, 136  # hidden*2 bytes is not a multiple of 16 for bf16: odd rows
    for num_ranks in _ranks():
        mesh, fn = _round_trip(backend, num_ranks, dtype)
        _, ref = _round_trip("xla", num_ranks, dtype)
        sharding = NamedSharding(mesh, P("ep"))
        for mode in ROUTINGS:
            if mode == "every_rank" and top_k < num_ranks:
                continue
            x = dyadic_tokens(rng, (num_ranks * tokens, hidden)).astype(dtype)
            slots = np.concatenate([random_slots(rng, mode, tokens, top_k, num_ranks, SPR)
                                    for _ in range(num_ranks)])
            valid = np.concatenate([random_valid(rng, mode, tokens) for _ in range(num_ranks)])
            weights = random_weights(rng, slots.shape)
            args = [jax.device_put(jnp.asarray(a), sharding) for a in (x, slots, weights, valid)]
            got, want = fn(*args), ref(*args)
            for name, g, w in zip(("y", "x", "slot", "weight", "count"), got, want):
                assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   err_msg=f"{backend} R={num_ranks} {mode}: {name}")


@pytest.mark.parametrize("grid", [dict(max_ctas=2, send_ctas=1), dict(max_ctas=5, send_ctas=3),
                                  dict(send_ctas=120)])
def test_nvlink_small_and_lopsided_grids_equal_xla(rng, grid):
    """Few CTAs (each warp loops over many rows and pieces), or few receivers:
    every row still arrives, every sum in rank order, on 7168-wide and odd rows."""
    num_ranks = min(4, jax.device_count())
    top_k = 8
    spr = max(SPR, -(-top_k // num_ranks))
    for tokens, hidden, dtype in ((96, 7168, jnp.bfloat16), (40, 136, jnp.float32)):
        mesh, fn = _round_trip("nvlink", num_ranks, dtype, spr, **grid)
        _, ref = _round_trip("xla", num_ranks, dtype, spr)
        sharding = NamedSharding(mesh, P("ep"))
        for mode in ("random", "one_rank"):
            x = dyadic_tokens(rng, (num_ranks * tokens, hidden)).astype(dtype)
            slots = np.concatenate([random_slots(rng, mode, tokens, top_k, num_ranks, spr)
                                    for _ in range(num_ranks)])
            valid = np.ones(num_ranks * tokens, bool)
            weights = random_weights(rng, slots.shape)
            args = [jax.device_put(jnp.asarray(a), sharding) for a in (x, slots, weights, valid)]
            for name, g, w in zip(("y", "x", "slot", "weight", "count"), fn(*args), ref(*args)):
                assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   err_msg=f"{grid} {mode} hidden={hidden}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_7168_bf16_equal_xla(rng, backend):
    """DeepSeek-V3's row (7168 bf16) with top-8 over 4 ranks: the vectorised paths."""
    num_ranks = min(4, jax.device_count())
    tokens, top_k = 96, 8
    spr = max(SPR, -(-top_k // num_ranks))  # distinct slots per token need num_slots >= top_k
    mesh, fn = _round_trip(backend, num_ranks, jnp.bfloat16, spr)
    _, ref = _round_trip("xla", num_ranks, jnp.bfloat16, spr)
    sharding = NamedSharding(mesh, P("ep"))
    x = dyadic_tokens(rng, (num_ranks * tokens, 7168)).astype(jnp.bfloat16)
    slots = np.concatenate([random_slots(rng, "random", tokens, top_k, num_ranks, spr) for _ in range(num_ranks)])
    valid = np.ones(num_ranks * tokens, bool)
    weights = random_weights(rng, slots.shape)
    args = [jax.device_put(jnp.asarray(a), sharding) for a in (x, slots, weights, valid)]
    for g, w in zip(fn(*args), ref(*args)):
        assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64))


def _bf16_ulp(a):
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(a), 1e-30))) - 7)


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_layer_equal_across_backends(rng, backend, shared):
    """The whole layer (bf16, replicas, Pallas expert kernels) gives the same bits.

    With a shared expert, XLA autotunes the shared expert's GEMM separately in
    each program, so its bf16 output may differ by 1 ulp, rarely; added to the
    routed output (cancellation included), that moves the result by at most
    1 ulp of the shared output plus 1 ulp of the result."""
    ep = min(4, jax.device_count())
    spec = make_spec(kind="noaux_tc", top_k=8, shared=shared, hidden=512, inter=256, experts=64,
                     dtype=jnp.bfloat16)
    x = random_tokens(rng, 128 * ep, spec.hidden_size, jnp.bfloat16)
    routing = random_routing(rng, x.shape[0], spec.num_experts, spec.top_k)
    mask = jnp.asarray(rng.random(x.shape[0]) < 0.9)
    outs = {}
    for name in ("xla", backend):
        layer = make_layer(spec, ep=ep, alltoall_backend=name,
                           load_balancer={"num_slots": spec.num_experts + 2 * ep})
        outs[name], stats = run_layer(layer, x, token_mask=mask)
        outs[name + "_routed"], _ = run_layer(layer, x, routing=routing)
    if shared:
        w = layer.weights()
        shared_out = np.asarray(jax.jit(shared_experts)(x, w.shared_gate_up, w.shared_down), np.float32)
    for key in ("", "_routed"):
        got, want = np.asarray(outs[backend + key], np.float32), np.asarray(outs["xla" + key], np.float32)
        if not shared:
            assert_array_equal(got, want)
            continue
        tol = _bf16_ulp(want) + _bf16_ulp(2 * shared_out)  # 2x: ours may sit 1 ulp under a power of 2
        excess = np.abs(got - want) - tol
        assert np.all(excess <= 0), (f"{key or 'computed routing'}: {np.sum(excess > 0)} elements beyond "
                                     f"1 ulp + 1 shared ulp, worst at {np.unravel_index(np.argmax(excess), excess.shape)}")
        assert np.mean(got != want) < 1e-3
    assert int(stats.expert_counts.sum()) == int(mask.sum()) * spec.top_k


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_equal_xla(rng, backend):
    """custom_vjp: dispatch and combine transpose into each other (f32, exact bookkeeping)."""
    ep = min(4, jax.device_count())
    spec = make_spec(top_k=4, shared=0, hidden=64, inter=32, experts=16)
    x = random_tokens(rng, 32 * ep, spec.hidden_size)
    grads = {}
    for name in ("xla", backend):
        layer = make_layer(spec, ep=ep, alltoall_backend=name)
        w = layer.weights()
        loss = lambda w, x: jnp.sum(moe_forward(x, w, spec=spec, config=layer.config, mesh=layer.mesh)[0] ** 2)
        with jax.default_matmul_precision("highest"):
            grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(w, x)
    g, want = grads[backend], grads["xla"]
    # Sums over ranks run in another order than XLA's scatter-add transpose: f32 rounding only.
    np.testing.assert_allclose(np.asarray(g[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-5)
    for field in ("router", "w_gate_up", "w_down"):
        np.testing.assert_allclose(np.asarray(getattr(g[0], field)), np.asarray(getattr(want[0], field)),
                                   rtol=1e-4, atol=1e-5, err_msg=field)


@pytest.mark.parametrize("backend", BACKENDS)
def test_1000_calls_with_collectives_around(rng, backend):
    """1000 back-to-back dispatch+combine inside one jit (a fori_loop), between psums and an
    all_gather; then 50 more from Python. No deadlock, same result as XLA, no recompilation."""
    num_ranks = min(4, jax.device_count())
    tokens, top_k, hidden = 64, 4, 256

    def make(name):
        mesh = jax.make_mesh((num_ranks,), ("ep",), devices=jax.devices()[:num_ranks])
        comm = get_alltoall_backend(name, mesh=mesh, axis="ep")

        def body(x, slots, weights):
            valid = jnp.ones(x.shape[:1], bool)
            plan = make_dispatch_plan(slots, weights, valid, num_ranks=num_ranks, slots_per_rank=SPR)
            x = x + jax.lax.psum(x[:1], "ep") * 0  # a collective before

            def step(i, acc):
                recv = comm.dispatch(acc.astype(jnp.bfloat16), plan, axis_name="ep")
                partial = jnp.where(recv.valid_rows()[:, :, None], recv.x, 0)
                y = comm.combine(partial, plan, recv.count, axis_name="ep")
                # Normalise by the number of ranks each token reached, so values stay put.
                reached = (plan.token_row >= 0).sum(-1, keepdims=True).astype(jnp.float32)
                return y / jnp.maximum(reached, 1) + jax.lax.psum(i, "ep").astype(jnp.float32) * 0

            out = jax.lax.fori_loop(0, 1000, step, x.astype(jnp.float32))
            return out, jax.lax.all_gather(out.sum(), "ep")  # a collective after

        spec = P("ep")
        return mesh, jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, P()),
                                           check_vma=False))

    mesh, fn = make(backend)
    _, ref = make("xla")
    sharding = NamedSharding(mesh, P("ep"))
    x = dyadic_tokens(rng, (num_ranks * tokens, hidden))
    slots = np.concatenate([random_slots(rng, "random", tokens, top_k, num_ranks, SPR) for _ in range(num_ranks)])
    weights = random_weights(rng, slots.shape)
    args = [jax.device_put(jnp.asarray(a), sharding) for a in (x, slots, weights)]
    got, want = fn(*args), ref(*args)
    assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert_array_equal(np.asarray(got[0]), np.asarray(x, np.float32).astype(jnp.bfloat16).astype(np.float32))
    with count_compiles() as compiles:
        for _ in range(50):
            out = fn(*args)
        jax.block_until_ready(out)
    assert compiles[0] == 0
    assert_array_equal(np.asarray(out[0]), np.asarray(want[0]))


def test_auto_picks_nvlink_in_one_process(monkeypatch):
    mesh = jax.make_mesh((2,), ("ep",), devices=jax.devices()[:2])
    monkeypatch.delenv("WIDEEP_ALLTOALL", raising=False)
    assert resolve_alltoall_backend("auto", mesh, "ep") == "nvlink"
    monkeypatch.setenv("WIDEEP_ALLTOALL", "nccl")
    assert resolve_alltoall_backend("auto", mesh, "ep") == "nccl"
    assert resolve_alltoall_backend("nvlink", mesh, "ep") == "nccl"


def test_nvlink_timeout_is_an_error_not_a_hang():
    """A rank whose peer never arrives aborts with a message after WIDEEP_COMM_TIMEOUT_S."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from wideep_jax.comm import get_alltoall_backend
        from wideep_jax.dispatch import make_dispatch_plan
        mesh = jax.make_mesh((2,), ("ep",), devices=jax.devices()[:2])
        comm = get_alltoall_backend("nvlink", mesh=mesh, axis="ep")
        def lonely(x):  # rank 0 alone: rank 1 never joins
            plan = make_dispatch_plan(jnp.zeros((8, 2), jnp.int32) + 1, jnp.ones((8, 2)), jnp.ones(8, bool),
                                      num_ranks=2, slots_per_rank=1)
            return comm._dispatch(x, plan)[0]  # the custom call itself: no EP axis is bound here
        x = jax.device_put(jnp.ones((8, 64), jnp.bfloat16), jax.devices()[0])
        out = jax.jit(lonely)(x)
        print("value", float(out.sum()))
    """)
    env = dict(os.environ, WIDEEP_COMM_TIMEOUT_S="2", WIDEEP_ALLTOALL="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "timed out" in text, text[-3000:]


def test_nccl_timeout_is_an_error_not_a_hang():
    """NCCL's host wait for the row counts is bounded too: after one call of both ranks
    (connections made), rank 0 alone fails after WIDEEP_COMM_TIMEOUT_S, and the aborted
    communicator refuses later calls instead of hanging."""
    script = textwrap.dedent("""
        import time
        import jax, jax.numpy as jnp
        from jax.sharding import PartitionSpec as P
        from wideep_jax.comm import get_alltoall_backend
        from wideep_jax.dispatch import make_dispatch_plan
        mesh = jax.make_mesh((2,), ("ep",), devices=jax.devices()[:2])
        comm = get_alltoall_backend("nccl", mesh=mesh, axis="ep")
        def body(x):
            plan = make_dispatch_plan(jnp.zeros((8, 2), jnp.int32) + 1, jnp.ones((8, 2)), jnp.ones(8, bool),
                                      num_ranks=2, slots_per_rank=1)
            return comm._dispatch(x, plan)[0]  # the custom call itself: no EP axis is bound in `lonely`
        both = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), check_vma=False))
        x = jax.device_put(jnp.ones((16, 64), jnp.bfloat16), jax.sharding.NamedSharding(mesh, P("ep")))
        print("both", float(both(x).astype(jnp.float32).sum()), flush=True)
        lonely = jax.jit(body)  # rank 0 alone: rank 1 never joins
        x0 = jax.device_put(jnp.ones((8, 64), jnp.bfloat16), jax.devices()[0])
        for attempt in range(2):
            start = time.time()
            try:
                print("value", float(lonely(x0).astype(jnp.float32).sum()), flush=True)
            except Exception as e:
                print(f"ERROR{attempt} after {time.time() - start:.1f} s:", str(e).replace(chr(10), " ")[-600:], flush=True)
    """)
    env = dict(os.environ, WIDEEP_COMM_TIMEOUT_S="2", WIDEEP_ALLTOALL="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    text = proc.stdout + proc.stderr
    assert "both " in text and "value" not in text, text[-3000:]
    first = next(line for line in text.splitlines() if line.startswith("ERROR0"))
    assert "timed out after 2000 ms" in first and "rank 0 of 2" in first, text[-3000:]
    assert float(first.split()[2]) < 60, first
    second = next(line for line in text.splitlines() if line.startswith("ERROR1"))
    assert "was aborted" in second, text[-3000:]


def test_nvlink_inside_xla_command_buffers_equal_xla(tmp_path):
    """The nvlink handlers are marked command-buffer compatible (counts and the call
    number live on the device): with custom calls captured into CUDA graphs, replays
    with new routing each time still equal the portable path bit for bit. XLA turns
    thunks into command buffers after HLO, so the capture is read from its thunk dump."""
    script = textwrap.dedent(r"""
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from wideep_jax.comm import get_alltoall_backend
        from wideep_jax.dispatch import make_dispatch_plan
        n = min(4, jax.device_count())
        mesh = jax.make_mesh((n,), ("ep",), devices=jax.devices()[:n])
        tokens, hidden, top_k, per_rank = 64, 256, 4, 8
        def program(name):
            comm = get_alltoall_backend(name, mesh=mesh, axis="ep")
            def body(x, slots, w):
                plan = make_dispatch_plan(slots, w, jnp.ones(slots.shape[:1], bool), num_ranks=n,
                                          slots_per_rank=per_rank)
                y = jnp.zeros(x.shape, jnp.float32)
                for _ in range(3):  # several calls per replay: halves alternate inside one graph
                    recv = comm.dispatch(x, plan, axis_name="ep")
                    y = y + comm.combine(recv.x, plan, recv.count, axis_name="ep")
                    x = (x.astype(jnp.float32) * 0.5).astype(x.dtype)
                return y
            tok = P("ep")
            return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok), out_specs=tok,
                                         check_vma=False))
        sharding = NamedSharding(mesh, P("ep"))
        fns = {name: program(name) for name in ("xla", "nvlink")}
        rng = np.random.default_rng()
        for step in range(6):
            x = rng.standard_normal((n * tokens, hidden)).astype(jnp.bfloat16)
            slots = rng.integers(0, n * per_rank, size=(n * tokens, top_k)).astype(np.int32)
            if step == 3:
                slots[:] = 0  # everything to one slot on rank 0
            w = rng.random((n * tokens, top_k)).astype(np.float32)
            args = [jax.device_put(a, sharding) for a in (x, slots, w)]
            got, want = (np.asarray(fns[k](*args)) for k in ("nvlink", "xla"))
            print("step", step, "equal", bool(np.array_equal(got, want)))
    """)
    dump = tmp_path / "xla_dump"
    flags = f"--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1 --xla_dump_to={dump}"
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(), WIDEEP_ALLTOALL="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert proc.stdout.count("equal True") == 6, text[-3000:]
    # The program's thunks after XLA's passes: the nvlink one has 6 more custom calls
    # (3 dispatches, 3 combines) than the xla one, and they sit inside a command buffer.
    sequences = sorted(dump.glob("*thunk_sequence_after_thunk_passes*.txt"))
    counts = [_custom_calls(path.read_text()) for path in sequences]
    assert len(counts) >= 2, f"thunk dumps: {[p.name for p in sequences]}"
    (nvlink_total, nvlink_nested), (xla_total, _) = sorted(counts, reverse=True)[:2]
    assert nvlink_total - xla_total == 6, counts
    assert nvlink_nested >= 6, (counts, max(sequences, key=lambda p: _custom_calls(p.read_text())).read_text()[:3000])


def _custom_calls(thunk_sequence: str) -> tuple[int, int]:
    """(custom-call thunks, those nested in a command buffer) of an XLA thunk-sequence dump."""
    total = nested = 0
    buffer_indent = None  # indentation of the command buffer whose body we are in
    for line in thunk_sequence.splitlines():
        indent = len(line) - len(line.lstrip())
        if buffer_indent is not None and indent <= buffer_indent:
            buffer_indent = None
        if "kCommandBuffer" in line and buffer_indent is None:
            buffer_indent = indent
        elif "kCustomCall" in line:
            total += 1
            nested += buffer_indent is not None
    return total, nested


def test_nvlink_trace_matches_profile(rng):
    """The kernels' per-call trace: one row of stamps per call since the reset, in call
    order, every stamp inside its call, durations (start to end) summing exactly to the
    profile's kernel time; the ring keeps the last nvlink_trace_calls() calls when more ran."""
    from wideep_jax.comm import ffi_lib
    from wideep_jax.comm.nvlink import NvlinkAllToAll

    num_ranks, tokens, top_k, hidden = 2, 32, 4, 256
    mesh = jax.make_mesh((num_ranks,), ("ep",), devices=jax.devices()[:num_ranks])
    comm = NvlinkAllToAll(mesh, "ep")

    def body(x, slots, weights):
        plan = make_dispatch_plan(slots, weights, jnp.ones(x.shape[:1], bool), num_ranks=num_ranks,
                                  slots_per_rank=SPR)
        recv = comm.dispatch(x, plan, axis_name="ep")
        return comm.combine(jnp.where(recv.valid_rows()[:, :, None], recv.x, 0), plan, recv.count, axis_name="ep")

    spec = P("ep")
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False))
    sharding = NamedSharding(mesh, spec)
    x = dyadic_tokens(rng, (num_ranks * tokens, hidden))
    slots = np.concatenate([random_slots(rng, "random", tokens, top_k, num_ranks, SPR) for _ in range(num_ranks)])
    args = [jax.device_put(jnp.asarray(a), sharding) for a in (x, slots, random_weights(rng, slots.shape))]
    jax.block_until_ready(fn(*args))
    for calls in (5, ffi_lib.nvlink_trace_calls() + 7):
        for ws in comm.workspaces:
            for d in mesh.devices.flat:
                ffi_lib.nvlink_profile(ws, d, reset=True)
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        for ws in comm.workspaces:
            for d in mesh.devices.flat:
                prof = ffi_lib.nvlink_profile(ws, d)
                for op in ("dispatch", "combine"):
                    if not prof[op + "_calls"]:
                        continue
                    assert prof[op + "_calls"] == calls
                    trace = ffi_lib.nvlink_trace(ws, d, op).astype(np.int64)
                    assert trace.shape == (min(calls, ffi_lib.nvlink_trace_calls()),
                                           len(ffi_lib.NVLINK_TRACE_STAMPS))
                    start, end = trace[:, 0], trace[:, -1]
                    for inner in trace[:, 1:-1].T:  # last CTA's start, peers seen, senders done
                        assert ((inner >= start) & (inner <= end)).all(), (op, trace)
                    assert (start[1:] >= end[:-1]).all(), "calls overlap or out of order"
                    if calls <= ffi_lib.nvlink_trace_calls():  # the profile's sum, to the nanosecond
                        total = (end - start).sum() / 1e3 / calls
                        assert abs(total - prof[op + "_us"]) < 1e-6, (total, prof[op + "_us"])
