"""Without Pallas' (deprecated) Triton backend: defaults avoid it, naming it is an error."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul, grouped_matmul_transposed, permute, triton_backend
from pallas_kernels.grouped_matmul import api, triton
from wideep_jax import experts


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(triton_backend, "plgpu_triton", None)
    assert not triton_backend.available()


def _fake_gpu(monkeypatch, capability: str):
    device = types.SimpleNamespace(platform="gpu", compute_capability=capability)
    monkeypatch.setattr(jax, "devices", lambda *a, **k: [device])


def test_this_jax_has_it():
    # jax 0.11.2 and 0.12 still ship the backend; this fails the day one drops it,
    # a reminder to move the permute kernels to Mosaic GPU.
    assert triton_backend.available()


@pytest.mark.parametrize("capability", ["8.0", "9.0"])
def test_defaults_avoid_a_missing_backend(monkeypatch, capability):
    _fake_gpu(monkeypatch, capability)
    # sm90, K multiple of 64: mosaic_gpu either way; K=48 (a multiple of 16 only): triton.
    assert api.default_implementation(jnp.bfloat16, 48, 64) == "triton"
    assert api.default_implementation(jnp.bfloat16, 128, 256) == ("mosaic_gpu" if capability == "9.0" else "triton")
    monkeypatch.setattr(triton_backend, "plgpu_triton", None)
    assert api.default_implementation(jnp.bfloat16, 48, 64) == "xla"
    assert api.default_implementation(jnp.bfloat16, 128, 256) == ("mosaic_gpu" if capability == "9.0" else "xla")


def test_permute_rows_default_without_backend(monkeypatch, no_triton, rng):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)
    pairs = types.SimpleNamespace(row_token=jnp.asarray([5, 0, 0, 3], jnp.int32))
    np.testing.assert_array_equal(np.asarray(experts.permute_rows(x, pairs)), np.asarray(x)[[5, 0, 0, 3]])
    with pytest.raises(NotImplementedError, match="gather_rows is a Pallas Triton kernel.*'xla'"):
        experts.permute_rows(x, pairs, implementation="pallas")


def test_naming_a_triton_kernel_is_an_error(no_triton, rng):
    x = jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2, 64, 64)), jnp.bfloat16)
    sizes = jnp.asarray([20, 12], jnp.int32)
    for call in (lambda: permute.gather_rows(x, jnp.zeros(4, jnp.int32), interpret=True),
                 lambda: permute.combine_rows(x, jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2), bool),
                                              interpret=True),
                 lambda: triton.grouped_matmul(x, w, sizes, interpret=True),
                 lambda: triton.tgmm(x, x, sizes, interpret=True),
                 lambda: grouped_matmul(x, w, sizes, implementation="triton"),
                 lambda: grouped_matmul_transposed(x, x, sizes, implementation="triton")):
        with pytest.raises(NotImplementedError, match="Pallas Triton backend"):
            call()
    # mosaic_gpu's dW falls back to the Triton kernel only for N not a multiple of 128.
    with pytest.raises(NotImplementedError, match=r"K=64, N=64 needs .* use implementation 'xla'"):
        grouped_matmul_transposed(x, x, sizes, implementation="mosaic_gpu")
