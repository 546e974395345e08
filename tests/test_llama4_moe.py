"""Llama 4's MoE semantics: sigmoid top-k routing, routing weight applied to the expert's input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_helpers import (assert_close, make_layer, make_spec, random_routing, random_tokens, run_layer,
                         unsharded)
from wideep_jax import MoESpec, moe_forward
from wideep_jax.reference import dense_moe_reference
from wideep_jax.routing import Routing


def _reference(layer, x, **kw):
    return dense_moe_reference(x, unsharded(layer.weights()), layer.spec, **kw)


def _numpy_llama4_moe(x, weights, spec):
    """Hugging Face's Llama4TextMoe in NumPy float64: routed_in = x * sigmoid(top logit),
    experts on routed_in, outputs summed, plus the shared expert (slot s = expert s here)."""
    w = jax.tree.map(lambda a: None if a is None else np.asarray(a, np.float64), weights)
    x = np.asarray(x, np.float64)
    silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
    mlp = lambda v, up, down: (silu(v @ up[:, :up.shape[1] // 2]) * (v @ up[:, up.shape[1] // 2:])) @ down  # noqa: E731
    logits = x @ w.router
    out = mlp(x, w.shared_gate_up, w.shared_down)
    for t in range(x.shape[0]):
        for e in np.argsort(-logits[t], kind="stable")[:spec.top_k]:
            score = 1.0 / (1.0 + np.exp(-logits[t, e]))
            out[t] += mlp(x[t] * score, w.w_gate_up[e], w.w_down[e])
    return out


def test_layer_matches_hugging_face_formula_in_numpy(rng):
    """The dense reference itself, checked once against an independent NumPy transcription."""
    spec = make_spec(kind="llama4", top_k=1, shared=1, on_input=True)
    layer = make_layer(spec, backend="CUTLASS", ep=1, seed=int(rng.integers(1 << 30)))
    x = random_tokens(rng, 12, spec.hidden_size)
    want = _numpy_llama4_moe(x, unsharded(layer.weights()), spec)
    assert_close(_reference(layer, x), want, rtol=1e-5)
    assert_close(run_layer(layer, x)[0], want, rtol=1e-5)


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
@pytest.mark.parametrize("top_k", [1, 3])
def test_wideep_matches_dense_reference(rng, ep, top_k):
    spec = make_spec(kind="llama4", top_k=top_k, shared=1, on_input=True)
    layer = make_layer(spec, ep=ep, seed=int(rng.integers(1 << 30)))
    x = random_tokens(rng, 8 * ep + 3, spec.hidden_size)  # padded to the ranks inside
    y, stats = run_layer(layer, x)
    assert_close(y, _reference(layer, x))
    assert int(stats.expert_counts.sum()) == x.shape[0] * top_k


def test_weight_on_input_is_not_weight_on_output(rng):
    """SwiGLU is not linear, so where the weight goes changes the result: both flags
    match their own reference and differ from each other."""
    outputs = {}
    for on_input in (False, True):
        spec = make_spec(kind="llama4", top_k=2, on_input=on_input)
        layer = make_layer(spec, ep=4, seed=3)
        x = random_tokens(np.random.default_rng(5), 16, spec.hidden_size)
        outputs[on_input] = np.asarray(run_layer(layer, x)[0])
        assert_close(outputs[on_input], _reference(layer, x))
    gap = np.linalg.norm(outputs[True] - outputs[False]) / np.linalg.norm(outputs[False])
    assert gap > 0.05, gap


@pytest.mark.parametrize("backend", ["WIDEEP", "CUTLASS"])
def test_adversarial_and_repeated_routing(rng, backend):
    """All tokens on one expert, and a token naming one expert twice with two weights:
    each pair is its own expert input (f(a x) + f(b x), not f((a + b) x))."""
    spec = make_spec(kind="llama4", top_k=2, experts=8, shared=1, on_input=True)
    layer = make_layer(spec, backend=backend, ep=4)
    x = random_tokens(rng, 16, spec.hidden_size)
    one_expert = Routing(jnp.full((16, 2), 7, jnp.int32), jnp.asarray(rng.uniform(0.1, 1, (16, 2)), jnp.float32))
    for routing in (one_expert, random_routing(rng, 16, 8, 2, experts=[2, 3])):
        y, stats = run_layer(layer, x, routing=routing)
        assert_close(y, _reference(layer, x, routing=routing))
        assert int(stats.expert_counts.sum()) == 32
    merged = Routing(one_expert.ids, one_expert.weights.sum(axis=1, keepdims=True).repeat(2, axis=1) / 2)
    assert not np.allclose(np.asarray(run_layer(layer, x, routing=one_expert)[0]),
                           np.asarray(run_layer(layer, x, routing=merged)[0]), rtol=1e-3)


def test_masked_tokens_and_bad_ids_under_jit(rng):
    spec = make_spec(kind="llama4", top_k=1, experts=8, on_input=True)
    layer = make_layer(spec, ep=2)
    w, config, mesh = layer.weights(), layer.config, layer.mesh
    x = random_tokens(rng, 10, spec.hidden_size)
    mask = jnp.ones(10, bool).at[4].set(False)
    fwd = jax.jit(lambda ids, wts: moe_forward(x, w, spec=spec, config=config, mesh=mesh, token_mask=mask,
                                               routing=Routing(ids, wts))[0])
    routing = random_routing(rng, 10, 8, 1)
    want = np.asarray(fwd(routing.ids, routing.weights))
    assert (want[4] == 0).all()
    assert_close(want, _reference(layer, x, routing=routing, token_mask=mask))
    got = np.asarray(fwd(routing.ids.at[6, 0].set(8), routing.weights))
    assert np.isnan(got[6]).all()
    np.testing.assert_array_equal(np.delete(got, 6, axis=0), np.delete(want, 6, axis=0))


def test_gradients_match_dense_reference(rng):
    """The router's gradient flows through the scaled inputs."""
    spec = make_spec(kind="llama4", top_k=2, shared=1, on_input=True)
    layer = make_layer(spec, ep=4)
    x = random_tokens(rng, 16, spec.hidden_size)
    weights = unsharded(layer.weights())
    cot = jnp.asarray(rng.standard_normal((16, spec.hidden_size)), jnp.float32)

    def loss_layer(w, x):
        return jnp.sum(moe_forward(x, w, spec=spec, config=layer.config, mesh=layer.mesh)[0] * cot)

    def loss_ref(w, x):
        return jnp.sum(dense_moe_reference(x, w, spec) * cot)

    g_layer = jax.jit(jax.grad(loss_layer, argnums=(0, 1), allow_int=True))(weights, x)
    g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1), allow_int=True))(weights, x)
    assert_close(g_layer[1], g_ref[1])
    for name in ("router", "w_gate_up", "w_down", "shared_gate_up", "shared_down"):
        assert_close(getattr(g_layer[0], name), getattr(g_ref[0], name))
    assert np.abs(np.asarray(g_layer[0].router)).max() > 0


def test_bfloat16(rng):
    spec = make_spec(kind="llama4", top_k=1, shared=1, on_input=True, dtype=jnp.bfloat16)
    layer = make_layer(spec, ep=4)
    x = random_tokens(rng, 32, spec.hidden_size, jnp.bfloat16)
    y, _ = run_layer(layer, x)
    assert y.dtype == jnp.bfloat16
    assert_close(y, _reference(layer, x), rtol=1e-2)


def test_llama4_preset_and_flag_validation():
    scout = MoESpec.llama4()
    assert (scout.hidden_size, scout.intermediate_size, scout.num_experts, scout.top_k) == (5120, 8192, 16, 1)
    assert scout.router.kind == "llama4" and scout.apply_router_weight_on_input and scout.shared_width == 8192
    assert MoESpec.llama4(num_experts=128).num_experts == 128
    with pytest.raises(ValueError, match="apply_router_weight_on_input=1: allowed: True or False"):
        MoESpec.llama4(apply_router_weight_on_input=1)
