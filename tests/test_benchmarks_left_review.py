"""Review of the benchmark scripts' measurements (CPU): what each timed region holds, what
the peers are made to do, and how bad command lines are refused."""
from __future__ import annotations

import functools
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _heavy(seed):
    """About 0.1 s of matmuls on CPU whose result is 0 but depends on ``seed``."""
    import jax.numpy as jnp

    h = jnp.ones((512, 512), jnp.float32) + seed * 0
    for _ in range(64):
        h = jnp.tanh(h @ h / 512)
    return h[0, 0] * 0


def test_eplb_forward_times_leave_the_routing_sampling_out(monkeypatch):
    """bench_eplb's fwd ms and its online-overhead columns time the layer (and the balancer
    step), not the drawing of the routing: here each draw also runs tens of ms of matmuls,
    and no timed call may take that long. The routing was drawn inside every timed call."""
    import jax
    import jax.numpy as jnp

    import bench_eplb
    from bench_moe_layer import setup
    from wideep_jax.bench import median_ms, time_fn

    plain = bench_eplb.sample_routing

    def slow_sample(key, log_p, num_tokens, top_k):
        routing = plain(key, log_p, num_tokens, top_k)
        return routing._replace(weights=routing.weights + _heavy(routing.weights[0, 0]).astype(jnp.float32))

    alone = jax.jit(_heavy)
    heavy_ms = median_ms(time_fn(lambda: alone(jnp.float32(1)), iters=5))
    monkeypatch.setattr(bench_eplb, "sample_routing", slow_sample)
    ep, mesh, spec, _ = setup(2, True, small_hidden=64, small_intermediate=32)
    rows, _, _ = bench_eplb.layer_section(spec, mesh, ep, 16, 1.2, spec.num_experts + 32, 3, 2)
    timed = {name: rows[name]["ms"] for name in ("none", "offline", "offline, local_first", "online")}
    timed.update(rows["overhead"])
    assert max(timed.values()) < 0.5 * heavy_ms, (timed, heavy_ms)


def _all_to_alls(body, loops, mesh, args) -> int:
    """All-to-all ops in the compiled program of ``body`` (a bench_alltoall loop) at ``loops`` ops."""
    import jax
    from jax.sharding import PartitionSpec as P

    tok = P("ep")
    f = jax.jit(jax.shard_map(functools.partial(body, loops), mesh=mesh, in_specs=(tok, tok, tok), out_specs=tok,
                              check_vma=False))
    return len(re.findall(r"\ball-to-all\(", f.lower(*args).compile().as_text()))


