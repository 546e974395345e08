"""GPU checks (run on a GPU machine: ``pytest -m gpu``); skipped elsewhere."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_helpers import assert_close, make_layer, make_spec, random_routing, random_tokens, run_layer, unsharded
from pallas_kernels import grouped_matmul
from wideep_jax import moe_forward
from wideep_jax.reference import dense_moe_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
]


def _ep() -> int:
    return min(4, jax.device_count())


def _gpu_kernels() -> list[str]:
    capability = str(getattr(jax.devices()[0], "compute_capability", "0")) if jax.default_backend() == "gpu" else "0"
    return (["mosaic_gpu"] if capability.startswith("9") else []) + ["triton"]


def _sizes(kind: str, m: int, g: int, rng) -> np.ndarray:
    real = m - m // 10  # the last tenth of the rows is padding
    return {
        "random": np.bincount(rng.integers(0, g, real), minlength=g),
        "zeros": rng.multinomial(real, np.r_[0.3, 0, 0, 0.2, 0, 0.5, 0, 0]),
        "one_giant": np.eye(g, dtype=int)[3] * real,
        "all_last": np.eye(g, dtype=int)[g - 1] * real,
        "tiny": np.array([0, 1, 0, 2, 0, 0, 3, 1]),
    }[kind].astype(np.int32)


def _poison_allocator(shape: tuple[int, int]) -> None:
    """Fill and free many NaN buffers of ``shape``, so the allocator most likely hands the
    next kernel NaN memory; a live row the kernel never writes then stays NaN."""
    poison = [jnp.full(shape, jnp.nan, jnp.bfloat16) for _ in range(8)]
    jax.block_until_ready(poison)
    for buf in poison:
        buf.delete()


@pytest.mark.parametrize("impl", ["mosaic_gpu", "mosaic_gpu_long_k", "mosaic_gpu_pingpong", "triton"])
@pytest.mark.parametrize("epilogue", ["none", "swiglu", "row_scale"])
# m=1000: decode-sized tiles, m=4100: prefill-sized; neither a multiple of a tile.
@pytest.mark.parametrize("kind,m", [("random", 1000), ("zeros", 4100), ("one_giant", 1000),
                                    ("all_last", 4100), ("tiny", 1000)])
def test_grouped_matmul_kernels_poisoned(rng, impl, epilogue, kind, m):
    """Live rows match float64 (bf16 operands: rel err <= 1e-2); padding rows are never written."""
    from pallas_kernels import MosaicGpuConfig, grouped_swiglu
    config = None
    if impl == "mosaic_gpu_pingpong":  # the ping-pong consumers, at the tiles the benchmark sweeps
        impl, config = "mosaic_gpu", MosaicGpuConfig(
            tile_m=64 if epilogue == "swiglu" else 128, tile_n=128, consumers="pingpong",
            max_concurrent_steps=4, grid_minor="m", grid_tile_width=4, swizzled_epilogue=kind == "zeros")
    if impl == "mosaic_gpu_long_k":  # the defaults for long K (gate/up), which K=512 would not pick
        from pallas_kernels.grouped_matmul import mosaic_gpu
        n_out = 384 if epilogue == "swiglu" else 768
        impl, config = "mosaic_gpu", mosaic_gpu.default_config(m, 8, k=7168, n_out=n_out, epilogue=epilogue)
    if impl not in _gpu_kernels():
        pytest.skip(f"{impl} needs another GPU generation")
    k, n, g = 512, 768, 8
    sizes = _sizes(kind, m, g, rng)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    scale = jnp.asarray(rng.random(m), jnp.float32)
    n_out = n // 2 if epilogue == "swiglu" else n
    gs = jnp.asarray(sizes)
    if epilogue == "swiglu":
        f = jax.jit(lambda x, w, gs, scale: grouped_swiglu(x, w, gs, implementation=impl, config=config))
    else:
        f = jax.jit(lambda x, w, gs, scale: grouped_matmul(
            x, w, gs, implementation=impl, config=config, row_scale=scale if epilogue == "row_scale" else None))
    f = f.lower(x, w, gs, scale).compile()
    _poison_allocator((m + 64, n_out))
    out = np.asarray(f(x, w, gs, scale), np.float64)
    live = int(sizes.sum())
    xb, wb = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref = np.concatenate([xb[s:e] @ wb[i] for i, (s, e) in enumerate(zip(np.r_[0, np.cumsum(sizes)[:-1]],
                                                                         np.cumsum(sizes)))])
    if epilogue == "swiglu":
        gate, up = np.split(ref, 2, axis=1)
        ref = gate / (1 + np.exp(-gate)) * up
    elif epilogue == "row_scale":
        ref = ref * np.asarray(scale, np.float64)[:live, None]
    assert np.isfinite(out[:live]).all(), "a live row was not written"
    assert_close(out[:live], ref, rtol=1e-2)
    # Padding rows are never written; where the poison took they are still NaN.
    print(f"padding rows still poisoned: {np.isnan(out[live:]).mean() if live < m else 1.0:.2f}")


@pytest.mark.parametrize("epilogue,k,n", [("none", 7168, 512), ("swiglu", 7168, 512), ("row_scale", 1024, 896)])
@pytest.mark.parametrize("sizes_kind", ["zipf", "one_giant"])
def test_mosaic_group_band_walk_bit_equal_on_gpu(rng, epilogue, k, n, sizes_kind):
    """The prefill defaults walking group bands (of at most 4 and 8 row tiles, in group order
    or mixed by width) give the snake's output bit for bit at Zipf-skewed sizes (64 groups,
    some empty) and with every row in one group; the poisoned output must be written
    everywhere live."""
    if "mosaic_gpu" not in _gpu_kernels():
        pytest.skip("mosaic_gpu needs a Hopper GPU")
    import dataclasses

    from pallas_kernels import grouped_swiglu
    from pallas_kernels.grouped_matmul import mosaic_gpu
    m, g = 8192 + 100, 64
    real = 8192
    if sizes_kind == "zipf":
        p = 1.0 / np.arange(1, g + 1) ** 1.2
        sizes = rng.multinomial(real, rng.permutation(p / p.sum()))
    else:
        sizes = np.eye(g, dtype=int)[int(rng.integers(g))] * real
    gs = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    scale = jnp.asarray(rng.random(m), jnp.float32)
    n_out = n // 2 if epilogue == "swiglu" else n
    # The prefill defaults walk mixed bands themselves: compare against the snake explicitly.
    snake = dataclasses.replace(mosaic_gpu.default_config(m, g, k=k, n_out=n_out, epilogue=epilogue), walk="snake")
    configs = [snake, dataclasses.replace(snake, walk="group_bands"),
               dataclasses.replace(snake, walk="group_bands", grid_tile_width=8),
               dataclasses.replace(snake, walk="mixed_bands")]
    outs = []
    for config in configs:
        if epilogue == "swiglu":
            f = jax.jit(lambda x, w, gs: grouped_swiglu(x, w, gs, implementation="mosaic_gpu", config=config))
        else:
            f = jax.jit(lambda x, w, gs: grouped_matmul(
                x, w, gs, implementation="mosaic_gpu", config=config,
                row_scale=scale if epilogue == "row_scale" else None))
        f = f.lower(x, w, gs).compile()
        _poison_allocator((m + 64, n_out))
        outs.append(np.asarray(f(x, w, gs)[:real]))
    assert np.isfinite(outs[0]).all()
    for config, out in zip(configs[1:], outs[1:]):
        np.testing.assert_array_equal(out, outs[0], err_msg=str(config))


@pytest.mark.parametrize("impl", ["mosaic_gpu", "triton"])
def test_grouped_kernel_gradients(rng, impl):
    if impl not in _gpu_kernels():
        pytest.skip(f"{impl} needs another GPU generation")
    import test_grouped_matmul_kernels as kernels
    for epilogue in ("swiglu", "row_scale"):
        kernels.test_gradients_match_reference(rng, impl, epilogue)


@pytest.mark.parametrize("kind,m", [("random", 1000), ("zeros", 4100), ("one_giant", 1000),
                                    ("all_last", 4100), ("tiny", 1000)])
def test_mosaic_tgmm_poisoned(rng, kind, m):
    """The Mosaic GPU transposed kernel (dW) against float64, with NaN padding rows (they
    must not reach any group) and an output poisoned before the call (every tile written)."""
    if "mosaic_gpu" not in _gpu_kernels():
        pytest.skip("mosaic_gpu needs a Hopper GPU")
    from pallas_kernels import MosaicTgmmConfig, grouped_matmul_transposed
    k, n, g = 512, 768, 8
    sizes = _sizes(kind, m, g, rng)
    live = int(sizes.sum())
    x = rng.standard_normal((m, k)).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    x[live:], dy[live:] = np.nan, np.nan
    x, dy, gs = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16), jnp.asarray(sizes)
    for config in (MosaicTgmmConfig(), MosaicTgmmConfig(tile_k=64, max_concurrent_steps=4),
                   MosaicTgmmConfig(consumers="pingpong", max_concurrent_steps=5),
                   MosaicTgmmConfig(consumers="pingpong", tile_k=64, block_rows=128, max_concurrent_steps=3)):
        f = jax.jit(lambda x, dy, gs: grouped_matmul_transposed(
            x, dy, gs, implementation="mosaic_gpu", config=config, preferred_element_type=jnp.float32))
        f = f.lower(x, dy, gs).compile()
        poison = [jnp.full((g, k, n), jnp.nan, jnp.float32) for _ in range(4)]
        jax.block_until_ready(poison)
        for buf in poison:
            buf.delete()
        got = np.asarray(f(x, dy, gs), np.float64)
        xb, dyb = np.asarray(x, np.float64), np.asarray(dy, np.float64)
        starts = np.r_[0, np.cumsum(sizes)[:-1]]
        assert np.isfinite(got).all(), f"{config}: a tile was not written or NaN padding leaked in"
        for i, (s, size) in enumerate(zip(starts, sizes)):
            if size == 0:
                assert np.all(got[i] == 0), (config, i)
            else:
                assert_close(got[i], xb[s:s + size].T @ dyb[s:s + size], rtol=1e-2)


@pytest.mark.parametrize("kernel", ["mosaic_gpu", "triton"])
@pytest.mark.parametrize("kind", ["noaux_tc", "llama4"])
def test_wideep_layer_each_expert_kernel(rng, kernel, kind):
    """The whole layer with each GPU kernel equals the layer with the XLA loop (bf16)."""
    if kernel not in _gpu_kernels():
        pytest.skip(f"{kernel} needs another GPU generation")
    spec = make_spec(kind=kind, top_k=8 if kind == "noaux_tc" else 1, shared=1, hidden=512, inter=256, experts=64,
                     dtype=jnp.bfloat16, on_input=kind == "llama4")
    x = random_tokens(rng, 256 * _ep(), spec.hidden_size, jnp.bfloat16)
    outs = {}
    for name in ("xla", kernel):
        layer = make_layer(spec, ep=_ep(), expert_kernel=name)  # same seed: same weights
        outs[name], _ = run_layer(layer, x)
    assert_close(outs[kernel], outs["xla"], rtol=1e-2)
    ref = dense_moe_reference(x, unsharded(layer.weights()), spec)
    assert_close(outs[kernel], ref, rtol=2e-2)


@pytest.mark.parametrize("kind", ["softmax", "noaux_tc", "llama4"])
def test_wideep_layer_bf16(rng, kind):
    # llama4: the routing weight scales the expert's input (the down GEMM has no row scale).
    spec = make_spec(kind=kind, top_k=4, shared=1, hidden=256, inter=128, experts=32, dtype=jnp.bfloat16,
                     on_input=kind == "llama4")
    layer = make_layer(spec, ep=_ep())
    x = random_tokens(rng, 64 * _ep(), spec.hidden_size, jnp.bfloat16)
    y, stats = run_layer(layer, x)
    ref = dense_moe_reference(x, unsharded(layer.weights()), spec)
    assert_close(y, ref, rtol=1e-2)
    assert int(stats.expert_counts.sum()) == x.shape[0] * 4


def test_wideep_layer_adversarial_one_rank_f32(rng):
    spec = make_spec(top_k=4, hidden=128, inter=64, experts=16)
    layer = make_layer(spec, ep=_ep())
    per_rank = spec.num_experts // _ep()
    routing = random_routing(rng, 32 * _ep(), spec.num_experts, 4, experts=np.arange(per_rank))
    x = random_tokens(rng, 32 * _ep(), spec.hidden_size)
    with jax.default_matmul_precision("highest"):
        y, stats = run_layer(layer, x, routing=routing)
        ref = dense_moe_reference(x, unsharded(layer.weights()), spec, routing=routing)
    assert_close(y, ref, rtol=1e-5)
    assert int(stats.rank_tokens[0]) == x.shape[0]


def test_wideep_gradients_f32(rng):
    spec = make_spec(top_k=2, shared=1, hidden=64, inter=32)
    layer = make_layer(spec, ep=_ep())
    x = random_tokens(rng, 16 * _ep(), spec.hidden_size)
    w = unsharded(layer.weights())
    loss = lambda w, x: jnp.sum(moe_forward(x, w, spec=spec, config=layer.config, mesh=layer.mesh)[0] ** 2)
    loss_ref = lambda w, x: jnp.sum(dense_moe_reference(x, w, spec) ** 2)
    with jax.default_matmul_precision("highest"):
        g = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(w, x)
        g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1), allow_int=True))(w, x)
    assert_close(g[1], g_ref[1], rtol=1e-4)
    assert_close(g[0].w_gate_up, g_ref[0].w_gate_up, rtol=1e-4)


@pytest.mark.parametrize("mode", ["host", "host_replicated", "collective"])
def test_online_eplb_on_gpu(rng, mode):
    """The CPU suite's online checks on real GPUs: pinned_host master copy, ppermute moves."""
    if jax.device_count() < 2:  # its placements replicate experts across ranks
        pytest.skip("online re-sharding between GPUs needs 2 or more")
    import test_eplb_online as online
    from wideep_jax.eplb.resharding import host_memory_kind

    assert host_memory_kind(make_layer(make_spec(), ep=_ep()).mesh) == "pinned_host"
    online.test_reshard_moves_exactly_the_changed_slots(rng, mode, "random")
    online.test_reshard_moves_exactly_the_changed_slots(rng, mode, "all_change")
    online.test_online_loop_100_updates(rng, mode)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "llama4_text"])
