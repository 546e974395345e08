"""Accounting checks of the benchmark scripts (CPU): what their tables say was measured."""
from __future__ import annotations

import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def test_eplb_overhead_forward_only_waits_for_the_forwards(monkeypatch):
    """bench_eplb's 'fwd only ms/iter' is the forwards' time, not their dispatch: each
    forward here also runs a chain of matmuls that takes tens of ms, so an iteration takes
    at least about that long. Blocking on the layer's weights alone (which a forward
    without a balancer step does not change) returned as soon as the forwards were
    enqueued: a few ms per iteration on CPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import jax.numpy as jnp

    import bench_eplb
    from bench_moe_layer import setup
    from wideep_jax.bench import median_ms, time_fn

    def heavy(seed):
        h = jnp.ones((512, 512), jnp.float32) + seed * 0
        for _ in range(12):
            h = jnp.tanh(h @ h / 512)
        return h[0, 0]

    plain = bench_eplb.online_forward

    def slow_forward(layer, weights, x, routing):
        y, stats = plain(layer, weights, x, routing)
        return y + (heavy(y[0, 0].astype(jnp.float32)) * 0).astype(y.dtype), stats

    alone = jax.jit(heavy)
    heavy_ms = median_ms(time_fn(lambda: alone(jnp.float32(1)), iters=5))
    monkeypatch.setattr(bench_eplb, "online_forward", slow_forward)
    ep, mesh, spec, _ = setup(2, True, small_hidden=64, small_intermediate=32)
    rows, _, _ = bench_eplb.layer_section(spec, mesh, ep, 16, 1.2, spec.num_experts + 32, 3, 2)
    overhead = rows["overhead"]
    assert overhead["forward"] >= 0.6 * heavy_ms, (overhead, heavy_ms)  # ms per iteration
    assert overhead["with_step"] >= 0.6 * heavy_ms, (overhead, heavy_ms)


def test_eplb_overhead_table_has_every_token_count(monkeypatch, capsys):
    """With several --tokens, the online-overhead table lists each count, not only the last."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_eplb

    def layer_section(spec, mesh, ep, tokens, *args):
        row = dict(ms=1.0, imbalance=0.0, slots=8, traffic=0.0)
        rows = {name: dict(row) for name in ("none", "offline", "offline, local_first", "online")}
        rows["overhead"] = dict(forward=float(tokens), with_step=2.0 * tokens)
        return rows, None, None

    class Spec:
        hidden_size, num_experts, intermediate_size, top_k, dtype = 8, 8, 8, 2, "float32"

    monkeypatch.setattr(bench_eplb, "setup", lambda *a, **k: (1, None, Spec(), "1x test"))
    monkeypatch.setattr(bench_eplb, "layer_section", layer_section)
    monkeypatch.setattr(bench_eplb, "reshard_section", lambda *a: [])
    monkeypatch.setattr(bench_eplb, "solve_section", lambda *a: [])
    monkeypatch.setattr(bench_eplb, "backends_text", lambda *a: "test backends")
    monkeypatch.setattr(bench_eplb, "commit", lambda: "test")
    monkeypatch.setattr(sys, "argv", ["bench_eplb.py", "--tokens", "64", "128", "--no-write"])
    assert bench_eplb.main() == 0
    out = capsys.readouterr().out
    assert "| 64 | 64.000 | 128.000 | 2.000 |" in out, out
    assert "| 128 | 128.000 | 256.000 | 2.000 |" in out, out
