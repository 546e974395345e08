"""One suite over every grouped-matmul implementation, fused epilogues included.

On CPU the Pallas kernels (mosaic_gpu, triton) run in their interpret modes, so
the same kernel code that runs on a GPU is checked here against float64 NumPy.
Dims are small but keep the kernels' constraints (K % 64, N % 128).
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_helpers import count_compiles
from pallas_kernels import MosaicGpuConfig, grouped_matmul, grouped_swiglu
from pallas_kernels.grouped_matmul import GroupedMatmulConfig, default_implementation
from pallas_kernels.grouped_matmul.schedule import group_band_walk, max_tiles, tile_schedule

IMPLS = ["xla", "mosaic_gpu", "triton"]
G, K, N = 6, 128, 256


def np_forward(x, w, sizes, epilogue, row_scale=None):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    if epilogue == "swiglu":
        gate, up = np.split(out, 2, axis=1)
        out = gate / (1 + np.exp(-gate)) * up
    elif epilogue == "row_scale":
        out = out * np.asarray(row_scale, np.float64)[:, None]
    return out


def sizes_for(kind: str, m: int, rng) -> np.ndarray:
    if kind == "zeros":  # random split with empty groups and 1/4 padding rows
        p = rng.random(G) * (np.arange(G) % 2 == 0)
        return rng.multinomial(m - m // 4, p / p.sum()).astype(np.int32)
    if kind == "giant":
        return np.array([1, 0, m - 3, 0, 2, 0], np.int32)
    if kind == "last":
        return np.array([0] * (G - 1) + [m], np.int32)
    return np.array([0, 3, 0, 1, 0, 5], np.int32)  # "tiny": M below every row tile


def run(impl, epilogue, x, w, sizes, row_scale, config=None):
    if epilogue == "swiglu":
        return grouped_swiglu(x, w, jnp.asarray(sizes), implementation=impl, config=config)
    return grouped_matmul(x, w, jnp.asarray(sizes), implementation=impl, config=config,
                          row_scale=row_scale if epilogue == "row_scale" else None)


def assert_mosaic_live_rows_close(config, epilogue, x, w, sizes, row_scale):
    """The mosaic_gpu kernel with ``config``: finite live rows within 1e-2 (relative) of float64."""
    live = int(sizes.sum())
    got = np.asarray(run("mosaic_gpu", epilogue, x, w, sizes, row_scale, config), np.float64)[:live]
    ref = np_forward(x, w, sizes, epilogue, row_scale)[:live]
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) <= 1e-2 * np.linalg.norm(ref)


CASES = [("zeros", 203), ("giant", 200), ("last", 130), ("tiny", 20)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("epilogue", ["none", "swiglu", "row_scale"])
@pytest.mark.parametrize("kind,m", CASES)
def test_forward_bf16_matches_float64(rng, impl, epilogue, kind, m):
    if impl != "xla" and epilogue != "none" and kind in ("giant", "tiny"):
        pytest.skip("interpret mode is slow: epilogues run on the other cases")
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
    row_scale = jnp.asarray(rng.random(m), jnp.float32)
    sizes = sizes_for(kind, m, rng)
    out = np.asarray(run(impl, epilogue, x, w, sizes, row_scale), np.float64)
    assert out.shape == (m, N // 2 if epilogue == "swiglu" else N)
    live = int(sizes.sum())
    ref = np_forward(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes, epilogue, row_scale)
    err = np.linalg.norm(out[:live] - ref[:live]) / max(np.linalg.norm(ref[:live]), 1e-30)
    assert err <= 1e-2, err


@pytest.mark.parametrize("impl", IMPLS + ["ragged_dot"])
@pytest.mark.parametrize("sizes, clipped", [
    ([-4, 7, -1, 0, 9, 30], [0, 7, 0, 0, 9, 4]),  # rows 0-6, 7-15, then 16-19 of 30
    ([2**31 - 1, 2**31 - 1, 3, 0, 0, 0], [20, 0, 0, 0, 0, 0]),  # an int32 sum would wrap
])
def test_negative_and_overfull_group_sizes_are_clipped_alike(rng, impl, sizes, clipped):
    """Every implementation reads a bad group_sizes the same way (it is data, not
    checked): negative sizes count as 0, and the groups reaching past M lose their tail
    (the Pallas kernels through `schedule.tile_schedule`, xla and ragged_dot by their
    own clipping, which test_grouped_matmul.py checks in float32 with the gradients)."""
    m = 20
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
    sizes, clipped = np.array(sizes, np.int32), np.array(clipped, np.int32)
    out = np.asarray(run(impl, "none", x, w, sizes, None), np.float64)
    ref = np_forward(np.asarray(x, np.float32), np.asarray(w, np.float32), clipped, "none")
    assert np.linalg.norm(out - ref) <= 1e-2 * np.linalg.norm(ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("epilogue", ["swiglu", "row_scale"])
def test_gradients_match_reference(rng, impl, epilogue):
    m = 150
    sizes = jnp.asarray(np.array([40, 0, 70, 0, 20, 0], np.int32))  # 20 padding rows
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
    scale = jnp.asarray(rng.random(m), jnp.float32)
    n_out = N // 2 if epilogue == "swiglu" else N
    cot = jnp.asarray(rng.standard_normal((m, n_out)), jnp.float32)
    live = (np.arange(m) < int(sizes.sum()))[:, None]

    def loss(impl_name, x, w, scale):
        if impl_name == "ref":  # plain jnp on float32 copies of the same inputs
            x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
            ids = jnp.repeat(jnp.arange(G), sizes, total_repeat_length=m)
            h = jnp.einsum("mk,mkn->mn", x32, w32[ids])
            if epilogue == "swiglu":
                gate, up = jnp.split(h, 2, axis=1)
                h = jax.nn.silu(gate) * up
            else:
                h = h * scale[:, None]
            y = h
        elif epilogue == "swiglu":
            y = grouped_swiglu(x, w, sizes, implementation=impl_name, preferred_element_type=jnp.float32)
        else:
            y = grouped_matmul(x, w, sizes, row_scale=scale, implementation=impl_name,
                               preferred_element_type=jnp.float32)
        return jnp.sum(jnp.where(live, y, 0.0) * cot)

    grads = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2))(x, w, scale)
    refs = jax.grad(lambda *a: loss("ref", *a), argnums=(0, 1, 2))(x, w, scale)
    names = ("dx", "dw", "d_scale")
    for name, got, want in zip(names, grads, refs):
        if name == "d_scale" and epilogue == "swiglu":
            continue
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if name != "dw":
            got, want = got[live[:, 0]], want[live[:, 0]]
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
        assert err <= 2e-2, (name, err)
    assert np.all(np.asarray(grads[0], np.float32)[~live[:, 0]] == 0)  # padding rows: no gradient


@pytest.mark.parametrize("impl", IMPLS + ["mosaic_gpu_pingpong"])
def test_new_group_sizes_do_not_recompile(rng, impl):
    m = 64
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
    config = None
    if impl == "mosaic_gpu_pingpong":  # the ping-pong consumers, at these small dims
        impl, config = "mosaic_gpu", MosaicGpuConfig(tile_n=64, consumers="pingpong", max_ctas=2)
    call = lambda x, w, s: grouped_swiglu(x, w, s, implementation=impl, config=config)  # noqa: E731
    f = jax.jit(call)
    f(x, w, jnp.asarray(sizes_for("zeros", m, rng))).block_until_ready()
    # The CPU interpreters of the Pallas kernels compile their own helpers per new box
    # shape (e.g. a 2-row store) on first use; another jit of the same call runs the
    # kinds first, so only a recompile of f itself is counted below.
    for kind in ("giant", "tiny"):
        jax.jit(call)(x, w, jnp.asarray(sizes_for(kind, m, rng))).block_until_ready()
    with count_compiles() as compiles:
        for kind in ("giant", "tiny"):
            sizes = sizes_for(kind, m, rng)
            out = np.asarray(f(x, w, jnp.asarray(sizes)), np.float64)
            live = int(sizes.sum())
            ref = np_forward(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes, "swiglu")
            assert np.linalg.norm(out[:live] - ref[:live]) <= 1e-2 * np.linalg.norm(ref[:live])
    assert compiles[0] == 0


def test_defaults_and_config_errors(rng):
    assert default_implementation() == "xla"  # CPU
    x = jnp.zeros((16, K), jnp.bfloat16)
    w = jnp.zeros((G, K, N), jnp.bfloat16)
    sizes = jnp.zeros((G,), jnp.int32)
    with pytest.raises(ValueError, match="GroupedMatmulConfig.*mosaic_gpu.*MosaicGpuConfig"):
        grouped_matmul(x, w, sizes, implementation="mosaic_gpu", config=GroupedMatmulConfig())
    with pytest.raises(ValueError, match="K=100 must be a multiple of tile_k=64"):
        grouped_matmul(jnp.zeros((16, 100), jnp.bfloat16), jnp.zeros((G, 100, N), jnp.bfloat16), sizes,
                       implementation="mosaic_gpu", config=MosaicGpuConfig())
    with pytest.raises(ValueError, match="N=200"):
        grouped_matmul(x, jnp.zeros((G, K, 200), jnp.bfloat16), sizes,
                       implementation="mosaic_gpu", config=MosaicGpuConfig())
    with pytest.raises(ValueError, match="tile_m must be a multiple of 64"):
        MosaicGpuConfig(tile_m=32)
    with pytest.raises(ValueError, match="chain_items needs delay_release=0"):
        MosaicGpuConfig(chain_items=True, delay_release=1)
    with pytest.raises(ValueError, match="bf16 or f16"):
        grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), sizes, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="row_scale must have shape"):
        grouped_matmul(x, w, sizes, row_scale=jnp.ones((3,)))
    # Epilogue rows under 128 bytes fault on the GPU (misaligned address): refused by name.
    for epi, dtype in ((32, None), (16, jnp.float32)):
        with pytest.raises(ValueError, match=rf"epi_tile_n={epi} gives epilogue rows of 64 bytes.*at least 128"):
            grouped_matmul(x, w, sizes, implementation="mosaic_gpu", preferred_element_type=dtype,
                           config=MosaicGpuConfig(tile_n=64, epi_tile_n=epi))


@pytest.mark.parametrize("epilogue", ["none", "swiglu", "row_scale"])
def test_mosaic_defaults_fit_every_width_of_64_columns(epilogue):
    """For every N the default implementation sends to mosaic_gpu (multiples of 64) and
    every branch of the defaults (prefill/decode rows, long/short K), the default tiles
    divide N into whole CTA tiles and keep 16-bit epilogue rows >= 128 bytes; an odd
    multiple of 64 (e.g. 192) gets one 64-column tile split along M."""
    from pallas_kernels.grouped_matmul import mosaic_gpu
    for n_out in range(64, 64 * 41, 64):
        for rows, k in ((32768, 7168), (32768, 2048), (256, 7168), (256, 2048), (256, 64)):
            config = mosaic_gpu.default_config(rows, 64, k=k, n_out=n_out, epilogue=epilogue)
            assert n_out % config.cta_tile_n == 0 and k % config.tile_k == 0, (n_out, rows, k, config)
            assert config.epi_tile_n * 2 >= 128, (n_out, rows, k, config)
    config = mosaic_gpu.default_config(32768, 64, k=7168, n_out=192, epilogue=epilogue)
    assert (config.tile_m, config.tile_n, config.wg_split, config.cta_tile_n) == (64, 64, "m", 64)


@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
def test_mosaic_default_tiles_at_an_odd_multiple_of_64_match_float64(rng, epilogue):
    """The defaults for N=192 (64-column tiles split along M) on two simulated CTAs."""
    from pallas_kernels.grouped_matmul import mosaic_gpu
    n_out, m = 192, 300
    config = dataclasses.replace(mosaic_gpu.default_config(32768, 64, k=K, n_out=n_out, epilogue=epilogue),
                                 max_ctas=2)
    assert (config.tile_n, config.wg_split) == (64, "m")
    sizes = sizes_for("zeros", m, rng)
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, n_out * (2 if epilogue == "swiglu" else 1))) / np.sqrt(K),
                    jnp.bfloat16)
    assert_mosaic_live_rows_close(config, epilogue, x, w, sizes, None)


@pytest.mark.parametrize("swizzled", [False, True])
def test_mosaic_chained_items_on_few_ctas(rng, swizzled):
    """Two simulated CTAs walk many items with the cross-item pipeline (chain_items);
    tiles that start mid-way (group starts not 8-aligned) store through the row ladder."""
    m = 300
    sizes = np.array([100, 0, 7, 150, 0, 13], np.int32)
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
    config = MosaicGpuConfig(tile_m=64, tile_n=64, max_concurrent_steps=2, chain_items=True, max_ctas=2,
                             grid_minor="m", grid_tile_width=2, swizzled_epilogue=swizzled)
    out = np.asarray(grouped_matmul(x, w, jnp.asarray(sizes), implementation="mosaic_gpu", config=config),
                     np.float64)
    ref = np_forward(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes, "none")
    live = int(sizes.sum())
    assert np.linalg.norm(out[:live] - ref[:live]) <= 1e-2 * np.linalg.norm(ref[:live])


@pytest.mark.parametrize("epilogue", ["none", "swiglu", "row_scale"])
@pytest.mark.parametrize("kind", ["zeros", "giant"])
def test_mosaic_pingpong_on_few_ctas(rng, epilogue, kind):
    """Ping-pong consumers on two simulated CTAs: 3 stages for 2 K steps an item, so the
    shared ring wraps mid-item and each consumer's barriers skip the other's items."""
    m = 300
    sizes = sizes_for(kind, m, rng)
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    width = 2 * N if epilogue == "swiglu" else N
    w = jnp.asarray(rng.standard_normal((G, K, width)) / np.sqrt(K), jnp.bfloat16)
    scale = jnp.asarray(rng.random(m), jnp.float32)
    config = MosaicGpuConfig(tile_m=64, tile_n=64, max_concurrent_steps=3, consumers="pingpong", max_ctas=2,
                             grid_minor="n" if kind == "giant" else "m", grid_tile_width=2,
                             swizzled_epilogue=kind == "giant")
    assert_mosaic_live_rows_close(config, epilogue, x, w, sizes, scale)


@pytest.mark.parametrize("epilogue,k_of_config", [("none", 7168), ("swiglu", 7168), ("none", 2048),
                                                   ("row_scale", 2048)])
def test_mosaic_prefill_defaults_match_float64(rng, epilogue, k_of_config):
    """The prefill default tiles for DeepSeek-V3's gate/up (long K), SwiGLU and down (short K),
    on two simulated CTAs at small dims, with empty groups and padding rows."""
    from pallas_kernels.grouped_matmul import mosaic_gpu
    n_out = N // 2 if epilogue == "swiglu" else N
    config = mosaic_gpu.default_config(32768, 64, k=k_of_config, n_out=n_out, epilogue=epilogue)
    config = dataclasses.replace(config, max_ctas=2)
    k, m = 256, 420  # 4 K steps: whole rounds of the chained defaults' stages
    sizes = rng.multinomial(m - 37, rng.dirichlet(np.ones(G))) * (np.arange(G) != 2)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, k, N)) / np.sqrt(k), jnp.bfloat16)
    scale = jnp.asarray(rng.random(m), jnp.float32)
    assert_mosaic_live_rows_close(config, epilogue, x, w, sizes, scale)


def test_mosaic_pingpong_config_errors():
    with pytest.raises(ValueError, match="pingpong.*chain_items"):
        MosaicGpuConfig(consumers="pingpong", chain_items=True)
    with pytest.raises(ValueError, match="pingpong.*wg_split"):
        MosaicGpuConfig(consumers="pingpong", wg_split="m")
    with pytest.raises(ValueError, match="128x256 accumulator"):
        MosaicGpuConfig(consumers="pingpong", tile_m=128, tile_n=256)
    with pytest.raises(ValueError, match="consumers must be 'cooperative' or 'pingpong', got 'both'"):
        MosaicGpuConfig(consumers="both")
    x = jnp.zeros((256, 512), jnp.bfloat16)
    w = jnp.zeros((2, 512, 256), jnp.bfloat16)
    too_deep = MosaicGpuConfig(consumers="pingpong", tile_n=128, max_concurrent_steps=8)
    with pytest.raises(ValueError, match="needs 294912 bytes of shared memory"):
        grouped_matmul(x, w, jnp.array([100, 156], jnp.int32), implementation="mosaic_gpu", config=too_deep)
    # The ping-pong item is the CTA tile: N need only be a multiple of tile_n.
    assert MosaicGpuConfig(consumers="pingpong", tile_n=128).cta_tile_n == 128
    assert MosaicGpuConfig(tile_n=128).cta_tile_n == 256


@pytest.mark.parametrize("block_m,align", [(64, 8), (128, 8), (16, 1)])
def test_tile_schedule_covers_each_live_row_once(rng, block_m, align):
    for _ in range(20):
        m = int(rng.integers(1, 400))
        g = int(rng.integers(1, 12))
        sizes = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet(np.ones(g) * 0.3))
        sched = tile_schedule(jnp.asarray(sizes, jnp.int32), m, block_m, align)
        group, start, begin, end, n = (np.asarray(a) for a in sched)
        n = int(n[0])
        assert len(group) == max_tiles(m, g, block_m, align) >= n
        owner = np.full(m, -1)
        for t in range(n):
            assert start[t] % align == 0 and 0 <= begin[t] < end[t] <= block_m  # no empty real tile
            rows = np.arange(start[t] + begin[t], start[t] + end[t])
            assert np.all(owner[rows] == -1)
            owner[rows] = group[t]
        assert np.all(end[n:] == 0)
        np.testing.assert_array_equal(owner, np.repeat(np.r_[np.arange(g), -1], np.r_[sizes, m - sizes.sum()]))


def band_walk_reference(groups: list, n_iters: int, max_width: int, mix_widths: bool = False) -> list:
    """(row tile, column tile) in group-band order, by plain loops: each group's run of
    tiles cut into the fewest bands of <= max_width (wider bands first), a band's columns
    in turn with its tiles fastest, the direction flipping from one band of a group to the next.
    ``mix_widths``: bands sorted by (their index among bands of their width + 1/2) / that
    width's band count, ties in walk order."""
    bands, t = [], 0
    while t < len(groups):
        run = next((i for i in range(t, len(groups)) if groups[i] != groups[t]), len(groups)) - t
        count = -(-run // max_width)
        widths = [run // count + (b < run % count) for b in range(count)]
        first = t
        for b, width in enumerate(widths):
            cols = range(n_iters) if b % 2 == 0 else range(n_iters - 1, -1, -1)
            bands.append((width, [(tile, j) for j in cols for tile in range(first, first + width)]))
            first += width
        t += run
    if mix_widths:
        keys = []
        for index, (width, _) in enumerate(bands):
            same = [i for i, (w, _) in enumerate(bands) if w == width]
            keys.append(((same.index(index) + 0.5) / len(same), index))
        bands = [bands[i] for _, i in sorted(keys)]
    return [item for _, items in bands for item in items]


@pytest.mark.parametrize("mix_widths", [False, True])
@pytest.mark.parametrize("max_width", [1, 3, 4, 8])
def test_group_band_walk_matches_loop_reference(rng, max_width, mix_widths):
    """Fresh random (and adversarial: one giant group, all rows in the last group) sizes:
    the walk's real items are the loop reference's order, each band within one group."""
    for trial in range(12):
        m, g = int(rng.integers(1, 3000)), int(rng.integers(1, 10))
        sizes = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet(np.ones(g) * 0.3))
        if trial == 0:
            sizes = np.zeros(g, np.int64)
            sizes[-1] = m
        n_iters = int(rng.integers(1, 6))
        sched = tile_schedule(jnp.asarray(sizes, jnp.int32), m, 64, 8)
        walk = group_band_walk(sched, n_iters, max_width, mix_widths=mix_widths)
        n = int(sched.num_tiles[0])
        groups = [int(v) for v in np.asarray(sched.group)[:n]]
        want = band_walk_reference(groups, n_iters, max_width, mix_widths)
        assert len(walk.col) == len(sched.group) * n_iters
        tiles = [tile for tile, _ in want]
        for name in ("group", "start", "live_begin", "live_end"):
            np.testing.assert_array_equal(np.asarray(getattr(walk, name))[:n * n_iters],
                                          np.asarray(getattr(sched, name))[tiles], err_msg=name)
        np.testing.assert_array_equal(np.asarray(walk.col)[:n * n_iters], [j for _, j in want])
        assert np.all(np.asarray(walk.live_end)[n * n_iters:] == 0)  # items past the real ones store nothing


def test_group_band_walk_reads_fewer_weight_tiles_than_the_snake():
    """Why the walk exists: counting the (group, column tile) weight tiles that consecutive
    bands of 4 row tiles use at Zipf-like sizes, the group bands switch weight tiles less."""
    sizes = np.array([700, 30, 90, 1300, 5, 260, 60, 40, 900, 15], np.int32)
    sched = tile_schedule(jnp.asarray(sizes), int(sizes.sum()), 128, 8)
    n, n_iters = int(sched.num_tiles[0]), 4
    walk = group_band_walk(sched, n_iters, 4)
    band_items = [(int(g), int(j)) for g, j in zip(np.asarray(walk.group)[:n * n_iters], np.asarray(walk.col))]
    switches = sum(a != b for a, b in zip(band_items, band_items[1:]))
    group = np.asarray(sched.group)[:n]
    snake = [(int(group[t]), j) for b0 in range(0, n, 4)
             for j in (range(n_iters) if b0 // 4 % 2 == 0 else range(n_iters - 1, -1, -1))
             for t in range(b0, min(n, b0 + 4))]
    snake_switches = sum(a != b for a, b in zip(snake, snake[1:]))
    assert switches < snake_switches
    with pytest.raises(ValueError, match="max_width >= 1, got 0"):
        group_band_walk(sched, n_iters, 0)


def test_mixed_band_walk_spreads_narrow_bands():
    """Why mix_widths exists: at Zipf-like sizes the one-tile bands (a weight column tile read
    per item) come in runs in group order; mixed, no stretch of 2 x 132 items (two rounds of
    one item per SM of an H100) holds more than its share plus two bands of them (the group
    order: five). The same items either way."""
    rng = np.random.default_rng(7)
    p = 1.0 / np.arange(1, 65) ** 1.2
    sizes = rng.multinomial(32768, rng.permutation(p / p.sum())).astype(np.int32)
    sched = tile_schedule(jnp.asarray(sizes), 32768, 128, 8)
    n, n_iters, window = int(sched.num_tiles[0]), 28, 264

    def narrow_share(walk):
        starts, ends = np.asarray(walk.start)[:n * n_iters], np.asarray(walk.live_end)[:n * n_iters]
        group = np.asarray(walk.group)[:n * n_iters]
        narrow = np.array([sizes[g] <= 128 for g in group], float)
        per_window = np.convolve(narrow, np.ones(window), "valid")
        return per_window.max(), set(zip(group.tolist(), starts.tolist(), ends.tolist(),
                                         np.asarray(walk.col)[:n * n_iters].tolist()))

    plain_max, plain_items = narrow_share(group_band_walk(sched, n_iters, 4))
    mixed_max, mixed_items = narrow_share(group_band_walk(sched, n_iters, 4, mix_widths=True))
    assert mixed_items == plain_items and len(mixed_items) == n * n_iters
    narrow_items = sum(n_iters for s in sizes if 0 < s <= 128)
    fair = narrow_items / (n * n_iters) * window
    assert mixed_max <= fair + 2 * n_iters, (mixed_max, fair)
    assert plain_max > fair + 2 * n_iters, (plain_max, fair)  # the order this replaces bunches them


@pytest.mark.parametrize("consumers", ["cooperative", "pingpong"])
@pytest.mark.parametrize("kind", ["zeros", "giant"])
def test_mosaic_group_band_walk_on_few_ctas(rng, consumers, kind):
    """Both kernels walking group bands on two simulated CTAs (chained items for the
    cooperative one) match float64; bit-equal to the snake walk, since only the order changes."""
    m = 300
    sizes = sizes_for(kind, m, rng)
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
    scale = jnp.asarray(rng.random(m), jnp.float32)
    common = dict(tile_m=64, tile_n=64, max_ctas=2, grid_minor="m", grid_tile_width=2, consumers=consumers)
    if consumers == "cooperative":
        common.update(max_concurrent_steps=2, chain_items=True)
    else:
        common.update(max_concurrent_steps=3)
    bands = MosaicGpuConfig(walk="group_bands", **common)
    assert_mosaic_live_rows_close(bands, "row_scale", x, w, sizes, scale)
    live = int(sizes.sum())
    got = np.asarray(run("mosaic_gpu", "none", x, w, sizes, None, bands))[:live]
    snake = np.asarray(run("mosaic_gpu", "none", x, w, sizes, None, MosaicGpuConfig(**common)))[:live]
    np.testing.assert_array_equal(got, snake)


def test_mosaic_walk_config_errors():
    with pytest.raises(ValueError, match="walk must be 'snake', 'group_bands' or 'mixed_bands', got 'zigzag'"):
        MosaicGpuConfig(walk="zigzag")
    with pytest.raises(ValueError, match="group_bands.*grid_minor='m', got 'n'"):
        MosaicGpuConfig(walk="group_bands", grid_minor="n")


@pytest.mark.parametrize("m", [4100, 150, 20, 64])
@pytest.mark.parametrize("epilogue", ["none", "swiglu", "row_scale"])
@pytest.mark.parametrize("swizzled", [False, True])
def test_mosaic_lowers_for_cuda(m, epilogue, swizzled):
    """The full Mosaic GPU lowering runs on CPU; it checks what interpret mode does not
    (TMA tiling of odd row counts, shared-memory budget, layouts)."""
    from pallas_kernels.grouped_matmul import mosaic_gpu

    k, n = (512, 768) if m > 1000 else (K, N)
    config = mosaic_gpu.default_config(m, G, k=k, n_out=n // 2 if epilogue == "swiglu" else n,
                                       epilogue=epilogue)
    if swizzled:
        config = dataclasses.replace(config, swizzled_epilogue=True, max_concurrent_steps=2,
                                     chain_items=False)

    def f(x, w, gs, scale):
        return mosaic_gpu.grouped_matmul(x, w, gs, config=config, epilogue=epilogue,
                                         row_scale=scale if epilogue == "row_scale" else None)

    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((G, k, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((G,), jnp.int32), jax.ShapeDtypeStruct((m,), jnp.float32))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("consumers", ["cooperative", "pingpong"])
def test_mosaic_group_band_walk_lowers_for_cuda(consumers):
    """The walk's per-item arrays reach both kernels through the full Mosaic GPU lowering."""
    from pallas_kernels.grouped_matmul import mosaic_gpu

    m, k, n = 4100, 512, 768
    config = dataclasses.replace(mosaic_gpu.default_config(m, G, k=k, n_out=n), walk="group_bands")
    if consumers == "pingpong":
        config = dataclasses.replace(config, consumers="pingpong", chain_items=False, max_concurrent_steps=4)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((G, k, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((G,), jnp.int32))
    f = jax.jit(lambda x, w, gs: mosaic_gpu.grouped_matmul(x, w, gs, config=config))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("epilogue", ["swiglu", "row_scale"])
def test_mosaic_backward_lowers_for_cuda(monkeypatch, epilogue):
    """The gradient's kernels (recomputed product, dx on w^T, dW) all lower through Mosaic
    GPU and fit shared memory at prefill size."""
    from pallas_kernels.grouped_matmul import api

    monkeypatch.setattr(api, "_LOWER_FOR_GPU", True)
    m, k, n = 4100, 512, 768

    def loss(x, w, scale, gs):
        if epilogue == "swiglu":
            y = grouped_swiglu(x, w, gs, implementation="mosaic_gpu")
        else:
            y = grouped_matmul(x, w, gs, row_scale=scale, implementation="mosaic_gpu")
        return jnp.sum(y.astype(jnp.float32))

    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((G, k, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((m,), jnp.float32), jax.ShapeDtypeStruct((G,), jnp.int32))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    text = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # The recomputed product, dx and dW (the Mosaic transposed kernel; the forward's
    # value is unused by the gradient). A float32 dw: test_mosaic_tgmm_lowers_for_cuda.
    calls = re.findall(r"custom_call @(\w+)", text)
    assert calls.count("mosaic_gpu_v2") == 3, calls
    assert "triton" not in text.lower()


# ------------------------------------------------- Mosaic GPU transposed kernel (dW)
TGMM_CASES = {  # name: group sizes over 6 groups (rows past their sum are NaN padding)
    "zeros": [30, 0, 100, 7, 60, 0],
    "giant": [1, 0, 190, 0, 2, 0],
    "last": [0, 0, 0, 0, 0, 195],
    "empty": [0, 0, 0, 0, 0, 0],
    "unaligned": [3, 5, 9, 11, 13, 17],
}


TGMM_INTERPRET_CONFIGS = {  # three simulated CTAs; ping-pong also with 128-row steps and 64x64 items
    "cooperative": {}, "pingpong": {"consumers": "pingpong"},
    "pingpong_rows128": {"consumers": "pingpong", "tile_k": 64, "tile_n": 64, "block_rows": 128,
                         "max_concurrent_steps": 2}}


@pytest.mark.parametrize("consumers", list(TGMM_INTERPRET_CONFIGS))
@pytest.mark.parametrize("case", list(TGMM_CASES))
def test_mosaic_tgmm_matches_float64(rng, case, consumers):
    """dw[g] = x_g^T dy_g on three simulated CTAs: boundary rows of neighbours and NaN
    padding are masked out, empty groups are exactly zero, M need not be a multiple of 8.
    The ping-pong kernel's hand-made barriers are checked by the interpreter too (each
    phase must be observed by every waiter)."""
    from pallas_kernels.grouped_matmul import mosaic_gpu_tgmm

    m, k, n = 203, 128, 256
    sizes = np.asarray(TGMM_CASES[case], np.int32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    x[sizes.sum():], dy[sizes.sum():] = np.nan, np.nan
    xb, dyb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16)
    config = mosaic_gpu_tgmm.MosaicTgmmConfig(max_ctas=3, grid_tile_width=2, **TGMM_INTERPRET_CONFIGS[consumers])
    got = np.asarray(mosaic_gpu_tgmm.tgmm(xb, dyb, jnp.asarray(sizes), config=config, out_dtype=jnp.float32,
                                          interpret=True), np.float64)
    want = np.zeros((G, k, n))
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        want[g] = np.asarray(xb[rows], np.float64).T @ np.asarray(dyb[rows], np.float64)
        start += size
    assert not np.isnan(got).any()
    for g in range(G):
        if sizes[g] == 0:
            assert np.all(got[g] == 0), g
        else:  # f32 accumulation of exact bf16 products
            np.testing.assert_allclose(got[g], want[g], rtol=1e-5, atol=1e-4 * np.abs(want[g]).max())
    first_two = mosaic_gpu_tgmm.tgmm(xb, dyb, jnp.asarray(sizes), num_groups=2, config=config,
                                     out_dtype=jnp.float32, interpret=True)
    np.testing.assert_array_equal(np.asarray(first_two), got[:2])


def test_mosaic_tgmm_api_default_and_errors(rng):
    from pallas_kernels import MosaicTgmmConfig, grouped_matmul_transposed
    from pallas_kernels.grouped_matmul.mosaic_gpu import MosaicGpuConfig
    from pallas_kernels.grouped_matmul.triton import TritonConfig
    from pallas_kernels.grouped_matmul import mosaic_gpu_tgmm

    sizes = jnp.asarray([40, 0, 24, 64], jnp.int32)
    x = jnp.asarray(rng.standard_normal((128, 128)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((128, 256)), jnp.bfloat16)
    config = MosaicTgmmConfig(max_ctas=2)
    got = grouped_matmul_transposed(x, dy, sizes, implementation="mosaic_gpu", config=config,
                                    preferred_element_type=jnp.float32)
    want = grouped_matmul_transposed(x, dy, sizes, implementation="xla", preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-3)
    # No config: mosaic_gpu's own dW kernel with its default tiles (ping-pong 128x128 items
    # where they divide dw, else cooperative 64 x 2*64).
    assert mosaic_gpu_tgmm.default_config(128, 128) == MosaicTgmmConfig(consumers="pingpong",
                                                                        max_concurrent_steps=5)
    assert mosaic_gpu_tgmm.default_config(192, 128) == MosaicTgmmConfig(tile_k=64, tile_n=64,
                                                                        max_concurrent_steps=4)
    assert mosaic_gpu_tgmm.default_config(128, 192) is None  # the Triton kernel runs then
    got = grouped_matmul_transposed(x, dy[:, :128], sizes, implementation="mosaic_gpu",
                                    preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want)[:, :, :128], rtol=1e-5, atol=1e-3)
    # A config of another kernel is an error naming the allowed class, never ignored.
    with pytest.raises(ValueError, match="implementation 'triton': it takes a TritonConfig"):
        grouped_matmul_transposed(x, dy, sizes, implementation="triton", config=config)
    with pytest.raises(ValueError, match="implementation 'mosaic_gpu': it takes a MosaicTgmmConfig"):
        grouped_matmul_transposed(x, dy, sizes, implementation="mosaic_gpu", config=MosaicGpuConfig())
    with pytest.raises(ValueError, match="implementation 'mosaic_gpu': it takes a MosaicTgmmConfig"):
        grouped_matmul_transposed(x, dy, sizes, implementation="mosaic_gpu", config=TritonConfig())
    # The triton transposed kernel takes its TritonConfig: its tiles must divide K and N.
    with pytest.raises(ValueError, match="must be multiples of block_k=256"):
        grouped_matmul_transposed(x, dy, sizes, implementation="triton", config=TritonConfig(block_k=256))
    got = grouped_matmul_transposed(x, dy, sizes, implementation="triton",
                                    config=TritonConfig(block_m=32, block_n=64, block_k=32),
                                    preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match=r"N=128 must be .*2\*tile_n=256"):
        grouped_matmul_transposed(x, dy[:, :128], sizes, implementation="mosaic_gpu", config=config)
    with pytest.raises(ValueError, match="tile_k must be a positive multiple of 64"):
        MosaicTgmmConfig(tile_k=96)
    # Ping-pong: whole items per consumer (N a multiple of tile_n only), one accumulator
    # per warpgroup, and its stages must fit shared memory (a float32 dw stages more bytes).
    with pytest.raises(ValueError, match="consumers must be 'cooperative' or 'pingpong', got 'both'"):
        MosaicTgmmConfig(consumers="both")
    with pytest.raises(ValueError, match="at most 128x128 elements"):
        MosaicTgmmConfig(consumers="pingpong", tile_k=256)
    with pytest.raises(ValueError, match=r"N=192 must be .*tile_n=128"):
        grouped_matmul_transposed(x, jnp.zeros((128, 192), jnp.bfloat16), sizes, implementation="mosaic_gpu",
                                  config=MosaicTgmmConfig(consumers="pingpong"))
    with pytest.raises(ValueError, match="needs 262144 bytes of shared memory"):
        grouped_matmul_transposed(x, dy, sizes, implementation="mosaic_gpu", preferred_element_type=jnp.float32,
                                  config=MosaicTgmmConfig(consumers="pingpong", max_concurrent_steps=6))
    with pytest.raises(ValueError, match="need K a multiple of 64 and N of 128"):
        mosaic_gpu_tgmm.tgmm(x, jnp.zeros((128, 192), jnp.bfloat16), sizes)


TGMM_LOWERING_CONFIGS = {  # the default and the configs the GPU test and the wgrad sweep run
    "default": {}, "tile_k=64": {"tile_k": 64, "max_concurrent_steps": 4},
    "tile_n=64": {"tile_n": 64, "max_concurrent_steps": 4}, "grid_tile_width=8": {"grid_tile_width": 8},
    "pingpong": {"consumers": "pingpong", "max_concurrent_steps": 5}}


@pytest.mark.parametrize("m,k,n", [(4100, 512, 768), (32768, 7168, 4096), (32768, 2048, 7168)])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("config", list(TGMM_LOWERING_CONFIGS))
def test_mosaic_tgmm_lowers_for_cuda(m, k, n, out_dtype, config):
    """The full Mosaic GPU lowering at prefill shapes (shared-memory budget, TMA tiling),
    for bf16 and float32 dw: a float32 tile is staged out in row slabs so it fits."""
    from pallas_kernels.grouped_matmul import mosaic_gpu_tgmm

    config = mosaic_gpu_tgmm.MosaicTgmmConfig(**TGMM_LOWERING_CONFIGS[config])
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((64,), jnp.int32))
    text = jax.jit(lambda x, dy, gs: mosaic_gpu_tgmm.tgmm(x, dy, gs, config=config, out_dtype=out_dtype)).trace(
        *args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