def test_alltoall_xla_timing_loop_runs_every_collective_of_each_op():
    """The xla backend's dispatch is three all-to-alls (rows, slots + counts, weights) and its
    combine one: the timing loops run them all per op. With the plan fixed and only one
    element of the rows read, XLA ran the slot/count exchange once per loop and dropped the
    weights': the xla dispatch was timed as one collective of three."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import bench_alltoall
    from wideep_jax.comm import XlaAllToAll

    ranks, tokens, hidden, experts = 4, 16, 64, 64
    mesh = jax.make_mesh((ranks,), ("ep",), devices=jax.devices()[:ranks])
    ids, weights = bench_alltoall.routing(0, ranks, tokens, experts)
    sharding = NamedSharding(mesh, P("ep"))
    args = [jax.device_put(a, sharding) for a in (jnp.ones((ranks * tokens, hidden), jnp.bfloat16),
                                                   jnp.asarray(ids), jnp.asarray(weights))]
    dispatch, combine = bench_alltoall.op_loops(XlaAllToAll(), ranks, experts // ranks)
    assert _all_to_alls(dispatch, 4, mesh, args) - _all_to_alls(dispatch, 2, mesh, args) == 3 * 2
    assert _all_to_alls(combine, 4, mesh, args) - _all_to_alls(combine, 2, mesh, args) == 1 * 2


def test_alltoall_refuses_the_backend_override(monkeypatch):
    """$WIDEEP_ALLTOALL replaces the backend a config names; in bench_alltoall it would have
    timed that backend under each --backends entry's name (here xla's numbers as 'nccl')."""
    import jax

    import bench_alltoall

    mesh = jax.make_mesh((2,), ("ep",), devices=jax.devices()[:2])
    monkeypatch.setenv("WIDEEP_ALLTOALL", "xla")
    with pytest.raises(SystemExit, match=r"WIDEEP_ALLTOALL='xla' would replace every --backends entry; allowed: "):
        bench_alltoall.make_comm("nccl", mesh)
    monkeypatch.delenv("WIDEEP_ALLTOALL")
    assert bench_alltoall.make_comm("xla", mesh).name == "xla"


@pytest.mark.parametrize("argv,message", [
    (["--loop", "0"], "argument --loop: '0': allowed: an integer >= 1"),
    (["--iters", "0"], "argument --iters: '0': allowed: an integer >= 1"),
    (["--tokens", "128", "-5"], "argument --tokens: '-5': allowed: an integer >= 1"),
    (["--ep", "x"], "argument --ep: 'x': allowed: an integer >= 1"),
    (["--backends", "nvlink:two"], "argument --backends: 'nvlink:two': allowed: xla, nccl, nvlink or nvlink:N[:S]"),
    (["--ep", "3"], "--ep 3: 64 experts do not split evenly; allowed: a divisor of 64"),
])
def test_alltoall_bad_arguments_name_flag_value_and_what_is_allowed(monkeypatch, capsys, argv, message):
    """Refused before anything runs (a --ep of more ranks than GPUs used to start a torch
    process per rank and wait 600 s on the ones without a GPU; --loop 0 divided by zero
    after every backend was compiled)."""
    import bench_alltoall

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # --small sets both: restored after the test
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(bench_alltoall, "jax_times", lambda *a: pytest.fail("ran a backend"))
    monkeypatch.setattr(sys, "argv", ["bench_alltoall.py", "--small", "--no-write", *argv])
    with pytest.raises(SystemExit) as err:
        bench_alltoall.main()
    assert message in capsys.readouterr().err + str(err.value.code)


def _stub_permute_timing(monkeypatch, bench):
    monkeypatch.setattr(bench, "copy_bandwidth", lambda iters: 1.0)
    monkeypatch.setattr(bench, "seconds_per_call", lambda build, calls, iters: 1e-6)


@pytest.mark.parametrize("argv,message", [
    (["--loop", "0"], "argument --loop: '0': allowed: an integer >= 1"),
    (["--iters", "-1"], "argument --iters: '-1': allowed: an integer >= 1"),
    (["--tokens", "0"], "argument --tokens: '0': allowed: an integer >= 1"),
])
def test_permute_bad_arguments_name_flag_value_and_what_is_allowed(monkeypatch, capsys, argv, message):
    """--loop 0 divided by zero and --iters 0 took the median of no samples, after the copy
    rate and each step had been compiled; --tokens 0 failed inside the routing draw."""
    import bench_permute

    _stub_permute_timing(monkeypatch, bench_permute)
    monkeypatch.setattr(sys, "argv", ["bench_permute.py", "--small", "--no-write", *argv])
    with pytest.raises(SystemExit):
        bench_permute.main()
    assert message in capsys.readouterr().err


def test_permute_checks_do_not_copy_the_rows_to_the_host(monkeypatch, capsys):
    """bench_permute's correctness checks run on the device (and on a few hundred rows in
    NumPy): at 16384 tokens the permuted rows are 1.9 GB of bf16, and copying and comparing
    them on the host twice took most of a minute of a GPU step's time limit."""
    import jax

    import bench_permute

    copied = []

    def asarray(a, *args, **kwargs):
        if isinstance(a, jax.Array):
            copied.append(a.size)
        return np.asarray(a, *args, **kwargs)

    spy = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np) if not name.startswith("__")})
    spy.asarray = asarray
    _stub_permute_timing(monkeypatch, bench_permute)
    monkeypatch.setattr(bench_permute, "np", spy)
    monkeypatch.setattr(sys, "argv", ["bench_permute.py", "--small", "--no-write", "--tokens", "1024"])
    assert bench_permute.main() == 0
    assert "| 1024 | permute_rows |" in capsys.readouterr().out
    rows = 1024 * 4 * 256  # the permuted rows' elements (--small: top-4, hidden 256)
    assert copied and max(copied) <= rows // 4, (copied, rows)


def test_permute_device_checks_catch_one_wrong_element():
    import jax.numpy as jnp

    import bench_permute

    a = jnp.arange(4096, dtype=jnp.bfloat16).reshape(64, 64)
    assert bool(bench_permute.same(a, a + 0)) and not bool(bench_permute.same(a, a.at[0, 1].add(1)))
    assert bool(bench_permute.close(a, a * 1.001, 2e-2, 1e-2))
    assert not bool(bench_permute.close(a, a.at[5, 5].set(-1), 2e-2, 1e-2))


def test_positive_int():
    import argparse

    from wideep_jax.bench import positive_int

    assert positive_int("3") == 3
    for text in ("0", "-2", "1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{text!r}: allowed: an integer >= 1")):
            positive_int(text)
