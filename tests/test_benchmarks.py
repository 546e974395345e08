"""Every benchmark script runs end to end at its CPU smoke size and prints its table.

The benchmarks only run for real on GPU machines, which CI never has; without
this they could rot between GPU sessions (an import renamed, an argument
changed) and fail when device time is scarcest. Each runs in a subprocess with
``--small --no-write`` (RESULTS.md stays untouched).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# script, extra arguments, implementations its table must name
SCRIPTS = [
    ("bench_alltoall.py", [], ["| 128 | xla |", "| 4096 | xla |", "| 128 | loop only (1-row op) |"]),
    ("bench_alltoall.py", ["--ep", "8"], ["EP8", "| 4096 | xla |"]),  # issue 7's shape
    ("bench_grouped_matmul.py", [], ["| gate/up | 1024 | uniform | xla loop |", "| down x weight |"]),
    ("bench_grouped_matmul.py", ["--phase", "prefill", "--kinds", "zipf-aligned", "--only", "gate/up_1024",
                                 "--variants", "delay_release=1;tile_k=128,max_concurrent_steps=3",
                                 "--sustain", "0.05"],
     ["| gate/up | 1024 | zipf-aligned | xla loop |"]),
    ("bench_grouped_matmul.py", ["--phase", "wgrad"], ["| gate/up dW |", "| down dW |", "dense (same FLOPs)"]),
    ("bench_model.py", [], ["alltoall=xla (xla), expert_kernel=xla", "alltoall=auto (xla), expert_kernel=auto"]),
    ("bench_model.py", ["--runs", "xla/auto", "--profile"],
     ["profile of one decode step: device busy", "host events of one prefill: host busy",
      "alltoall=xla (xla), expert_kernel=auto"]),
    ("bench_moe_layer.py", ["--sustain", "0.02", "--batch", "2", "--iters", "3", "--tokens", "128", "512"],
     ["| 128 |", "local peer timed in turns, each sample after 0.02 s of the same calls untimed"]),
    ("bench_moe_layer.py", ["--model", "llama4_maverick", "--iters", "2", "--tokens", "64", "--skews", "0"],
     ["| 64 | uniform |", "llama4_maverick's MoE layer:", "128 experts", "weight on the expert input"]),
    ("bench_eplb.py", [], ["| "]),
    ("bench_permute.py", [], ["| "]),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra,expected", SCRIPTS, ids=[" ".join([s, *e]) for s, e, _ in SCRIPTS])
def test_benchmark_smoke_run(script, extra, expected):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    before = (ROOT / "benchmarks" / "RESULTS.md").read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--small", "--no-write", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("| ") and "---" not in line]
    assert len(rows) >= 2, proc.stdout[-3000:]  # a header and at least one result
    for text in expected:
        assert text in proc.stdout, f"{text!r} missing from {script}'s output:\n{proc.stdout[-3000:]}"
    assert (ROOT / "benchmarks" / "RESULTS.md").read_bytes() == before, "--no-write must not append"


def test_grouped_matmul_bench_sustained_sampler(monkeypatch):
    """With --sustain, a sample runs its entry untimed for that long first and times only
    the BATCH calls after it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_grouped_matmul as bench
    monkeypatch.setattr(bench, "BATCH", 3)
    monkeypatch.setattr(bench, "SUSTAIN_S", 0.05)
    calls = []

    def run(n):
        time.sleep(0.001 * n)
        calls.append(n)

    seconds = bench.sampler(run)()
    assert calls[-1] == 3 and sum(calls[:-1]) >= 40  # >= 50 ms of warm-up at 1 ms a call
    assert 0.001 <= seconds < 0.01  # per call; with the warm-up counted it would be >= 0.017
    monkeypatch.setattr(bench, "SUSTAIN_S", 0.0)
    calls.clear()
    bench.sampler(run)()
    assert calls == [3]


