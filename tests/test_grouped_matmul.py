"""grouped_matmul / grouped_matmul_transposed against a float64 NumPy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    GroupedMatmulConfig,
    grouped_matmul,
    grouped_matmul_reference,
    grouped_matmul_transposed,
    grouped_swiglu,
)
from pallas_kernels.grouped_matmul import IMPLEMENTATIONS, default_implementation

# The loop implementations in float32 and at odd shapes; the Pallas kernels (bf16,
# tiled shapes) and the fused epilogues are in test_grouped_matmul_kernels.py.
IMPLS = ["xla"] + (["ragged_dot"] if jax.default_backend() == "cpu" else [])


# ---------------------------------------------------------------- helpers


def np_gmm(x: np.ndarray, w: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    x, w = x.astype(np.float64), w.astype(np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start : start + size] = x[start : start + size] @ w[g]
        start += size
    return out


def np_tgmm(x: np.ndarray, dy: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    dw = np.zeros((len(sizes), x.shape[1], dy.shape[1]))
    start = 0
    for g, size in enumerate(sizes):
        dw[g] = x[start : start + size].T @ dy[start : start + size]
        start += size
    return dw


def random_sizes(rng: np.random.Generator, total: int, num_groups: int) -> np.ndarray:
    """Random split of `total` rows into groups, with some forced-empty groups."""
    weights = rng.random(num_groups) * (rng.random(num_groups) > 0.3)
    if weights.sum() == 0:
        weights[rng.integers(num_groups)] = 1.0
    sizes = np.floor(weights / weights.sum() * total).astype(np.int64)
    sizes[np.argmax(weights)] += total - sizes.sum()
    return sizes.astype(np.int32)


def one_group(total: int, num_groups: int, g: int) -> np.ndarray:
    sizes = np.zeros(num_groups, np.int32)
    sizes[g] = total
    return sizes


def make_inputs(rng, m, k, n, g, dtype=jnp.float32):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, k, n)), dtype)
    return x, w


def rel_err(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


# Shapes (M, K, N, G) and how the rows are split; "pad" leaves 1/4 of rows unused.
CASES = [
    ("random", 200, 48, 40, 8),
    ("random_pad", 300, 32, 24, 16),
    ("giant", 257, 16, 24, 6),
    ("first", 130, 16, 8, 5),
    ("last", 130, 16, 8, 5),
    ("tiny", 5, 8, 8, 3),
]


def case_sizes(rng, kind: str, m: int, g: int) -> np.ndarray:
    if kind == "random":
        return random_sizes(rng, m, g)
    if kind == "random_pad":
        return random_sizes(rng, m - m // 4, g)
    if kind == "giant":  # one huge group among a few tiny ones
        sizes = np.zeros(g, np.int32)
        sizes[[0, 2]] = 1
        sizes[3] = m - 3
        return sizes
    if kind == "first":
        return one_group(m, g, 0)
    if kind == "last":
        return one_group(m, g, g - 1)
    return np.array([2, 0, 1], np.int32)  # tiny: M < block_m, with padding row


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_m", [16, 128])
@pytest.mark.parametrize("kind,m,k,n,g", CASES)
def test_gmm_float32(rng, impl, block_m, kind, m, k, n, g):
    x, w = make_inputs(rng, m, k, n, g)
    sizes = case_sizes(rng, kind, m, g)
    with jax.default_matmul_precision("highest"):
        out = grouped_matmul(
            x, w, jnp.asarray(sizes), implementation=impl,
            config=GroupedMatmulConfig(block_m=block_m),
        )
    assert out.shape == (m, n) and out.dtype == jnp.float32
    expected = np_gmm(np.asarray(x), np.asarray(w), sizes)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)
    # Padding rows are not computed and must be exactly zero.
    assert np.all(np.asarray(out)[sizes.sum() :] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["random_pad", "giant"])
def test_gmm_bfloat16(rng, impl, kind):
    m, k, n, g = 200, 64, 48, 8
    x, w = make_inputs(rng, m, k, n, g, jnp.bfloat16)
    sizes = case_sizes(rng, kind, m, g)
    out = grouped_matmul(
        x, w, jnp.asarray(sizes), implementation=impl, config=GroupedMatmulConfig(block_m=32)
    )
    assert out.dtype == jnp.bfloat16
    expected = np_gmm(np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)), sizes)
    assert rel_err(out, expected) <= 1e-2
    assert np.all(np.asarray(out.astype(jnp.float32))[sizes.sum() :] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gmm_preferred_element_type(rng, impl):
    x, w = make_inputs(rng, 64, 16, 8, 4, jnp.bfloat16)
    sizes = np.array([10, 0, 30, 20], np.int32)
    out = grouped_matmul(
        x, w, jnp.asarray(sizes), implementation=impl, preferred_element_type=jnp.float32
    )
    assert out.dtype == jnp.float32
    expected = np_gmm(np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)), sizes)
    # f32 accumulation and output: only the bf16 inputs' products are rounded.
    assert rel_err(out, expected) <= 1e-5


def test_jnp_reference_matches_numpy(rng):
    x, w = make_inputs(rng, 50, 8, 6, 4)
    sizes = np.array([5, 0, 30, 7], np.int32)
    out = grouped_matmul_reference(x, w, jnp.asarray(sizes))
    np.testing.assert_allclose(np.asarray(out), np_gmm(np.asarray(x), np.asarray(w), sizes), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- transposed (tgmm)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_m", [16, 128])
@pytest.mark.parametrize("kind,m,k,n,g", CASES)
def test_tgmm_float32(rng, impl, block_m, kind, m, k, n, g):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    sizes = case_sizes(rng, kind, m, g)
    with jax.default_matmul_precision("highest"):
        dw = grouped_matmul_transposed(
            x, dy, jnp.asarray(sizes), implementation=impl,
            config=GroupedMatmulConfig(block_m=block_m),
        )
    assert dw.shape == (g, k, n) and dw.dtype == jnp.float32
    expected = np_tgmm(np.asarray(x), np.asarray(dy), sizes)
    np.testing.assert_allclose(np.asarray(dw), expected, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(dw)[sizes == 0] == 0)  # empty groups are exactly zero


@pytest.mark.parametrize("impl", IMPLS)
def test_tgmm_bfloat16(rng, impl):
    m, k, n, g = 200, 32, 24, 8
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    sizes = case_sizes(rng, "random_pad", m, g)
    dw = grouped_matmul_transposed(
        x, dy, jnp.asarray(sizes), implementation=impl, config=GroupedMatmulConfig(block_m=32)
    )
    assert dw.dtype == jnp.bfloat16
    expected = np_tgmm(np.asarray(x.astype(jnp.float32)), np.asarray(dy.astype(jnp.float32)), sizes)
    assert rel_err(dw, expected) <= 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_tgmm_num_groups_and_nan_padding(rng, impl):
    m, k, n = 40, 8, 4
    x = rng.standard_normal((m, k)).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    sizes = np.array([6, 0, 20, 4], np.int32)
    x[30:] = np.nan  # garbage in padding rows must not leak into dw
    dw = grouped_matmul_transposed(
        jnp.asarray(x), jnp.asarray(dy), jnp.asarray(sizes), num_groups=3,
        implementation=impl, config=GroupedMatmulConfig(block_m=16),
    )
    assert dw.shape == (3, k, n)
    expected = np_tgmm(x[:30], dy[:30], sizes)[:3]
    np.testing.assert_allclose(np.asarray(dw), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["random_pad", "first", "last"])
def test_grad_matches_reference(rng, impl, kind):
    m, k, n, g = 96, 16, 12, 6
    x, w = make_inputs(rng, m, k, n, g)
    sizes = jnp.asarray(case_sizes(rng, kind, m, g))
    cot = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    cfg = GroupedMatmulConfig(block_m=32)

    def loss(fn, x, w):
        return jnp.sum(fn(x, w) * cot)

    gmm = lambda x, w: grouped_matmul(x, w, sizes, implementation=impl, config=cfg)
    ref = lambda x, w: grouped_matmul_reference(x, w, sizes)
    with jax.default_matmul_precision("highest"):
        dx, dw = jax.jit(jax.grad(lambda x, w: loss(gmm, x, w), argnums=(0, 1)))(x, w)
        dx_ref, dw_ref = jax.grad(lambda x, w: loss(ref, x, w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_ref), rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(dx)[int(sizes.sum()) :] == 0)  # padding rows get no gradient


def test_grad_bfloat16_dtypes(rng):
    x, w = make_inputs(rng, 64, 16, 8, 4, jnp.bfloat16)
    sizes = jnp.asarray([10, 0, 30, 20], jnp.int32)
    dx, dw = jax.grad(
        lambda x, w: grouped_matmul(x, w, sizes, preferred_element_type=jnp.float32).sum(),
        argnums=(0, 1),
    )(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16


# ---------------------------------------------------------------- jit / API


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_changing_group_sizes_does_not_recompile(rng, impl):
    m, k, n, g = 64, 8, 8, 4
    x, w = make_inputs(rng, m, k, n, g)
    f = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, implementation=impl))
    for _ in range(3):
        sizes = random_sizes(rng, int(rng.integers(0, m + 1)), g)
        with jax.default_matmul_precision("highest"):
            out = f(x, w, jnp.asarray(sizes))
        np.testing.assert_allclose(np.asarray(out), np_gmm(np.asarray(x), np.asarray(w), sizes), rtol=1e-5, atol=1e-4)
    assert f._cache_size() == 1


def test_default_is_xla_and_never_ragged_dot(rng):
    assert default_implementation() == "xla"  # CPU
    x, w = make_inputs(rng, 32, 8, 8, 4)
    sizes = jnp.asarray([8, 8, 8, 8], jnp.int32)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: grouped_matmul(x, w, sizes).sum(), (0, 1)))(x, w))
    assert "ragged_dot" not in jaxpr


def test_zero_rows_in_all_groups(rng):
    x, w = make_inputs(rng, 40, 8, 8, 4)
    out = grouped_matmul(x, w, jnp.zeros(4, jnp.int32))
    assert np.all(np.asarray(out) == 0)
    dw = grouped_matmul_transposed(x, x, jnp.zeros(4, jnp.int32))
    assert np.all(np.asarray(dw) == 0)


def test_bad_implementation_raises(rng):
    x, w = make_inputs(rng, 8, 4, 4, 2)
    sizes = jnp.asarray([4, 4], jnp.int32)
    with pytest.raises(ValueError, match="'nope'.*xla"):
        grouped_matmul(x, w, sizes, implementation="nope")
    with pytest.raises(ValueError, match="'nope'.*xla"):
        grouped_matmul_transposed(x, x, sizes, implementation="nope")
    assert "xla" in IMPLEMENTATIONS and "ragged_dot" in IMPLEMENTATIONS


def test_bad_shapes_and_config_raise(rng):
    x, w = make_inputs(rng, 8, 4, 4, 2)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(x, w, jnp.asarray([8, 0, 0], jnp.int32))
    with pytest.raises(ValueError, match="block_m"):
        GroupedMatmulConfig(block_m=0)


# The three entry points, each as f(x, w_or_dy, group_sizes, **kw), with the operand
# names their errors use. w for the transposed one is dy [M, N].
ENTRY_POINTS = {
    "grouped_matmul": (lambda x, w, gs, **kw: grouped_matmul(x, w, gs, **kw), "w"),
    "grouped_swiglu": (lambda x, w, gs, **kw: grouped_swiglu(x, w, gs, **kw), "w_gate_up"),
    "grouped_matmul_transposed": (lambda x, dy, gs, **kw: grouped_matmul_transposed(x, dy, gs, **kw), "dy"),
}


def entry_inputs(entry, x_dtype, w_dtype, m=8, k=4, n=6, g=2):
    x = jnp.ones((m, k), x_dtype)
    other = jnp.ones((m, n), w_dtype) if entry == "grouped_matmul_transposed" else jnp.ones((g, k, n), w_dtype)
    return x, other, jnp.asarray([3, 5], jnp.int32)


@pytest.mark.parametrize("impl", [None, "xla", "ragged_dot", "mosaic_gpu", "triton"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("x_dtype,w_dtype", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                                             (jnp.bfloat16, jnp.float16)])
def test_mixed_operand_dtypes_are_refused(entry, impl, x_dtype, w_dtype):
    """Operands are not promoted: float32 x against bfloat16 weights ran in float32 on
    the XLA path (silently off the GPU kernels' bf16 path). Refused, naming both dtypes."""
    fn, other = ENTRY_POINTS[entry]
    x, w, gs = entry_inputs(entry, x_dtype, w_dtype)
    want = rf"x and {other} must have the same dtype, got x {jnp.dtype(x_dtype).name} and {other} {jnp.dtype(w_dtype).name}"
    with pytest.raises(TypeError, match=want):
        fn(x, w, gs, implementation=impl)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_non_float_operands_and_group_sizes_are_refused(entry):
    fn, other = ENTRY_POINTS[entry]
    x, w, gs = entry_inputs(entry, jnp.float32, jnp.float32)
    with pytest.raises(TypeError, match="x must have a floating dtype .*got int32"):
        fn(x.astype(jnp.int32), w.astype(jnp.int32), gs)
    with pytest.raises(TypeError, match=f"{other} must have a floating dtype .*got bool"):
        fn(x, w.astype(bool), gs)
    with pytest.raises(TypeError, match="group_sizes must have an integer dtype .*got float32"):
        fn(x, w, gs.astype(jnp.float32))
    with pytest.raises(TypeError, match="group_sizes must have an integer dtype .*got bool"):
        fn(x, w, gs > 3)
    with pytest.raises(TypeError, match="group_sizes must be an array .*got list"):
        fn(x, w, [3, 5])
    with pytest.raises(TypeError, match=f"{other} must be an array .*got list"):
        fn(x, np.asarray(w).tolist(), gs)
    with pytest.raises(TypeError, match="preferred_element_type must be a floating dtype .*got int32"):
        fn(x, w, gs, preferred_element_type=jnp.int32)
    with pytest.raises(TypeError, match="preferred_element_type must be a floating dtype .*got 'nope'"):
        fn(x, w, gs, preferred_element_type="nope")
    with pytest.raises(ValueError, match=r"unknown grouped_matmul implementation \['xla'\]; allowed: .*xla"):
        fn(x, w, gs, implementation=["xla"])
    # NumPy operands are arrays too, and a float16 output of float32 operands is allowed.
    assert fn(np.asarray(x), np.asarray(w), np.asarray(gs), preferred_element_type=jnp.float16).dtype == jnp.float16


def test_row_scale_any_float_dtype_but_not_integer(rng):
    """Routing weights are float32 next to bf16 activations (experts.routed_experts):
    any float row_scale is taken (applied in float32); an integer or bool one is refused."""
    x, w = make_inputs(rng, 8, 4, 6, 2, jnp.bfloat16)
    gs = jnp.asarray([3, 5], jnp.int32)
    scale = jnp.asarray(rng.random(8), jnp.float32)
    out = grouped_matmul(x, w, gs, row_scale=scale, preferred_element_type=jnp.float32)
    base = grouped_matmul(x, w, gs, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(base) * np.asarray(scale)[:, None], rtol=1e-6)
    grouped_matmul(x, w, gs, row_scale=scale.astype(jnp.bfloat16))
    for bad in (jnp.ones(8, jnp.int32), jnp.ones(8, bool)):
        with pytest.raises(TypeError, match=f"row_scale must have a floating dtype, got {bad.dtype}"):
            grouped_matmul(x, w, gs, row_scale=bad)
    with pytest.raises(TypeError, match="row_scale must be an array .*got list"):
        grouped_matmul(x, w, gs, row_scale=[1.0] * 8)


def test_shape_errors_name_the_argument():
    x, w = jnp.ones((8, 4)), jnp.ones((2, 4, 6))
    gs = jnp.asarray([3, 5], jnp.int32)
    with pytest.raises(ValueError, match=r"x must be 2-D \[M, K\], got shape \(1, 8, 4\)"):
        grouped_matmul(x[None], w, gs)
    with pytest.raises(ValueError, match=r"w must be 3-D \[G, K, N\], got shape \(4, 6\)"):
        grouped_matmul(x, w[0], gs)
    with pytest.raises(ValueError, match=r"w_gate_up must be 3-D \[G, K, N\], got shape \(4, 6\)"):
        grouped_swiglu(x, w[0], gs)
    with pytest.raises(ValueError, match=r"x's K=4 must equal w's K=5"):
        grouped_matmul(x, jnp.ones((2, 5, 6)), gs)
    with pytest.raises(ValueError, match=r"group_sizes must be an integer array of shape \(2,\) .*got int32\[3\]"):
        grouped_swiglu(x, w, jnp.asarray([3, 5, 0], jnp.int32))
    with pytest.raises(ValueError, match=r"dy must be 2-D \[M, N\], got shape \(8,\)"):
        grouped_matmul_transposed(x, x[:, 0], gs)
    with pytest.raises(ValueError, match=r"x and dy must have the same number of rows M, got x \(8, 4\) and dy \(7, 4\)"):
        grouped_matmul_transposed(x, x[:7], gs)
    with pytest.raises(ValueError, match=r"group_sizes must be 1-D \[G\], got shape \(1, 2\)"):
        grouped_matmul_transposed(x, x, gs[None])


def test_num_groups_must_be_an_int():
    x, gs = jnp.ones((8, 4)), jnp.asarray([3, 5], jnp.int32)
    for bad in (1.0, True, jnp.float32(1)):
        with pytest.raises(TypeError, match=r"num_groups must be an int .*got"):
            grouped_matmul_transposed(x, x, gs, num_groups=bad)
    with pytest.raises(ValueError, match=r"num_groups must be in \[0, 2\], got 3"):
        grouped_matmul_transposed(x, x, gs, num_groups=3)
    assert grouped_matmul_transposed(x, x, gs, num_groups=np.int64(1)).shape == (1, 4, 4)


@pytest.mark.parametrize("block_m", [1, 7, 32])
def test_work_items_cover_each_real_row_once(rng, block_m):
    from pallas_kernels.grouped_matmul.xla import make_work_items

    m, g = 100, 12
    sizes = random_sizes(rng, int(rng.integers(0, m + 1)), g)
    items = make_work_items(jnp.asarray(sizes), m, block_m)
    n = int(items.num_items)
    assert n <= -(-m // block_m) + g - 1  # megablox bound, sizes the static arrays
    groups, tiles = np.asarray(items.group_ids)[:n], np.asarray(items.tile_ids)[:n]
    assert np.all(sizes[groups] > 0)  # empty groups are never visited
    covered = np.zeros(m, np.int64)
    ends = np.cumsum(sizes)
    for grp, tile in zip(groups, tiles):
        lo, hi = max(ends[grp] - sizes[grp], tile * block_m), min(ends[grp], (tile + 1) * block_m)
        assert lo < hi  # every live item does real work
        covered[lo:hi] += 1
    np.testing.assert_array_equal(covered, (np.arange(m) < sizes.sum()).astype(np.int64))


def np_clipped_sizes(sizes: np.ndarray, m: int) -> np.ndarray:
    """The documented reading of group_sizes: negatives count as 0, rows past M are cut."""
    ends = np.minimum(np.cumsum(np.maximum(sizes, 0).astype(np.int64)), m)
    return np.diff(ends, prepend=0).astype(np.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sizes", [[8, 5], [3, 9, 4], [5, -2, 3], [-3, 4, 20], [-5, -1, 12, 3],
                                   [2**31 - 1, 2**31 - 1, 3], [4, 2**31 - 1, 2**31 - 1, 1]])  # int32 cumsum overflows
def test_overfull_and_negative_group_sizes_are_clipped(rng, impl, sizes):
    """sum(group_sizes) > M cuts the last groups at M (a cut group must not reach back
    into its predecessor's rows); negative sizes count as 0, as in the Pallas kernels'
    schedule, the reference and the gradients' padding mask. Every loop implementation
    reads them so (ragged_dot clips before `lax.ragged_dot`, which has no defined result
    for them); the Pallas kernels' copy is in test_grouped_matmul_kernels.py."""
    m, k, n = 10, 8, 6
    sizes = np.asarray(sizes, np.int32)
    clipped = np_clipped_sizes(sizes, m)
    x, w = make_inputs(rng, m, k, n, len(sizes))
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    gs, cfg = jnp.asarray(sizes), GroupedMatmulConfig(block_m=4)
    with jax.default_matmul_precision("highest"):
        out = grouped_matmul(x, w, gs, implementation=impl, config=cfg)
        dw = grouped_matmul_transposed(x, dy, gs, implementation=impl, config=cfg)
        ref = grouped_matmul_reference(x, w, gs)
        dx, dw_grad = jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, gs, implementation=impl, config=cfg) * dy),
                               (0, 1))(x, w)
    expected = np_gmm(np.asarray(x), np.asarray(w), clipped)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ref), expected, rtol=1e-5, atol=1e-4)
    expected_dw = np_tgmm(np.asarray(x), np.asarray(dy), clipped)
    np.testing.assert_allclose(np.asarray(dw), expected_dw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw_grad), expected_dw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), np_gmm(np.asarray(dy), np.asarray(jnp.swapaxes(w, 1, 2)), clipped),
                               rtol=1e-5, atol=1e-4)


def test_eager_calls_do_not_recompile(rng):
    """Eager calls with new group_sizes reuse one compiled program (the doc's promise
    holds outside jit too: an eager while_loop would be retraced and recompiled)."""
    from moe_helpers import count_compiles

    m, k, n, g = 64, 8, 8, 4
    x, w = make_inputs(rng, m, k, n, g)
    scale = jnp.asarray(rng.standard_normal(m), jnp.float32)

    def call():
        sizes = jnp.asarray(random_sizes(rng, int(rng.integers(0, m + 1)), g))
        jax.block_until_ready(grouped_matmul(x, w, sizes, implementation="xla", row_scale=scale))
        jax.block_until_ready(grouped_matmul_transposed(x, x, sizes, implementation="xla"))

    call()
    with count_compiles() as compiles:
        call()
        call()
    assert compiles[0] == 0
