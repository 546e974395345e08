"""Review of pallas_kernels: gradients of the row gather / combine, and group_sizes
read alike by every grouped-matmul implementation (forward and weight gradient).

CPU only: the Pallas kernels run in their interpret modes at small shapes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul, grouped_matmul_transposed, grouped_swiglu, permute
from pallas_kernels.grouped_matmul import MosaicTgmmConfig
from pallas_kernels.grouped_matmul.triton import TritonConfig

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
K, N = 64, 128


def np_clipped(sizes, m: int) -> np.ndarray:
    """Sizes as every implementation reads them: negatives 0, groups cut at M."""
    ends = np.minimum(np.cumsum(np.clip(np.asarray(sizes, np.int64), 0, m)), m)
    return np.diff(np.concatenate([[0], ends])).astype(np.int64)


def np_gmm(x, w, sizes):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, size in enumerate(sizes):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return out


def np_tgmm(x, dy, sizes):
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    dw, start = np.zeros((len(sizes), x.shape[1], dy.shape[1])), 0
    for g, size in enumerate(sizes):
        dw[g] = x[start:start + size].T @ dy[start:start + size]
        start += size
    return dw


def close(got, want, tol=1e-2):
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any()
    assert np.linalg.norm(got - want) <= tol * max(np.linalg.norm(want), 1e-30)


# ------------------------------------------------------------ permute: gradients


def test_gather_rows_gradient_goes_to_the_rows_the_forward_read():
    """gather_rows clamps a bad index (negatives read row 0, past-the-end rows N-1):
    its gradient must scatter into those same rows. The bare pallas_call had no
    transpose (jax.grad failed with a pytree error); NumPy-style .at[].add would wrap
    a negative index into another row and drop one >= N."""
    x = jnp.arange(15, dtype=jnp.float32).reshape(5, 3)
    index = jnp.array([-1, 2, 7, -3], jnp.int32)
    weights = jnp.arange(1.0, 5.0)[:, None] * jnp.ones((1, 3))
    read = permute.gather_rows(x, index, interpret=True)
    np.testing.assert_array_equal(np.asarray(read), np.asarray(x)[[0, 2, 4, 0]])
    dx = jax.jit(jax.grad(lambda x: jnp.sum(permute.gather_rows(x, index, interpret=True) * weights)))(x)
    want = np.zeros((5, 3), np.float32)
    for r, row in enumerate([0, 2, 4, 0]):
        want[row] += r + 1
    np.testing.assert_array_equal(np.asarray(dx), want)
    _, tangent = jax.jvp(lambda x: permute.gather_rows(x, index, interpret=True), (x,), (2 * x,))
    np.testing.assert_array_equal(np.asarray(tangent), 2 * np.asarray(read))
    # bf16 rows: the gradient comes back in x's dtype
    dx16 = jax.grad(lambda x: jnp.sum(permute.gather_rows(x, index, interpret=True).astype(jnp.float32)))(
        x.astype(jnp.bfloat16))
    assert dx16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dx16, np.float32)[:, 0], [2, 0, 1, 0, 1])


def test_combine_rows_gradient_skips_invalid_pairs():
    y = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)
    position = jnp.array([[0, 5], [-2, 9], [3, 3]], jnp.int32)  # -2 reads row 0, 9 reads row 5
    valid = jnp.array([[True, False], [True, True], [True, True]])
    scale = jnp.arange(1.0, 4.0)[:, None]
    dy = jax.grad(lambda y: jnp.sum(permute.combine_rows(y, position, valid, interpret=True) * scale))(y)
    np.testing.assert_array_equal(np.asarray(dy)[:, 0], [1 + 2, 0, 0, 3 + 3, 0, 2])
    _, tangent = jax.jvp(lambda y: permute.combine_rows(y, position, valid, interpret=True), (y,), (y,))
    np.testing.assert_array_equal(np.asarray(tangent),
                                  np.asarray(permute.combine_rows(y, position, valid, interpret=True)))


def test_experts_pallas_gather_gradient_matches_its_forward(monkeypatch):
    """The layer's Pallas permute backward scatter-adds into the rows the forward read: a
    negative index's gradient went to the last row (wrapped), one >= N's was dropped."""
    from wideep_jax import experts

    monkeypatch.setattr(experts.permute_kernels, "gather_rows",
                        functools.partial(permute.gather_rows, interpret=True))
    x = jnp.arange(15, dtype=jnp.float32).reshape(5, 3)
    index = jnp.array([-1, 2, 7], jnp.int32)
    dx = jax.grad(lambda x: jnp.sum(experts._pallas_gather(x, index)))(x)
    np.testing.assert_array_equal(np.asarray(dx)[:, 0], [1, 0, 1, 0, 1])  # rows 0 and 4 (clamped), row 2


# ------------------------------------------------------------ grouped matmul: group_sizes

TGMM_CONFIGS = {"triton": TritonConfig(block_m=16, block_k=64, block_n=128),
                "mosaic_gpu": MosaicTgmmConfig(tile_k=64, tile_n=64, max_ctas=2)}


@pytest.mark.parametrize("impl", ["triton", "mosaic_gpu", "xla"])
@pytest.mark.parametrize("sizes", [[-4, 7, -1, 0, 9, 30],  # a negative size shifted later groups (triton)
                                   [5, 2**31 - 1, 2**31 - 1, 12]])  # an int32 cumsum wraps (both)
def test_weight_gradient_clips_group_sizes_like_the_forward(rng, impl, sizes):
    """grouped_matmul_transposed (and so jax.grad's dW) reads a bad group_sizes as the
    forward does: the triton kernel took the raw cumsum (a negative size moved every
    later group, an over-full one read rows past M: NaN in interpret mode, out of
    bounds on a GPU); the mosaic one summed unclipped sizes (int32 wrap: group 3 of
    [5, 2**31-1, 2**31-1, 12] got rows 3..14)."""
    m = 20
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, N)), jnp.bfloat16)
    gs = jnp.asarray(np.array(sizes, np.int32))
    want = np_tgmm(np.asarray(x, np.float32), np.asarray(dy, np.float32), np_clipped(sizes, m))
    got = grouped_matmul_transposed(x, dy, gs, implementation=impl, config=TGMM_CONFIGS.get(impl),
                                    preferred_element_type=jnp.float32)
    close(got, want, 1e-5)
    for g, size in enumerate(np_clipped(sizes, m)):
        if size == 0:
            assert np.all(np.asarray(got)[g] == 0), g


def test_triton_gradient_of_overfull_group_sizes_is_finite(rng):
    """jax.grad through the triton implementation: dW of an over-full group_sizes."""
    m, g = 24, 3
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, K, N)) / 8, jnp.bfloat16)
    sizes = [10, 20, 7]
    cot = jnp.asarray(rng.standard_normal((m, N)), jnp.float32)
    dw = jax.grad(lambda w: jnp.sum(grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), implementation="triton",
                                                   preferred_element_type=jnp.float32) * cot))(w)
    want = np_tgmm(np.asarray(x, np.float32), np.asarray(cot.astype(jnp.bfloat16), np.float32),
                   np_clipped(sizes, m))
    close(dw, want)
    assert np.all(np.asarray(dw)[2] == 0)  # group 2 starts at M: empty


@pytest.mark.parametrize("impl", ["xla", "ragged_dot", "triton", "mosaic_gpu"])
@pytest.mark.parametrize("dtype,sizes", [(np.int8, [100, 27, 0]),  # clipped in int8, the bound M=160 wrapped
                                         (np.uint32, [2**31 + 5, 0, 0]),  # cast first, it wrapped negative
                                         (np.uint32, [40, 2**32 - 1, 3])])
def test_narrow_and_unsigned_group_sizes(rng, impl, dtype, sizes):
    """Any integer dtype of group_sizes is read by value: int8 sizes summed to 0 rows on
    xla / ragged_dot (the clip bound M wrapped in int8), and a uint32 size >= 2**31 was
    cast to a negative int32 (empty) by the Pallas kernels' schedule and dW."""
    m, g = 160, 3
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, K, N)) / 8, jnp.bfloat16)
    gs = jnp.asarray(np.array(sizes, dtype))
    clipped = np_clipped(np.array(sizes, np.int64), m)
    x32 = np.asarray(x, np.float32)
    live = int(clipped.sum())
    out = np.asarray(grouped_matmul(x, w, gs, implementation=impl), np.float64)[:live]
    close(out, np_gmm(x32, np.asarray(w, np.float32), clipped)[:live])
    dy = jnp.asarray(rng.standard_normal((m, N)), jnp.bfloat16)  # N=128: mosaic_gpu's own dW kernel
    dw = grouped_matmul_transposed(x, dy, gs, implementation=impl, preferred_element_type=jnp.float32)
    close(dw, np_tgmm(x32, np.asarray(dy, np.float32), clipped), 1e-5)


