"""Recompilation audit: the public jitted entry points compile nothing new when only data
changes (routing, token masks, placements and slot weights after a balancer step or set
by hand, counts, warm-up vs balancing iterations). Complements tests/test_jit.py,
test_eplb_online.py (moe_forward + OnlineBalancer over 100 steps) and test_models.py
(generate: prompts, sampling values, EOS ids, seeds)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_helpers import (TRACE_EVENT, count_compiles, make_layer, make_mesh, make_spec, random_routing, unsharded,
                         random_tokens)
from wideep_jax import MoELayer, forward_jit, load_moe_config, moe_forward
from wideep_jax.config import default_placement
from wideep_jax.reference import dense_moe_reference
from wideep_jax.eplb import EplbConfig, OnlineBalancer, compute_placement, eplb_update, init_state

EP = 4


@pytest.fixture
def rng():
    return np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))


class Counted:
    """Compiles and traces of a block: ``with Counted() as c: ...; c.pair == (0, 0)``."""

    def __enter__(self):
        self._c, self._t = count_compiles(), count_compiles(TRACE_EVENT)
        self.compiles, self.traces = self._c.__enter__(), self._t.__enter__()
        return self

    def __exit__(self, *exc):
        self._t.__exit__(*exc)
        self._c.__exit__(*exc)

    @property
    def pair(self):
        return self.compiles[0], self.traces[0]


def skewed_routing(rng, tokens, num_experts, top_k, hot):
    """Most pairs on the experts ``hot`` (a rank's worth of imbalance for the balancer)."""
    p = np.full(num_experts, 1.0)
    p[list(hot)] = 20.0
    p /= p.sum()
    ids = np.stack([rng.choice(num_experts, top_k, replace=False, p=p) for _ in range(tokens)])
    weights = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    from wideep_jax import Routing
    return Routing(jnp.asarray(ids, jnp.int32), jnp.asarray(weights))


def test_forward_jit_layer_routing_and_mask_values_never_recompile(rng):
    """forward_jit over a MoELayer: one compile per call structure (routing computed or
    given, token_mask absent or given); new tokens, masks and routings of the same shapes
    trace and compile nothing."""
    spec = make_spec(kind="noaux_tc", experts=16, top_k=4, hidden=16, inter=8, shared=1)
    layer = make_layer(spec, ep=EP, load_balancer={"num_slots": 20})
    forward = forward_jit(lambda m, x, mask, routing: m(x, token_mask=mask, routing=routing))
    tokens, n = 24, 4
    xs = [random_tokens(rng, tokens, spec.hidden_size) for _ in range(n)]
    masks = [jnp.asarray(rng.random(tokens) < 0.7) for _ in range(n)]
    routings = [random_routing(rng, tokens, spec.num_experts, spec.top_k) for _ in range(n)]
    structures = [(False, False), (True, False), (False, True), (True, True)]
    for use_mask, use_routing in structures:  # warm-up: one compile each
        forward(layer, xs[0], masks[0] if use_mask else None, routings[0] if use_routing else None)
    assert forward.jitted._cache_size() == len(structures)
    outs = []
    with Counted() as c:
        for i in range(1, n):
            for use_mask, use_routing in structures:
                outs.append(forward(layer, xs[i], masks[i] if use_mask else None,
                                    routings[i] if use_routing else None))
        jax.block_until_ready(outs)
    assert c.pair == (0, 0), f"(compiles, traces) = {c.pair} for new data of the same shapes"
    assert forward.jitted._cache_size() == len(structures)
    # The data was used: the masked-out tokens' outputs are zero and uncounted.
    y, stats = outs[-1]
    keep = np.asarray(masks[-1])
    assert np.all(np.asarray(y)[~keep] == 0) and np.any(np.asarray(y)[keep] != 0)
    assert int(stats.expert_counts.sum()) == int(keep.sum()) * spec.top_k


def test_eager_layer_calls_with_new_data_never_recompile(rng):
    """A layer called with no jit around it (a notebook) runs cached programs: new tokens,
    masks, routings (device or NumPy) and a new placement from a balancer compile nothing."""
    spec = make_spec(experts=8, top_k=2, hidden=16, inter=8)
    layer = make_layer(spec, ep=EP, load_balancer={"num_slots": 12, "layer_updates_per_iter": 1,
                                                   "reshard": "collective", "tolerance": 0.0})
    tokens = 16

    def data():
        return (random_tokens(rng, tokens, spec.hidden_size), jnp.asarray(rng.random(tokens) < 0.6),
                skewed_routing(rng, tokens, spec.num_experts, spec.top_k, hot=(0, 1)))
    x, mask, routing = data()
    layer(x)
    layer(x, token_mask=mask)
    _, stats = layer(x, token_mask=mask, routing=routing)
    balancer = OnlineBalancer([layer])
    balancer.step([stats])
    inputs = [data() for _ in range(3)]
    numpy_mask = np.asarray(inputs[0][1])
    with Counted() as c:
        moved = 0
        for x, mask, routing in inputs:
            layer(x)
            layer(x, token_mask=mask)
            layer(x, token_mask=numpy_mask)
            _, stats = layer(x, token_mask=mask, routing=routing)
            moved += int(np.asarray(balancer.step([stats]).moved_slots).sum())
    assert c.pair == (0, 0), f"(compiles, traces) = {c.pair}"
    assert moved > 0  # the placement changed between the counted calls


def test_moe_forward_under_user_jit_takes_new_weights_and_placement(rng):
    """moe_forward under the caller's jax.jit with new MoEWeights values of the same shapes
    and shardings (another slot table with its slot weights permuted to match, new router
    weights) compiles nothing, and the output follows the new values."""
    spec = make_spec(experts=8, top_k=2, hidden=16, inter=8)
    layer = make_layer(spec, ep=EP, load_balancer={"num_slots": 12})
    fwd = jax.jit(lambda w, x, r: moe_forward(x, w, spec=spec, config=layer.config, mesh=layer.mesh, routing=r))
    fwd_router = jax.jit(lambda w, x: moe_forward(x, w, spec=spec, config=layer.config, mesh=layer.mesh))
    x = random_tokens(rng, 16, spec.hidden_size)
    routing = random_routing(rng, 16, spec.num_experts, spec.top_k)
    w = layer.weights()
    want, _ = fwd(w, x, routing)
    fwd_router(w, x)

    def put_like(new, old):
        return jax.device_put(new, old.sharding)
    variants = []
    for _ in range(3):
        perm = rng.permutation(layer.num_slots)  # slot i now holds what slot perm[i] held
        variants.append(w._replace(
            slot_to_expert=put_like(np.asarray(w.slot_to_expert)[perm], w.slot_to_expert),
            w_gate_up=put_like(np.asarray(w.w_gate_up)[perm], w.w_gate_up),
            w_down=put_like(np.asarray(w.w_down)[perm], w.w_down)))
    new_router = w._replace(router=put_like(np.asarray(w.router)[:, ::-1].copy(), w.router))
    with Counted() as c:
        got = [fwd(v, x, routing)[0] for v in variants]
        _, stats = fwd_router(new_router, x)
        jax.block_until_ready((got, stats))
    assert c.pair == (0, 0), f"(compiles, traces) = {c.pair}"
    for y in got:  # the same experts in other slots: the same output
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert int(stats.slot_counts.sum()) == 16 * spec.top_k


@pytest.mark.parametrize("reshard", ["collective", "host"])
def test_online_balancer_warmup_and_replacement_iterations_never_recompile(rng, reshard):
    """OnlineBalancer.step over three layers in three groups with a warm-up: iterations in
    the warm-up, iterations that re-place a layer and ones that keep it, counts given as
    MoEStats, NumPy or a device array, and forward_jit / eager forwards between steps: after
    the first iteration nothing traces or compiles."""
    spec = make_spec(experts=8, top_k=2, hidden=16, inter=8)
    lb = {"num_slots": 12, "layer_updates_per_iter": 1, "warmup_iters": 5, "tolerance": 0.0,
          "reshard": reshard, "decay": 0.5}
    layers = [make_layer(spec, ep=EP, seed=i, load_balancer=lb) for i in range(3)]
    balancer = OnlineBalancer(layers)
    assert balancer.config.num_groups == 3
    forward = forward_jit(lambda m, x, r: m(x, routing=r))
    tokens, iters, counted_from = 32, 14, 3
    batches = [(random_tokens(rng, tokens, spec.hidden_size),
                [skewed_routing(rng, tokens, spec.num_experts, spec.top_k, hot=((it // 4) % 4, 4 + (it // 4) % 4))
                 for _ in layers]) for it in range(iters)]
    moved, compiles_per_iter = [], []
    for it, (x, routings) in enumerate(batches):
        # Iterations 0-2 pass each kind of counts once: jax compiles a NumPy array's transfer
        # to the device once per shape and dtype, and jnp.stack once, whatever the values.
        with Counted() as c:
            stats = [forward(layer, x, r)[1] for layer, r in zip(layers, routings)]
            layers[it % 3](x)  # eager, on the placement of the last step
            kind = it % 3
            if kind == 0:
                state = balancer.step(stats)
            elif kind == 1:
                state = balancer.step(np.stack([np.asarray(s.expert_counts) for s in stats]))
            else:
                state = balancer.step(jnp.stack([s.expert_counts for s in stats]))
            moved.append(np.asarray(state.moved_slots))
        compiles_per_iter.append(c.pair)
    # Warm-up iterations 3-4 and balancing iterations 5-13 alike: nothing new.
    assert all(p == (0, 0) for p in compiles_per_iter[counted_from:]), compiles_per_iter
    assert forward.jitted._cache_size() == 1
    moved = np.stack(moved)  # [iteration, layer]
    assert (moved[:5] == 0).all()  # warm-up: nothing re-placed
    assert (moved[5:] > 0).any() and (moved[5:] == 0).any()  # both kinds of iteration were counted
    for layer, placement in zip(layers, np.asarray(balancer.state.placement)):
        np.testing.assert_array_equal(np.asarray(layer.slot_to_expert[...]), placement)


def test_eplb_update_counts_from_numpy_device_or_moe_stats_compile_once(rng):
    """eplb_update with counts as NumPy, a single-device array and stacked MoEStats counts
    (which sit on the mesh), warm-up and balancing iterations alike: after NumPy counts
    the others compile nothing. (Before the fix, counts on the mesh compiled the step again.)"""
    spec = make_spec(experts=8, top_k=2, hidden=16, inter=8)
    layer = make_layer(spec, ep=EP, load_balancer={"num_slots": 12})
    mesh = layer.mesh
    config = EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=EP, reshard="collective",
                        layer_updates_per_iter=1, warmup_iters=2, tolerance=0.0)
    fwd = jax.jit(lambda w, x, r: moe_forward(x, w, spec=spec, config=layer.config, mesh=mesh, routing=r))
    x = random_tokens(rng, 32, spec.hidden_size)
    routings = [skewed_routing(rng, 32, 8, 2, hot=(i % 8, (i + 3) % 8)) for i in range(9)]
    state = init_state(np.asarray(layer.slot_to_expert[...])[None], 8)
    weights = [(layer.w_gate_up[...], layer.w_down[...])]
    base = layer.weights()
    fwd(base, x, routings[0])
    counts_seen, moved = [], []
    counted = Counted()
    for i, routing in enumerate(routings):
        if i == 3:  # warm-up iterations 0-2 (the balancer's too) passed NumPy counts only
            counted.__enter__()
        w = base._replace(w_gate_up=weights[0][0], w_down=weights[0][1], slot_to_expert=state.placement[0])
        _, stats = fwd(w, x, routing)
        # Every kind is made each iteration (jax compiles a NumPy transfer and jnp.stack once
        # per shape), and the step is given NumPy counts first, then all three in turn.
        kinds = [np.asarray(stats.expert_counts)[None], jnp.asarray(np.asarray(stats.expert_counts)[None]),
                 jnp.stack([stats.expert_counts])]
        counts = kinds[0] if i < 3 else kinds[i % 3]
        counts_seen.append(type(counts).__name__ + str(getattr(counts, "sharding", "")))
        state, weights = eplb_update(state, weights, counts, config=config, mesh=mesh)
        moved.append(int(np.asarray(state.moved_slots).sum()))
    counted.__exit__(None, None, None)
    assert counted.pair == (0, 0), f"(compiles, traces) = {counted.pair} over counts {counts_seen[3:]}"
    assert moved[:2] == [0, 0] and sum(moved[3:]) > 0, moved


def test_placement_set_by_hand_and_a_new_balancer_compile_nothing(rng):
    """An offline placement (compute_placement of recorded loads) set on a layer by hand,
    with its slot weights, at the Variables' shardings: the forward (forward_jit and eager)
    and a balancer rebuilt over the layer compile nothing new, and the layer computes with
    the new table."""
    spec = make_spec(experts=8, top_k=2, hidden=16, inter=8)
    lb = {"num_slots": 12, "layer_updates_per_iter": 1, "reshard": "host", "tolerance": 0.0}
    layer = make_layer(spec, ep=EP, load_balancer=lb)
    forward = forward_jit(lambda m, x, r: m(x, routing=r))
    x = random_tokens(rng, 16, spec.hidden_size)
    routing = random_routing(rng, 16, spec.num_experts, spec.top_k)
    want, _ = forward(layer, x, routing)
    layer(x, routing=routing)
    OnlineBalancer([layer]).step(jnp.zeros((1, 8), jnp.int32))
    # The experts' weights, by expert (every replica holds the same values).
    table = np.asarray(layer.slot_to_expert[...])
    first = np.array([np.flatnonzero(table == e)[0] for e in range(8)])
    experts = [np.asarray(v[...])[first] for v in (layer.w_gate_up, layer.w_down)]
    loads = [rng.integers(0, 100, (1, 8)).astype(np.float32) for _ in range(3)]
    placements = [np.asarray(compute_placement(load, 12, EP))[0] for load in loads]
    with Counted() as c:
        for placement in placements:
            for var, per_expert in zip((layer.w_gate_up, layer.w_down), experts):
                var.set_value(jax.device_put(per_expert[placement], var[...].sharding))
            layer.slot_to_expert.set_value(jax.device_put(placement.astype(np.int32),
                                                          layer.slot_to_expert[...].sharding))
            y, stats = forward(layer, x, routing)
            y_eager, _ = layer(x, routing=routing)
            OnlineBalancer([layer]).step(np.asarray(stats.expert_counts)[None])
            np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(y_eager), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert c.pair == (0, 0), f"(compiles, traces) = {c.pair}"


def _placement_config(rng, layers):
    assignments = {i: [int(e) for e in rng.permutation(default_placement(12, 8, EP))] for i in layers}
    return load_moe_config({"backend": "WIDEEP", "load_balancer": {"num_slots": 12,
                                                                   "initial_global_assignments": assignments}},
                           num_experts=8, ep_size=EP)


@pytest.mark.parametrize("differ", ["layer_idx", "offline_placement_file"])
def test_layers_that_differ_only_in_offline_placement_share_one_program(rng, differ):
    """Two layers of one model (one placement file) or one layer rebuilt from a newer
    placement file: under forward_jit, nnx.jit and eager calls the second compiles and
    traces nothing, and each runs on its own placement (outputs equal the dense reference
    on its own weights)."""
    spec = make_spec(experts=8, top_k=2, hidden=16, inter=8)
    mesh = make_mesh(EP)
    if differ == "layer_idx":  # two layers of one model, one placement file
        configs = [_placement_config(rng, [0, 1])] * 2
        indices = (0, 1)
    else:  # one layer, rebuilt from a newer placement file
        configs = [_placement_config(rng, [0]), _placement_config(rng, [0])]
        indices = (0, 0)
    a, b = (MoELayer(spec, c, mesh=mesh, layer_idx=i, rngs=nnx.Rngs(i + 2 * n))
            for n, (c, i) in enumerate(zip(configs, indices)))
    assert a.slot_to_expert[...].sharding == b.slot_to_expert[...].sharding
    for layer, config, i in zip((a, b), configs, indices):
        assert layer.layer_idx == i
        want = config.load_balancer.initial_global_assignments[i]
        np.testing.assert_array_equal(layer.slot_to_expert[...], want)
    assert not np.array_equal(a.slot_to_expert[...], b.slot_to_expert[...])
    forward = forward_jit(lambda m, x: m(x))
    stepped = nnx.jit(lambda m, x: m(x))
    x = random_tokens(rng, 16, spec.hidden_size)
    for f in (forward, stepped, lambda m, x: m(x)):
        f(a, x)
    with Counted() as c:
        outs = [f(b, x)[0] for f in (forward, stepped, lambda m, x: m(x))]
        jax.block_until_ready(outs)
    assert c.pair == (0, 0), f"(compiles, traces) = {c.pair} for a layer that differs in {differ} only"
    want = dense_moe_reference(unsharded(x), unsharded(b.weights()), spec)
    for y in outs:
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6)
    # nnx.jit writes the traced module's structure back: each layer keeps its own index.
    assert (a.layer_idx, b.layer_idx) == indices


def test_layer_idx_read_inside_jit_is_refused(rng):
    """A program traced on one layer's index would run for every layer that shares it:
    reading layer_idx in a traced function raises instead of baking in the first one."""
    spec = make_spec(experts=8, top_k=2, hidden=16, inter=8)
    layer = MoELayer(spec, _placement_config(rng, [3]), mesh=make_mesh(EP), layer_idx=3, rngs=nnx.Rngs(0))
    x = random_tokens(rng, 8, spec.hidden_size)
    labelled = lambda m, x: {f"layer{m.layer_idx}": m(x)[0]}
    for jitted in (forward_jit(labelled), nnx.jit(labelled)):
        with pytest.raises(TypeError, match="layer_idx read inside a jit-traced function"):
            jitted(layer, x)
    assert layer.layer_idx == 3 and list(labelled(layer, x)) == ["layer3"]
    layer.layer_index.set_value(jnp.arange(2, dtype=jnp.int32))  # as stacked layers hold it
    with pytest.raises(ValueError, match=r"layer_idx of stacked layers \(layer_index has shape \(2,\)"):
        layer.layer_idx
