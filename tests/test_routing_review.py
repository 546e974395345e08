"""Router edge cases found in review, each against an independent NumPy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wideep_jax.routing import RouterSpec, route, softmax_topk


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_softmax_selects_on_logits_where_probabilities_underflow(jit, norm):
    """exp(-100) is a float32 denormal (flushed to 0 by XLA) and exp(-250) is 0: selecting
    on the probabilities would tie these experts with a -inf (masked) one and take the
    lowest index. The experts with the larger logits must win, in logit order."""
    logits = np.array([
        [-np.inf, -150.0, 50.0, -50.0, -np.inf, -60.0, -200.0, 0.0],
        [-np.inf, -np.inf, -300.0, 0.0, -np.inf, -400.0, -np.inf, -np.inf],
    ], np.float32)
    k = 5
    fn = jax.jit(softmax_topk, static_argnums=1, static_argnames="norm_topk_prob") if jit else softmax_topk
    got = fn(jnp.asarray(logits), k, norm_topk_prob=norm)
    want_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # top-k of the logits
    np.testing.assert_array_equal(np.asarray(got.ids), want_ids)
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    w = np.take_along_axis(p, want_ids, -1)
    if norm:
        w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got.weights), w, rtol=1e-6, atol=1e-30)
    # route() gives the same, and a -inf expert is never picked while a finite one is left.
    via_route = route(jnp.asarray(logits), k, RouterSpec(norm_topk_prob=norm))
    np.testing.assert_array_equal(np.asarray(via_route.ids), want_ids)
    assert not np.any(np.isneginf(np.take_along_axis(logits, np.asarray(got.ids), -1))[0])


@pytest.mark.parametrize("kind", ["softmax", "llama4"])
def test_group_knobs_on_non_grouped_router_say_they_must_be_1(kind):
    """n_group=3 with 8 experts on a softmax / llama4 router: the fix is n_group=1, not "a
    divisor of 8" (which the next validate would refuse as well)."""
    spec = RouterSpec(kind=kind, norm_topk_prob=False, n_group=3)
    with pytest.raises(ValueError) as err:
        spec.validate(num_experts=8, top_k=1)
    msg = str(err.value)
    assert "RouterSpec.n_group=3" in msg and "only applies to kind='noaux_tc'" in msg, msg
    assert f"must be 1 for kind={kind!r}" in msg and "divide" not in msg, msg
    # The noaux_tc router still names the divisibility rule.
    with pytest.raises(ValueError, match=r"RouterSpec\.n_group=3: must divide num_experts \(8\)"):
        RouterSpec(kind="noaux_tc", n_group=3).validate(num_experts=8, top_k=1)


@pytest.mark.parametrize("kind,on_input", [("softmax", False), ("llama4", True)])
def test_reference_ignores_masked_tokens_routing_weights_in_gradients(rng, kind, on_input):
    """A masked-out token's precomputed routing (ids -1, NaN weights: padding) reaches no
    output and no gradient of the dense reference, as for the layer (it was 0 * NaN in
    the expert weights' gradients, and NaN for the masked weights themselves)."""
    from moe_helpers import make_layer, make_spec, random_routing, random_tokens, unsharded
    from wideep_jax.reference import dense_moe_reference
    from wideep_jax.routing import Routing

    spec = make_spec(kind=kind, top_k=2, experts=8, shared=1, on_input=on_input)
    weights = unsharded(make_layer(spec, backend="CUTLASS", ep=1).weights())
    num_tokens = 6
    x = random_tokens(rng, num_tokens, spec.hidden_size)
    routing = random_routing(rng, num_tokens, spec.num_experts, spec.top_k)
    mask = jnp.ones(num_tokens, bool).at[2].set(False)
    cot = jnp.asarray(rng.standard_normal((num_tokens, spec.hidden_size)), jnp.float32)
    clean = Routing(routing.ids.at[2].set(0), routing.weights.at[2].set(0.0))
    dirty = Routing(routing.ids.at[2].set(-1), routing.weights.at[2].set(jnp.nan))

    def loss(w, rw, ids):
        return jnp.sum(dense_moe_reference(x, w, spec, routing=Routing(ids, rw), token_mask=mask) * cot)

    grad = jax.grad(loss, argnums=(0, 1), allow_int=True)
    g_clean, g_dirty = grad(weights, clean.weights, clean.ids), grad(weights, dirty.weights, dirty.ids)
    np.testing.assert_array_equal(np.asarray(loss(weights, dirty.weights, dirty.ids)),
                                  np.asarray(loss(weights, clean.weights, clean.ids)))
    leaves_clean, leaves_dirty = jax.tree.leaves(g_clean), jax.tree.leaves(g_dirty)
    assert len(leaves_clean) == len(leaves_dirty)
    for a, b in zip(leaves_dirty, leaves_clean):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(g_dirty[1][2]), 0.0)
