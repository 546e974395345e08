"""The Triton grouped-matmul kernel on CPU: interpret mode against the f32
reference, argument checks, and lowering to Triton IR for CUDA.

Dims are tiny (K, N <= 128; 16/32 blocks) so interpret mode stays fast; fresh
random inputs each run (the seed is printed on failure).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import triton
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.schedule import tile_schedule
from test_grouped_matmul_kernels import G, sizes_for  # the suite's group-size cases

EPILOGUES = ["none", "swiglu", "row_scale"]
# Lowering emits a DeprecationWarning for the Pallas Triton backend; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


# (sizes kind, M, K, N_out, config): M is never a multiple of block_m.
CASES = [
    ("zeros", 75, 64, 64, triton.TritonConfig(block_m=16, block_n=32, block_k=32)),
    ("giant", 70, 128, 64, triton.TritonConfig(block_m=32, block_n=32, block_k=32, num_warps=8)),
    ("last", 50, 64, 32, triton.TritonConfig(block_m=16, block_n=16, block_k=64)),
    ("tiny", 9, 64, 64, triton.TritonConfig(block_m=16, block_n=64, block_k=16)),
]


def reference(x, w, sizes, epilogue, row_scale):
    out = grouped_matmul_reference(x, w, jnp.asarray(sizes), preferred_element_type=jnp.float32)
    if epilogue == "swiglu":
        gate, up = jnp.split(out, 2, axis=1)
        out = jax.nn.silu(gate) * up
    elif epilogue == "row_scale":
        out = out * row_scale[:, None]
    return np.asarray(out)


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("kind,m,k,n,config", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(rng, epilogue, kind, m, k, n, config):
    sizes = sizes_for(kind, m, rng)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w_cols = 2 * n if epilogue == "swiglu" else n
    w = jnp.asarray(rng.standard_normal((G, k, w_cols)) / np.sqrt(k), jnp.bfloat16)
    row_scale = jnp.asarray(rng.random(m) + 0.5, jnp.float32) if epilogue == "row_scale" else None
    out = triton.grouped_matmul(x, w, jnp.asarray(sizes), config=config, epilogue=epilogue,
                                row_scale=row_scale, interpret=True)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    live = int(sizes.sum())
    want = reference(x, w, sizes, epilogue, row_scale)[:live]
    got = np.asarray(out[:live], np.float32)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err <= 1e-2, f"{kind}/{epilogue}: rel err {err:.3g}, sizes {sizes.tolist()}"
    # Interpret mode fills the output with NaN: padding rows must stay unwritten.
    assert np.isnan(np.asarray(out[live:], np.float32)).all()


def test_given_aligned_schedule_and_out_dtype(rng):
    """An 8-aligned schedule (as Mosaic GPU's) starts tiles inside the previous group."""
    m, k, n = 48, 64, 32
    config = triton.TritonConfig(block_m=16, block_n=32, block_k=32)
    sizes = jnp.asarray([7, 0, 20, 0, 0, 13], jnp.int32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float16)
    w = jnp.asarray(rng.standard_normal((G, k, n)) / 8, jnp.float16)
    out = triton.grouped_matmul(x, w, sizes, config=config, out_dtype=jnp.float32, interpret=True,
                                schedule=tile_schedule(sizes, m, config.block_m, align=8))
    assert out.dtype == jnp.float32
    want = reference(x, w, sizes, "none", None)[:40]
    np.testing.assert_allclose(np.asarray(out[:40]), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    assert np.isnan(np.asarray(out[40:])).all()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(block_m=24), "24"), (dict(block_n=8), "8"), (dict(block_k=0), "0"),
    (dict(num_warps=3), "3"), (dict(num_stages=0), "0"),
])
def test_bad_config_raises(kwargs, needle):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}.*{needle}"):
        triton.TritonConfig(**kwargs)


