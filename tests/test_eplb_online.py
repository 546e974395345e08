"""Online EPLB: statistics, scheduling, re-sharding and the full loop with MoE layers.

Re-sharding copies bits, so weights are compared exactly; layer outputs are
compared with the dense reference and with a layer that never rebalances.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_helpers import (assert_close, count_compiles, make_layer, make_mesh, make_spec, random_tokens,
                         run_layer)
from wideep_jax import moe_forward
from wideep_jax.eplb.balancer import OnlineBalancer
from wideep_jax.eplb.online import eplb_update
from wideep_jax.eplb.online import _reshard
from wideep_jax.eplb.resharding import host_memory_kind, make_master_copy
from wideep_jax.eplb.state import EplbConfig, init_state
from wideep_jax.routing import Routing

EP = min(4, jax.device_count())  # 4 on the CPU emulation; what there is on a GPU machine


def covering_placement(rng, num_slots, num_experts, ep):
    """Every expert once, extras random, no rank holding one expert twice."""
    per_rank = num_slots // ep
    if per_rank > num_experts:  # the loop below would never end
        raise ValueError(f"{per_rank} slots per rank cannot hold distinct experts of {num_experts}")
    while True:
        p = np.concatenate([rng.permutation(num_experts), rng.integers(0, num_experts, num_slots - num_experts)])
        p = rng.permutation(p)
        if all(len(set(r)) == per_rank for r in p.reshape(ep, per_rank)):
            return p.astype(np.int32)


def expert_weights(rng, num_experts, shapes=((6, 10), (5, 6))):
    return tuple(jnp.asarray(rng.standard_normal((num_experts, *s)), jnp.float32) for s in shapes)


def slot_weights_of(master, placement, mesh):
    sharding = NamedSharding(mesh, P("ep"))
    return tuple(jax.device_put(np.asarray(m)[placement], sharding) for m in master)


MODES = ["host", "host_replicated", "collective"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["random", "all_change", "none_change"])
def test_reshard_moves_exactly_the_changed_slots(rng, mode, case):
    num_layers, num_experts, num_slots = 3, 10, 12  # 10 experts: the sharded master is padded
    mesh = make_mesh(EP)
    masters = [expert_weights(rng, num_experts) for _ in range(num_layers)]
    old = np.stack([covering_placement(rng, num_slots, num_experts, EP) for _ in range(num_layers)])
    if case == "none_change":
        new = old.copy()
    elif case == "all_change":  # rotate experts so every slot changes
        new = (old + 1) % num_experts
    else:
        new = np.stack([covering_placement(rng, num_slots, num_experts, EP) for _ in range(num_layers)])
    weights = [slot_weights_of(m, o, mesh) for m, o in zip(masters, old)]
    config = EplbConfig(num_layers=num_layers, num_experts=num_experts, num_slots=num_slots, ep_size=EP,
                        reshard="collective" if mode == "collective" else "host")
    replicated = mode == "host_replicated"
    master_host = None
    if mode != "collective":
        # Device scratch per gather round: "random" one expert, "all_change" two (the
        # last round of a rank's 3 sharded rows is partial), else all at once.
        expert_bytes = sum(a.nbytes // a.shape[0] for a in weights[0])
        scratch = {"random": 1, "all_change": 2 * expert_bytes}.get(case, 1 << 30)
        master_host = [make_master_copy(w, jnp.asarray(o), num_experts, mesh, replicated=replicated,
                                        scratch_bytes=scratch) for w, o in zip(weights, old)]
        for mh, m in zip(master_host, masters):  # the master copy is the experts, bit for bit
            for a, b in zip(mh, m):
                np.testing.assert_array_equal(np.asarray(a)[:num_experts], np.asarray(b))
                assert not np.asarray(a)[num_experts:].any()  # the sharded copy's padding is zeros
                assert a.shape[0] == (num_experts if replicated else -(-num_experts // EP) * EP)
                assert a.sharding.memory_kind == host_memory_kind(mesh)
    out = jax.jit(lambda w, o, n, m: _reshard(w, o, n, m, config=config, mesh=mesh, axis="ep",
                                              master_replicated=replicated))(
        weights, jnp.asarray(old), jnp.asarray(new), master_host)
    for layer in range(num_layers):
        for got, m in zip(out[layer], masters[layer]):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(m)[new[layer]])


def test_statistics_decay_warmup_and_schedule(rng):
    num_layers, num_experts, num_slots = 5, 8, 12
    mesh = make_mesh(EP)
    config = EplbConfig(num_layers=num_layers, num_experts=num_experts, num_slots=num_slots, ep_size=EP,
                        layer_updates_per_iter=2, decay=0.5, warmup_iters=2, reshard="collective")
    assert config.num_groups == 3
    masters = [expert_weights(rng, num_experts) for _ in range(num_layers)]
    placement = np.stack([np.arange(num_slots) % num_experts] * num_layers).astype(np.int32)
    weights = [slot_weights_of(m, p, mesh) for m, p in zip(masters, placement)]
    state = init_state(placement, num_experts)
    load = np.zeros((num_layers, num_experts))
    for it in range(12):
        counts = rng.integers(0, 50, (num_layers, num_experts)).astype(np.int32)
        counts[:, 0] += 400  # a hot expert, so every scheduled layer gets a new placement
        before = np.asarray(state.placement)
        state, weights = eplb_update(state, weights, jnp.asarray(counts), config=config, mesh=mesh)
        after = np.asarray(state.placement)
        changed = (after != before).any(axis=1)
        if it < config.warmup_iters:
            assert not changed.any()
            np.testing.assert_array_equal(np.asarray(state.load), 0)
            continue
        load = 0.5 * load + counts
        group = (it - config.warmup_iters) % config.num_groups
        scheduled = np.arange(num_layers) % config.num_groups == group
        assert not changed[~scheduled].any(), f"iteration {it}: unscheduled layers moved"
        np.testing.assert_array_equal(np.asarray(state.moved_slots), (after != before).sum(axis=1))
        load[changed] = 0.0  # reset after a placement change
        np.testing.assert_allclose(np.asarray(state.load), load, rtol=1e-6)
        assert int(state.iteration) == it + 1
        for layer in range(num_layers):
            # every expert keeps a slot, and the hot one got replicas
            assert set(after[layer]) == set(range(num_experts))
            for got, m in zip(weights[layer], masters[layer]):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(m)[after[layer]])
    assert (np.asarray(state.placement) == 0).sum(axis=1).min() > 1


def drifting_routing(rng, it, num_tokens, num_experts, top_k, *, period=25):
    """Zipf-skewed top-k whose hot experts drift every ``period`` iterations."""
    shift = (it // period) * 5
    rank = (np.arange(num_experts) - shift) % num_experts
    p = 1.0 / (rank + 1.0) ** 1.3
    p /= p.sum()
    ids = np.stack([rng.choice(num_experts, top_k, replace=False, p=p) for _ in range(num_tokens)])
    weights = rng.uniform(0.1, 1.0, (num_tokens, top_k)).astype(np.float32)
    return Routing(jnp.asarray(ids, jnp.int32), jnp.asarray(weights))


@pytest.mark.parametrize("mode", MODES)
def test_online_loop_100_updates(rng, mode):
    """100 online updates under drifting skew: exact weights, same outputs, nothing lost, one compile."""
    spec = make_spec(kind="softmax", experts=16, top_k=4, hidden=16, inter=8)
    num_layers, num_slots, tokens = 2, 24, 64
    reshard = "collective" if mode == "collective" else "host"
    lb = {"num_slots": num_slots, "layer_updates_per_iter": 1, "reshard": reshard, "decay": 0.9}
    layers = [make_layer(spec, ep=EP, seed=10 + i, load_balancer=lb) for i in range(num_layers)]
    plain = [make_layer(spec, ep=EP, seed=10 + i) for i in range(num_layers)]  # no balancer, 16 slots
    balancer = OnlineBalancer(layers, replicate_master=mode == "host_replicated")
    assert balancer.config.num_groups == 2
    masters = [tuple(np.asarray(a) for a in (p.w_gate_up[...], p.w_down[...])) for p in plain]
    forward = jax.jit(lambda w, x, r: moe_forward(x, w, spec=spec, config=layers[0].config,
                                                  mesh=layers[0].mesh, routing=r))
    balanced, unbalanced, moved = [], [], 0
    home = np.arange(spec.num_experts) // (spec.num_experts // EP)  # the plain layer's expert -> rank
    compiles = count_compiles()
    for it in range(100):
        if it == 2:  # forward and step are compiled by now; nothing may compile after
            compiles_after_warmup = compiles.__enter__()
        x = random_tokens(rng, tokens, spec.hidden_size)
        stats = []
        for layer_idx, (layer, ref) in enumerate(zip(layers, plain)):
            routing = drifting_routing(rng, it, tokens, spec.num_experts, spec.top_k)
            y, s = forward(layer.weights(), x, routing)
            if it % 10 == 0 or it == 99:
                y_plain, _ = run_layer(ref, x, routing=routing)
                assert_close(y, y_plain, rtol=1e-5)
            assert int(s.slot_counts.sum()) == tokens * spec.top_k  # no pair lost
            if it >= 10:  # rows per rank: balanced layer vs the plain layer's placement
                per_rank = np.asarray(s.slot_counts).reshape(EP, -1).sum(axis=1)
                plain_rank = np.bincount(home, weights=np.asarray(s.expert_counts), minlength=EP)
                balanced.append(per_rank.max() / per_rank.mean() - 1)
                unbalanced.append(plain_rank.max() / plain_rank.mean() - 1)
            stats.append(s)
        state = balancer.step(stats)
        moved += int(np.asarray(state.moved_slots).sum())
    compiles.__exit__(None, None, None)
    assert forward._cache_size() == 1
    assert compiles_after_warmup[0] == 0, f"{compiles_after_warmup[0]} compilations after warm-up"
    assert moved > 0
    for layer, m in zip(layers, masters):
        placement = np.asarray(layer.slot_to_expert[...])
        assert set(placement) == set(range(spec.num_experts))
        for got, want in zip((layer.w_gate_up[...], layer.w_down[...]), m):
            np.testing.assert_array_equal(np.asarray(got), want[placement])
    # Over the drifting run, the balancer's busiest rank is closer to the mean.
    assert np.mean(balanced) < np.mean(unbalanced), (np.mean(balanced), np.mean(unbalanced))


def test_eplb_update_errors(rng):
    mesh = make_mesh(EP)
    config = EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=EP)
    state = init_state(np.arange(12)[None] % 8, 8)
    weights = [slot_weights_of(expert_weights(rng, 8), np.arange(12) % 8, mesh)]
    with pytest.raises(ValueError, match=r"counts has shape \(1, 7\)"):
        eplb_update(state, weights, jnp.zeros((1, 7), jnp.int32), config=config, mesh=mesh, master=None)
    with pytest.raises(ValueError, match="reshard='host' needs master"):
        eplb_update(state, weights, jnp.zeros((1, 8), jnp.int32), config=config, mesh=mesh)
    with pytest.raises(ValueError, match="EplbConfig.num_slots: got 10"):
        EplbConfig(num_layers=1, num_experts=8, num_slots=10, ep_size=EP)
    with pytest.raises(ValueError, match="EplbConfig.decay: got 0"):
        EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=EP, decay=0)
    with pytest.raises(ValueError, match=r"EplbConfig.tolerance: got -1.0; allowed: a number in \[0, 1\]"):
        EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=EP, tolerance=-1.0)
    with pytest.raises(ValueError, match="EplbConfig.warmup_iters: got -5; allowed: an int >= 0"):
        EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=EP, warmup_iters=-5)


def test_ep_size_must_match_the_mesh_and_a_fresh_state_compiles_once(rng):
    """An EplbConfig whose ep_size is not the mesh axis's would put other experts' weights in
    slots: refused by eplb_update and OnlineBalancer. From init_state, the step compiles once."""
    mesh = make_mesh(EP)
    placement = covering_placement(rng, 12, 8, EP)
    masters = expert_weights(rng, 8)
    other = EP // 2 if EP > 1 else 2
    wrong = EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=other, reshard="collective",
                       layer_updates_per_iter=1)
    weights = [slot_weights_of(masters, placement, mesh)]
    with pytest.raises(ValueError, match=f"EplbConfig.ep_size: got {other}; allowed: {EP}"):
        eplb_update(init_state(placement[None], 8), weights, jnp.zeros((1, 8), jnp.int32), config=wrong, mesh=mesh)
    config = EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=EP, reshard="collective",
                        layer_updates_per_iter=1)
    state = init_state(placement[None], 8)
    all_counts = [jnp.asarray(rng.integers(0, 100, (1, 8)).astype(np.int32)) for _ in range(3)]
    with count_compiles() as compiles:
        for counts in all_counts:
            state, weights = eplb_update(state, weights, counts, config=config, mesh=mesh)
    assert compiles[0] == 1, f"{compiles[0]} compilations for three steps"
    for got, want in zip(weights[0], masters):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[np.asarray(state.placement[0])])
    spec = make_spec(experts=8)
    layers = [make_layer(spec, ep=EP, load_balancer={"num_slots": 12, "layer_updates_per_iter": 1})]
    with pytest.raises(ValueError, match=f"EplbConfig.ep_size: got {other}; allowed: {EP}"):
        OnlineBalancer(layers, config=wrong)


@pytest.mark.parametrize("counts_kind", ["numpy", "stats"])
def test_balancer_on_one_rank_with_host_master(rng, counts_kind):
    """One EP rank, reshard='host' (the default): the sharded master copy is also fully
    replicated there; steps run, and numpy counts are taken like MoEStats."""
    spec = make_spec(experts=8)
    layer = make_layer(spec, ep=1, load_balancer={"num_slots": 8, "layer_updates_per_iter": 1})
    balancer = OnlineBalancer([layer])
    experts = tuple(np.asarray(a) for a in (layer.w_gate_up[...], layer.w_down[...]))
    for _ in range(3):
        counts = rng.integers(0, 50, (1, 8)).astype(np.int32)
        if counts_kind == "stats":
            _, stats = run_layer(layer, random_tokens(rng, 16, spec.hidden_size))
            balancer.step([stats])
        else:
            balancer.step(counts)
    placement = np.asarray(layer.slot_to_expert[...])
    np.testing.assert_array_equal(np.asarray(layer.w_gate_up[...]), experts[0][placement])
    with pytest.raises(ValueError, match="stats: got str; allowed: a sequence of MoEStats"):
        balancer.step("counts")
    # An empty list (numpy's stack error before), None (a TypeError) and one bare MoEStats,
    # itself a tuple (it was read as a sequence of its fields).
    for bad, name in (([], "list"), (None, "NoneType"), (stats if counts_kind == "stats" else [], None)):
        with pytest.raises(ValueError, match=f"stats: got {name or '(list|MoEStats)'}; allowed: a sequence of MoEStats"):
            balancer.step(bad)
    with pytest.raises(ValueError, match="stats: counts of dtype float32; allowed: an integer dtype"):
        balancer.step(np.zeros((1, 8), np.float32))


def test_balancer_needs_online_config():
    spec = make_spec(experts=16)
    layer = make_layer(spec, ep=EP, load_balancer={"num_slots": 24})
    with pytest.raises(ValueError, match="layer_updates_per_iter: got 0"):
        OnlineBalancer([layer])
    with pytest.raises(ValueError, match="backend: got 'CUTLASS'"):
        OnlineBalancer([make_layer(spec, backend="CUTLASS", ep=1)])


def test_compile_counter_sees_a_compile():
    with count_compiles() as n:
        jax.jit(lambda a: a * 3 + 1)(jnp.arange(7.0)).block_until_ready()
    assert n[0] >= 1


@pytest.mark.parametrize("kwargs,match", [
    # More slots per rank than experts: refused at construction, under EplbConfig's name,
    # not at the first step's trace by compute_placement.
    (dict(num_experts=4, num_slots=24, ep_size=4), r"EplbConfig.num_slots: got 24; allowed: <= num_experts \* ranks"),
    (dict(num_experts=8, num_slots=12, ep_size=4, num_nodes=3), "EplbConfig.num_nodes: got 3; allowed: a divisor of "
     "ep_size = 4"),
    (dict(num_experts=6, num_slots=8, ep_size=4, num_nodes=4), "EplbConfig.num_nodes: got 4; allowed: a divisor of "
     "num_experts = 6"),
    (dict(num_experts=8, num_slots=12, ep_size=4, decay="0.5"), "EplbConfig.decay: got '0.5'; allowed: a number"),
    (dict(num_experts=8, num_slots=12, ep_size=4, decay=True), "EplbConfig.decay: got True; allowed: a number"),
    (dict(num_experts=8, num_slots=12, ep_size=4, tolerance=None), "EplbConfig.tolerance: got None; allowed: a number"),
])
def test_eplb_config_checks_the_computed_placement(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EplbConfig(num_layers=2, **kwargs)


def test_init_state_refuses_a_placement_without_every_expert(rng):
    """A placement that gives an expert no slot would leave its load out of every rank and
    never be re-placed (its tokens run another expert's weights): refused, naming it."""
    num_layers, num_experts, num_slots = 3, 8, 12
    placement = np.stack([covering_placement(rng, num_slots, num_experts, EP) for _ in range(num_layers)])
    state = init_state(placement, num_experts)  # a valid one is taken as it is
    np.testing.assert_array_equal(np.asarray(state.placement), placement)
    layer, expert = int(rng.integers(num_layers)), int(rng.integers(num_experts))
    dropped = placement.copy()
    dropped[layer][dropped[layer] == expert] = (expert + 1) % num_experts
    with pytest.raises(ValueError, match=rf"placement\[{layer}\] gives no slot to experts \[{expert}\]; "
                                         rf"allowed: every expert in \[0, {num_experts}\)"):
        init_state(dropped, num_experts)
    slot = int(rng.integers(num_slots))
    for bad in (-1, num_experts):
        wrong = placement.copy()
        wrong[layer, slot] = bad
        with pytest.raises(ValueError, match=rf"placement\[{layer}, {slot}\]: got {bad}; allowed: an expert id "
                                             rf"in \[0, {num_experts}\)"):
            init_state(wrong, num_experts)
    with pytest.raises(ValueError, match="placement: got dtype float32; allowed: integer expert ids"):
        init_state(placement.astype(np.float32), num_experts)
    with pytest.raises(ValueError, match="num_experts: got 0; allowed: an int >= 1"):
        init_state(placement, 0)


def test_eplb_update_refuses_a_state_of_other_experts_and_negative_counts(rng):
    mesh = make_mesh(EP)
    placement = covering_placement(rng, 12, 8, EP)
    config = EplbConfig(num_layers=1, num_experts=8, num_slots=12, ep_size=EP, reshard="collective")
    weights = [slot_weights_of(expert_weights(rng, 8), placement, mesh)]
    state = init_state(placement[None], 8)
    other = state._replace(load=jnp.zeros((1, 9), jnp.float32))
    with pytest.raises(ValueError, match=r"state.load has shape \(1, 9\); allowed: \[num_layers, num_experts\] "
                                         r"= \[1, 8\]"):
        eplb_update(other, weights, jnp.zeros((1, 8), jnp.int32), config=config, mesh=mesh)
    counts = rng.integers(0, 50, (1, 8)).astype(np.int32)
    counts[0, rng.integers(8)] = -3
    with pytest.raises(ValueError, match="counts: got a minimum of -3; allowed: routed pairs, >= 0"):
        eplb_update(state, weights, counts, config=config, mesh=mesh)
