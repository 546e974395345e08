"""Online EPLB review: bad inputs to eplb_update / OnlineBalancer refused with a clear error
(before, some were taken silently or failed deep in XLA)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_helpers import make_layer, make_mesh, make_spec
from test_eplb_online import EP, covering_placement, expert_weights, slot_weights_of
from wideep_jax.eplb.balancer import OnlineBalancer
from wideep_jax.eplb.online import eplb_update
from wideep_jax.eplb.resharding import make_master_copy
from wideep_jax.eplb.state import EplbConfig, init_state


def _setup(rng, reshard="collective"):
    mesh = make_mesh(EP)
    placement = covering_placement(rng, 12, 8, EP)
    config = EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=EP, reshard=reshard)
    return mesh, placement, config, expert_weights(rng, 8)


def test_eplb_update_refuses_float_and_non_array_counts(rng):
    """Float counts were accumulated as loads: a NaN made the layer's load NaN for good, so
    it was never re-placed again, silently. A list failed with AttributeError."""
    mesh, placement, config, masters = _setup(rng)
    state = init_state(placement[None], 8)
    for bad in (jnp.full((1, 8), jnp.nan), np.full((1, 8), 3.0, np.float32), jnp.ones((1, 8), bool)):
        weights = [slot_weights_of(masters, placement, mesh)]
        with pytest.raises(ValueError, match=rf"counts: got dtype {bad.dtype}; allowed: an integer dtype"):
            eplb_update(state, weights, bad, config=config, mesh=mesh)
    with pytest.raises(ValueError, match=r"counts: got list; allowed: an int array \[num_layers, num_experts\]"):
        eplb_update(state, [slot_weights_of(masters, placement, mesh)], [[1] * 8], config=config, mesh=mesh)
    # Integer counts still work, and a hot expert still gets a new placement.
    counts = np.zeros((1, 8), np.int32)
    counts[0, 0] = 1000
    state, _ = eplb_update(state, [slot_weights_of(masters, placement, mesh)], counts, config=config, mesh=mesh)
    assert int(state.moved_slots[0]) > 0


def test_a_layer_or_weight_array_given_twice_is_refused(rng):
    """The step donates the weights: the same array twice failed at run time inside XLA
    ('Attempt to donate the same buffer twice'), after the balancer was built."""
    mesh, placement, config, masters = _setup(rng)
    config = EplbConfig(num_layers=2, num_experts=8, num_slots=12, ep_size=EP, reshard="collective")
    weights = slot_weights_of(masters, placement, mesh)
    state = init_state(np.stack([placement, placement]), 8)
    with pytest.raises(ValueError, match=r"weights\[1\] holds the array of weights\[0\] again"):
        eplb_update(state, [weights, weights], np.ones((2, 8), np.int32), config=config, mesh=mesh)
    layer = make_layer(make_spec(experts=8), ep=EP,
                       load_balancer={"num_slots": 12, "layer_updates_per_iter": 1, "reshard": "collective"})
    with pytest.raises(ValueError, match=r"layers\[1\] appears twice in layers; allowed: each MoELayer once"):
        OnlineBalancer([layer, layer])


def test_eplb_update_refuses_a_master_of_other_shapes(rng):
    """A master copy whose leaves are not the slot weights' experts (swapped, or one left
    out) failed deep in the trace ('Incompatible shapes for broadcasting', a pytree error)."""
    mesh, placement, config, masters = _setup(rng, reshard="host")
    state = init_state(placement[None], 8)
    master = make_master_copy(slot_weights_of(masters, placement, mesh), placement, 8, mesh)
    counts = np.zeros((1, 8), np.int32)
    counts[0, 0] = 1000
    with pytest.raises(ValueError,
                       match=r"master\[0\] leaf 0 has shape \(\d+, 5, 6\); allowed: \[experts, \*\[6, 10\]\]"):
        eplb_update(state, [slot_weights_of(masters, placement, mesh)], counts, config=config, mesh=mesh,
                    master=[(master[1], master[0])])
    with pytest.raises(ValueError, match=r"master\[0\] is a .*; allowed: the structure of weights\[0\]"):
        eplb_update(state, [slot_weights_of(masters, placement, mesh)], counts, config=config, mesh=mesh,
                    master=[(master[0],)])
    # A master of another dtype: moved slots were cast to the weights' dtype silently.
    half = (jax.device_put(np.asarray(master[0]).astype(np.float16), master[0].sharding), master[1])
    with pytest.raises(ValueError, match=r"master\[0\] leaf 0 has dtype float16; allowed: float32"):
        eplb_update(state, [slot_weights_of(masters, placement, mesh)], counts, config=config, mesh=mesh,
                    master=[half])
    weights = [slot_weights_of(masters, placement, mesh)]
    state, weights = eplb_update(state, weights, counts, config=config, mesh=mesh, master=[master])
    new = np.asarray(state.placement[0])
    assert (new != placement).any()
    for got, want in zip(weights[0], masters):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[new])


def test_layers_with_other_balancer_settings_or_backend_are_refused():
    """One step serves every layer with layers[0]'s settings: a later layer's own decay,
    reshard or backend was ignored, silently."""
    lb = {"num_slots": 12, "layer_updates_per_iter": 1, "reshard": "collective"}
    first = make_layer(make_spec(experts=8), ep=EP, load_balancer=lb)
    other = make_layer(make_spec(experts=8), ep=EP, seed=1, load_balancer={**lb, "decay": 0.5})
    with pytest.raises(ValueError, match=r"layers\[1\]'s moe_config.load_balancer gives .*decay=0.5.*allowed: "
                                         r"the same balancer settings in every layer"):
        OnlineBalancer([first, other])
    same = make_layer(make_spec(experts=8), ep=EP, seed=2, load_balancer=dict(lb))
    assert OnlineBalancer([first, same]).config.decay == first.config.load_balancer.decay
    overridden = EplbConfig(num_layers=2, num_experts=8, num_slots=12, ep_size=EP, reshard="collective")
    assert OnlineBalancer([first, other], overridden).config == overridden   # config= overrides them all
    static = make_layer(make_spec(experts=8), ep=EP, seed=3, backend="CUTLASS", load_balancer={"num_slots": 12})
    with pytest.raises(ValueError, match=r"moe_config.backend: got 'CUTLASS' in layers\[1\]; allowed: 'WIDEEP'"):
        OnlineBalancer([first, static])


def test_balancer_step_compiles_once_for_numpy_device_and_stats_counts(rng):
    """Counts as MoEStats, a NumPy array and a single-device jax array reach the step with
    one sharding: switching between them compiled the step again (one program per kind)."""
    from moe_helpers import random_tokens
    from wideep_jax.eplb.online import compiled_step

    spec = make_spec(kind="softmax", experts=16, top_k=4, hidden=16, inter=8)
    lb = {"num_slots": 24, "layer_updates_per_iter": 1, "reshard": "collective"}
    layers = [make_layer(spec, ep=EP, seed=i, load_balancer=lb) for i in range(2)]
    balancer = OnlineBalancer(layers)
    x = random_tokens(rng, 64, spec.hidden_size)
    stats = [layer(x)[1] for layer in layers]
    draws = [lambda: stats, lambda: rng.integers(0, 50, (2, 16), dtype=np.int32),
             lambda: jax.device_put(jnp.asarray(rng.integers(0, 50, (2, 16)), jnp.int32), jax.devices()[1])]
    for draw in draws * 2:
        balancer.step(draw())
        weights = [balancer._slot_weights(layer) for layer in layers]
        step = compiled_step(balancer.config, balancer.mesh, balancer.axis, weights, balancer.master)
        assert step._cache_size() == 1
