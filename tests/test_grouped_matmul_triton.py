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