@pytest.mark.parametrize("k,n,epilogue,dtype,needle", [
    (48, 64, "none", jnp.bfloat16, "K=48"),
    (64, 80, "none", jnp.bfloat16, "N=80"),
    (64, 96, "swiglu", jnp.bfloat16, "N=48"),
    (64, 64, "none", jnp.float32, "float32"),
    (64, 64, "row_scale", jnp.bfloat16, r"\(16,\)"),  # row_scale missing
])
def test_bad_shape_raises(k, n, epilogue, dtype, needle):
    config = triton.TritonConfig(block_m=16, block_n=32, block_k=32)
    x, w = jnp.zeros((16, k), dtype), jnp.zeros((G, k, n), dtype)
    with pytest.raises(ValueError, match=needle):
        triton.grouped_matmul(x, w, jnp.zeros((G,), jnp.int32), config=config, epilogue=epilogue,
                              interpret=True)


def test_default_config_fits():
    for m, g, k, n, epilogue in [(8192, 8, 7168, 4096, "none"), (64, 64, 2048, 1536, "swiglu"),
                                 (512, 16, 96, 48, "none")]:
        config = triton.default_config(m, g, k=k, n_out=n, epilogue=epilogue)
        assert k % config.block_k == 0 and n % config.block_n == 0, config


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("m,config", [(203, triton.TritonConfig()), (5, None)])
def test_lowers_for_cuda(epilogue, m, config):
    """Lowering to Triton IR catches most unsupported ops without a GPU."""
    k, n = 128, 256
    S = jax.ShapeDtypeStruct
    args = [S((m, k), jnp.bfloat16), S((G, k, 2 * n if epilogue == "swiglu" else n), jnp.bfloat16),
            S((G,), jnp.int32), S((m,), jnp.float32)]

    def f(x, w, group_sizes, row_scale):
        return triton.grouped_matmul(x, w, group_sizes, config=config, epilogue=epilogue,
                                     row_scale=row_scale if epilogue == "row_scale" else None)

    # The Triton lowering asks the device for its compute capability: name one.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("kind,m,k,n,config", CASES, ids=[c[0] for c in CASES])
def test_tgmm_matches_reference(rng, kind, m, k, n, config):
    """dw[g] = x_g^T dy_g; padding rows hold NaN and must never be read."""
    sizes = sizes_for(kind, m, rng)
    live = int(sizes.sum())
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16).at[live:].set(jnp.nan)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16).at[live:].set(jnp.nan)
    got = np.asarray(triton.tgmm(x, dy, jnp.asarray(sizes), config=config, out_dtype=jnp.float32,
                                 interpret=True))
    bounds = np.r_[0, np.cumsum(sizes)]
    xf, dyf = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    want = np.stack([xf[a:b].T @ dyf[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    assert got.shape == (G, k, n) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.all(got[sizes == 0] == 0)
    first = np.asarray(triton.tgmm(x, dy, jnp.asarray(sizes), num_groups=2, config=config,
                                   out_dtype=jnp.float32, interpret=True))
    np.testing.assert_array_equal(first, got[:2])


def test_tgmm_bad_inputs_raise():
    x = jnp.zeros((8, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k=32"):
        triton.tgmm(x, jnp.zeros((8, 32), jnp.bfloat16), jnp.array([8, 0]),
                    config=triton.TritonConfig(block_k=32, block_n=32))
    with pytest.raises(ValueError, match="bf16 or f16"):
        triton.tgmm(x.astype(jnp.float32), jnp.zeros((8, 32), jnp.float32), jnp.array([8, 0]))
    with pytest.raises(ValueError, match="dy"):
        triton.tgmm(x, jnp.zeros((7, 32), jnp.bfloat16), jnp.array([8, 0]))


def test_tgmm_lowers_for_cuda():
    S = jax.ShapeDtypeStruct
    args = [S((4100, 512), jnp.bfloat16), S((4100, 768), jnp.bfloat16), S((G,), jnp.int32)]
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        text = jax.jit(lambda x, dy, gs: triton.tgmm(x, dy, gs)).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