@pytest.mark.parametrize("impl", ["triton", "mosaic_gpu", "xla", "ragged_dot"])
@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
def test_no_groups_gives_zeros(rng, impl, epilogue):
    """G = 0 (w [0, K, N]): every row is padding. xla returned zeros; the Pallas
    wrappers failed in the tile schedule with a gather-slice TypeError."""
    m = 16
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = jnp.zeros((0, K, N), jnp.bfloat16)
    gs = jnp.zeros((0,), jnp.int32)
    fn = grouped_swiglu if epilogue == "swiglu" else grouped_matmul
    out = fn(x, w, gs, implementation=impl)
    assert out.shape == (m, N // 2 if epilogue == "swiglu" else N)
    dx, dw = jax.grad(lambda x, w: fn(x, w, gs, implementation=impl).astype(jnp.float32).sum(), (0, 1))(x, w)
    assert dw.shape == (0, K, N) and np.all(np.asarray(dx, np.float32) == 0)


# ------------------------------------------------------------ GPU (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["triton", "mosaic_gpu"])
def test_gpu_weight_gradient_of_bad_group_sizes(rng, impl):
    """The compiled dW kernels with negative and over-full (int32-wrapping) sizes: only
    the Python wrappers changed (clipped group bounds), no kernel body; before, the
    triton kernel read rows past M here."""
    m = 40
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, N)), jnp.bfloat16)
    for sizes in ([-4, 7, -1, 0, 9, 60], [5, 2**31 - 1, 2**31 - 1, 12]):
        got = grouped_matmul_transposed(x, dy, jnp.asarray(sizes, jnp.int32), implementation=impl,
                                        preferred_element_type=jnp.float32)
        close(got, np_tgmm(np.asarray(x, np.float32), np.asarray(dy, np.float32), np_clipped(sizes, m)), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_gpu_gather_and_combine_gradients():
    """jax.grad of the compiled row gather and combine (custom_jvp around the kernels)."""
    x = jnp.arange(5 * 64, dtype=jnp.float32).reshape(5, 64).astype(jnp.bfloat16)
    index = jnp.array([-1, 2, 7, -3], jnp.int32)
    dx = jax.grad(lambda x: jnp.sum(permute.gather_rows(x, index).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(dx, np.float32)[:, 0], [2, 0, 1, 0, 1])
    position = jnp.array([[0, 4], [-2, 9]], jnp.int32)
    valid = jnp.array([[True, False], [True, True]])
    dy = jax.grad(lambda y: jnp.sum(permute.combine_rows(y, position, valid, out_dtype=jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(dy, np.float32)[:, 0], [2, 0, 0, 0, 1])