def test_hf_models_on_gpu(arch):
    """The parity fixtures on GPUs: float32 (XLA expert loop) to 1e-4, and bfloat16 with the
    default (Pallas) expert kernels to 3e-2, both with wide EP."""
    import json
    from pathlib import Path

    from flax import nnx

    from moe_helpers import make_mesh
    from wideep_jax.config import load_moe_config
    from wideep_jax.models import from_hf_config, from_pretrained

    folder = Path(__file__).resolve().parent / "fixtures" / f"{arch}_tiny"
    expected = np.load(folder / "expected.npz")
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    ep = 2 if jax.device_count() >= 2 else 1
    moe = load_moe_config({"backend": "WIDEEP"}, num_experts=cfg.num_experts, ep_size=ep)
    for dtype, rtol in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
        model = from_pretrained(folder, moe_config=moe, mesh=make_mesh(ep), dtype=dtype)
        with jax.default_matmul_precision("highest"):  # no TF32 for the float32 run
            logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(expected["input_ids"]))
        assert_close(np.asarray(logits, np.float64), expected["logits"], rtol=rtol)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_permute_kernels_on_gpu(rng, dtype):
    """The Triton row gather and pair combine compiled for the GPU (not interpreted), at a
    prefill-like width with row and column tails: the gather is bitwise, the combine
    equals the float32 in-order sum bitwise, rows no pair reads (NaN) never leak in, and
    eager calls with new data reuse one program."""
    import test_permute_kernels as cpu
    from moe_helpers import count_compiles
    from pallas_kernels import permute

    n, k, h = 1037, 4, 7168 + 64
    r = n * k

    def check():
        x = jnp.asarray(rng.standard_normal((n, h)), dtype)
        index = rng.integers(0, n, r).astype(np.int32)
        index[: r // 4] = rng.integers(n)  # a hot token: many rows read one source row
        rows = permute.gather_rows(x, jnp.asarray(index))
        np.testing.assert_array_equal(cpu._bits(rows), cpu._bits(x)[index])
        position, valid = cpu._pairs("random", n, k, r, rng)
        y = rng.standard_normal((r, h)).astype(np.float32)
        y[np.setdiff1d(np.arange(r), position[valid])] = np.nan
        y = jnp.asarray(y, dtype)
        got = permute.combine_rows(y, jnp.asarray(position), jnp.asarray(valid), out_dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), cpu._combine_reference(y, position, valid))

    check()
    with count_compiles() as compiles:
        check()
    assert compiles[0] == 0


