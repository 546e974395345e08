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


@pytest.mark.parametrize("sizes", ["random", "zeros", "one_giant", "all_last"])
def test_grouped_matmul_bf16(rng, sizes):
    m, k, n, g = 1000, 256, 384, 8  # m not a multiple of any tile
    real = 900
    group_sizes = {
        "random": np.bincount(rng.integers(0, g, real), minlength=g),
        "zeros": np.array([0, 300, 0, 0, 200, 400, 0, 0]),
        "one_giant": np.array([0, 0, 0, real, 0, 0, 0, 0]),
        "all_last": np.array([0] * (g - 1) + [real]),
    }[sizes]
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((g, k, n)).astype(np.float32)
    out = grouped_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16),
                         jnp.asarray(group_sizes, jnp.int32), preferred_element_type=jnp.float32)
    out = np.asarray(out, np.float64)
    ref = np.zeros((m, n))
    start = 0
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    wb = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)
    for grp, size in enumerate(group_sizes):
        ref[start:start + size] = xb[start:start + size] @ wb[grp]
        start += size
    assert_close(out, ref, rtol=1e-2)
    assert np.all(out[real:] == 0)


@pytest.mark.parametrize("kind", ["softmax", "noaux_tc"])
def test_wideep_layer_bf16(rng, kind):
    spec = make_spec(kind=kind, top_k=4, shared=1, hidden=256, inter=128, experts=32, dtype=jnp.bfloat16)
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
    import test_eplb_online as online
    from wideep_jax.eplb.resharding import host_memory_kind

    assert host_memory_kind(make_layer(make_spec(), ep=_ep()).mesh) == "pinned_host"
    online.test_reshard_moves_exactly_the_changed_slots(rng, mode, "random")
    online.test_reshard_moves_exactly_the_changed_slots(rng, mode, "all_change")
    online.test_online_loop_100_updates(rng, mode)