def test_bench_model_refuses_a_model_the_card_cannot_hold(monkeypatch):
    """bench_model stops before building when the weights pass 90 % of JAX's device pool, and
    names the layer counts that fit (an H100's pool: 4 DeepSeek-V3 layers at EP1 do not fit)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_model
    import jax
    import jax.numpy as jnp

    class Card:
        device_kind = "fake H100"

        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit}

    cfg = bench_model.deepseek_v3(4, False, jnp.bfloat16)
    monkeypatch.setattr(jax, "devices", lambda: [Card(63_763_906_560)])
    with pytest.raises(SystemExit, match=r"--layers 4 at --ep 1: .* 93\.9 GB .* allowed here: --layers 1\.\.2 or"):
        bench_model.check_fits(cfg, 1, 4, jnp.bfloat16)
    bench_model.check_fits(cfg, 1, 2, jnp.bfloat16)  # fits
    bench_model.check_fits(cfg, 2, 4, jnp.bfloat16)  # experts halved per device
    monkeypatch.setattr(jax, "devices", lambda: [Card(20_000_000_000)])  # not even one layer
    with pytest.raises(SystemExit, match="allowed here: a larger --ep$"):
        bench_model.check_fits(cfg, 1, 1, jnp.bfloat16)
    monkeypatch.setattr(jax, "devices", lambda: [Card(106_000_000_000)])  # an H200's pool
    bench_model.check_fits(cfg, 1, 4, jnp.bfloat16)


def test_grouped_matmul_bench_group_sizes():
    """The Zipf kinds are one draw per shape; zipf-aligned rounds it to whole 128-row tiles."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_grouped_matmul import group_sizes

    for rows, groups in ((32768, 64), (1024, 8), (4096, 3)):
        zipf, aligned = group_sizes(rows, groups, "zipf"), group_sizes(rows, groups, "zipf-aligned")
        assert zipf.sum() == aligned.sum() == rows and zipf.min() >= 0 and aligned.min() >= 0
        assert np.all(aligned % 128 == 0)
        assert np.abs(aligned - zipf)[np.argsort(aligned)[:-1]].max() <= 64  # only the largest absorbs the rest
        np.testing.assert_array_equal(zipf, group_sizes(rows, groups, "zipf"))
        assert len(set(group_sizes(rows, groups, "uniform").tolist()) - {rows // groups, rows // groups + 1}) == 0
    with pytest.raises(ValueError, match="zipf-aligned"):
        group_sizes(1024, 8, "skewed")


def test_grouped_matmul_bench_candidates(monkeypatch):
    """--defaults-only keeps the default tiles; --variants adds each candidate with the
    replacement (fields of MosaicTgmmConfig for the dW sweep), skipping invalid ones."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_grouped_matmul as bench
    from pallas_kernels import MosaicGpuConfig
    from pallas_kernels.grouped_matmul.mosaic_gpu_tgmm import MosaicTgmmConfig

    monkeypatch.setattr(bench, "DEFAULTS_ONLY", True)
    monkeypatch.setattr(bench, "VARIANTS", bench.parse_variants("tile_m=64;chain_items=True"))
    default = MosaicGpuConfig(consumers="pingpong")
    assert bench.candidates(default, [MosaicGpuConfig()]) == [default, MosaicGpuConfig(consumers="pingpong",
                                                                                      tile_m=64)]
    monkeypatch.setattr(bench, "DEFAULTS_ONLY", False)
    # 2 candidates, 2 more with tile_m=64, and the 2 cooperative ones chained (ping-pong cannot chain)
    assert len(bench.candidates(default, [MosaicGpuConfig()])) == 6
    assert bench.parse_variants("block_rows=128", MosaicTgmmConfig) == ({"block_rows": 128},)
    with pytest.raises(SystemExit, match="tile_m=64"):
        bench.parse_variants("tile_m=64", MosaicTgmmConfig)


def test_device_loop_runs_every_call():
    """device_loop's calls survive XLA's optimizations (none hoisted or merged, no
    output cut down to the element read) and return the sum of each call's first elements."""
    import jax.numpy as jnp

    from wideep_jax.bench import device_loop

    x = jnp.asarray(np.random.default_rng().permutation(64).astype(np.int32))
    fn = lambda a: (jnp.sort(a), a[::-1] * 2)
    looped = device_loop(fn, 5)
    hlo = looped.lower(x).compile().as_text()
    assert hlo.count(" sort(") == 5, hlo[:2000]
    assert float(looped(x)) == 5 * (0 + float(x[-1]) * 2)

    rows = jnp.asarray(np.random.default_rng().standard_normal((64, 16)), jnp.float32)
    gather = device_loop(lambda r, i: r[i], 3)
    hlo = gather.lower(rows, x).compile().as_text()
    assert hlo.count("f32[64,16]{1,0} gather(") + hlo.count("f32[64,16]{1,0} fusion(") >= 3, hlo[:3000]
    assert np.isclose(float(gather(rows, x)), 3 * float(rows[x[0], 0]))


def test_seconds_per_call_cancels_fixed_costs():
    """The slope between programs of n and 2n calls: a large fixed cost per run (like a
    run's launch, sync and GPU start skew) does not leak into the time per call."""
    import time

    import jax.numpy as jnp

    from wideep_jax.bench import seconds_per_call

    built = []
    per_call, fixed = 0.004, 0.05

    def build(n):
        built.append(n)

        def run():
            time.sleep(fixed + n * per_call)
            return jnp.zeros(())
        return run

    got = seconds_per_call(build, 5, iters=3)
    assert built == [5, 10]
    assert abs(got - per_call) < 0.0015, got  # dividing one run by its calls would give 0.014


def test_seconds_per_call_says_nan_when_noise_hides_the_slope():
    import itertools
    import time

    import jax.numpy as jnp

    from wideep_jax.bench import seconds_per_call

    sleeps = itertools.cycle([0.02, 0.001])  # the short program always slower: no positive slope

    def build(n):
        def run():
            time.sleep(next(sleeps))
            return jnp.zeros(())
        return run

    assert np.isnan(seconds_per_call(build, 4, iters=3))


@pytest.mark.parametrize("epilogue", ["none", "swiglu", "row_scale"])
def test_grouped_matmul_bench_times_only_right_outputs(epilogue, capsys):
    """pick() with a check drops a candidate whose output is off (here: each group's last
    row left unwritten, the typical tile-edge bug) and keeps a right one; the dW check
    drops one that leaves an empty group's gradient unwritten."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax.numpy as jnp

    import bench_grouped_matmul as bench
    from pallas_kernels import grouped_matmul, grouped_matmul_transposed, grouped_swiglu

    rng = np.random.default_rng()
    sizes = rng.multinomial(200, rng.dirichlet(np.ones(5)))
    sizes[rng.integers(5)] = 0
    rows, k, n = 208, 32, 48
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((5, k, 2 * n if epilogue == "swiglu" else n)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 2, rows), jnp.float32) if epilogue == "row_scale" else None
    gs = jnp.asarray(sizes, jnp.int32)
    if epilogue == "swiglu":
        right = grouped_swiglu(x, w, gs, implementation="xla")
    else:
        right = grouped_matmul(x, w, gs, row_scale=scale, implementation="xla")
    last_rows = np.cumsum(sizes)[sizes > 0] - 1
    wrong = right.at[last_rows].set(0)
    check = bench.forward_check(x, w, sizes, epilogue, scale)
    assert check.error(right) <= bench.CHECK_TOLERANCE < check.error(wrong)
    label, _ = bench.pick({"wrong": lambda: wrong, "right": lambda: right}, iters=1, check=check)
    assert label == "right"
    assert "skip wrong: wrong output" in capsys.readouterr().out

    dy = jnp.asarray(rng.standard_normal((rows, n)), jnp.bfloat16)
    dw = grouped_matmul_transposed(x, dy, gs, implementation="xla")
    stale = dw.at[int(np.flatnonzero(sizes == 0)[0])].set(1)  # an empty group's dW left unwritten
    check = bench.wgrad_check(x, dy, sizes)
    assert check.error(dw) <= bench.CHECK_TOLERANCE < check.error(stale)
    assert bench.pick({"stale": lambda: stale}, iters=1, check=check) is None


@pytest.mark.parametrize("fault", ["drop_last_row", "swap_rows", "lose_a_partial"])
def test_alltoall_bench_times_only_backends_that_match_xla(fault, monkeypatch):
    """bench_alltoall checks each backend's dispatch and combine against the xla backend's on
    the timed inputs first: a backend that drops a row, moves one to the wrong place or loses
    a partial sum is not timed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import jax.numpy as jnp

    import bench_alltoall as bench

    monkeypatch.delenv("WIDEEP_ALLTOALL", raising=False)
    rng = np.random.default_rng()
    ranks, tokens, experts = 4, int(rng.integers(3, 9)), 16
    mesh = jax.make_mesh((ranks,), ("ep",), devices=jax.devices()[:ranks])
    ids, weights = bench.routing(int(rng.integers(1 << 30)), ranks, tokens, experts)
    inputs = bench.bench_inputs(mesh, ids, weights, tokens, 32, jnp.bfloat16)
    xla = bench.make_comm("xla", mesh)
    reference = bench.one_round(xla, mesh, *inputs, experts)
    assert bench.differences(bench.one_round(bench.make_comm("xla", mesh), mesh, *inputs, experts), reference) == []

    class Faulty:
        name = "faulty"

        def dispatch(self, x, plan, *, axis_name):
            recv = xla.dispatch(x, plan, axis_name=axis_name)
            if fault == "drop_last_row":
                return recv._replace(count=recv.count.at[-1].add(-1))
            if fault == "swap_rows":
                return recv._replace(x=recv.x.at[0, :2].set(recv.x[0, 1::-1]))
            return recv

        def combine(self, partial, plan, count, *, axis_name):
            if fault == "lose_a_partial":
                partial = partial.at[-1, 0].set(0)
            return xla.combine(partial, plan, count, axis_name=axis_name)

    monkeypatch.setattr(bench, "make_comm", lambda name, mesh: Faulty())
    result = bench.jax_times("faulty", mesh, inputs, experts, loops=2, iters=1, reference=reference)
    assert set(result) == {"wrong"}, result
    assert {"drop_last_row": "count", "swap_rows": "rows", "lose_a_partial": "combined"}[fault] in \
        " ".join(result["wrong"])