def test_generate_eos_on_gpu():
    """`generate`'s EOS stop and padding on a GPU (the CPU suite's checks: stops
    _STOP_LAG steps after the last EOS, padded tails, masked expert counts), and EOS/pad
    ids as data (no recompilation)."""
    import test_models as models

    models.test_generate_stops_once_every_sequence_has_finished(1)
    models.test_eos_and_prompt_values_do_not_recompile(np.random.default_rng())


@pytest.mark.parametrize("epilogue", ["none", "swiglu", "row_scale"])
@pytest.mark.parametrize("n_out", [192, 320])
def test_mosaic_defaults_at_odd_multiples_of_64(rng, epilogue, n_out):
    """N an odd multiple of 64, at prefill and decode rows: the default tiles (64-column
    tiles split along M where 32-column ones would fault) are correct and write every
    live row."""
    if "mosaic_gpu" not in _gpu_kernels():
        pytest.skip("mosaic_gpu needs Hopper")
    from pallas_kernels import grouped_swiglu
    k, g = 7168, 8
    for m, kind in ((4100, "zeros"), (1000, "random")):
        sizes = _sizes(kind, m, g, rng)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((g, k, n_out * (2 if epilogue == "swiglu" else 1))) / np.sqrt(k),
                        jnp.bfloat16)
        scale = jnp.asarray(rng.random(m), jnp.float32) if epilogue == "row_scale" else None
        if epilogue == "swiglu":
            f = jax.jit(lambda x, w, gs: grouped_swiglu(x, w, gs, implementation="mosaic_gpu"))
            want = jax.jit(lambda x, w, gs: grouped_swiglu(x, w, gs, implementation="xla"))
        else:
            f = jax.jit(lambda x, w, gs: grouped_matmul(x, w, gs, implementation="mosaic_gpu", row_scale=scale))
            want = jax.jit(lambda x, w, gs: grouped_matmul(x, w, gs, implementation="xla", row_scale=scale))
        gs = jnp.asarray(sizes)
        compiled = f.lower(x, w, gs).compile()
        _poison_allocator((m + 64, n_out))
        out = np.asarray(compiled(x, w, gs), np.float64)
        live = int(sizes.sum())
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(want(x.astype(jnp.float32), w.astype(jnp.float32), gs), np.float64)
        assert np.isfinite(out[:live]).all(), "a live row was not written"
        assert_close(out[:live], ref[:live], rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_routing_ties_on_gpu_match_cpu(rng, dtype):
    """The routers rely on top_k keeping the lower index first on ties (a token's experts must
    not depend on the device): logits drawn from 3 values tie almost everywhere."""
    from wideep_jax.routing import RouterSpec, route

    cpu, gpu = jax.devices("cpu")[0], jax.devices()[0]
    cases = [(256, 8, RouterSpec(kind="noaux_tc", n_group=8, topk_group=4, routed_scaling_factor=2.5)),
             (256, 8, RouterSpec(kind="noaux_tc")), (32, 4, RouterSpec(kind="noaux_tc", n_group=16, topk_group=3)),
             (128, 8, RouterSpec()), (64, 6, RouterSpec(norm_topk_prob=False)),
             (16, 1, RouterSpec(kind="llama4", norm_topk_prob=False))]
    routed = jax.jit(route, static_argnums=(1, 2))
    for num_experts, top_k, spec in cases:
        for tokens in (7, 5000):
            logits = ((rng.integers(0, 3, (tokens, num_experts)) - 1) / 4 + 0.25).astype(np.float32)
            on_gpu = routed(jax.device_put(jnp.asarray(logits, dtype), gpu), top_k, spec)
            on_cpu = routed(jax.device_put(jnp.asarray(logits, dtype), cpu), top_k, spec)
            where = f"{spec.kind} E={num_experts} k={top_k} T={tokens}"
            np.testing.assert_array_equal(np.asarray(on_gpu.ids), np.asarray(on_cpu.ids), err_msg=where)
            np.testing.assert_allclose(np.asarray(on_gpu.weights), np.asarray(on_cpu.weights), rtol=1e-5,
                                       err_msg=where)
            if spec.kind != "noaux_tc" or spec.n_group == 1:   # plain top-k: the stable order's first k
                first_k = np.argsort(-np.asarray(jnp.asarray(logits, dtype), np.float32), -1, kind="stable")[:, :top_k]
                np.testing.assert_array_equal(np.asarray(on_gpu.ids), first_k, err_msg=where)
