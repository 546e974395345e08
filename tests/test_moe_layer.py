"""The MoE layer against a dense single-device reference, on 8 emulated CPU devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_helpers import (assert_close, make_layer, make_mesh, make_spec, random_routing,
                         random_tokens, run_layer, unsharded)
from wideep_jax import MoEConfig, MoELayer, MoESpec, moe_forward
from wideep_jax.moe import rows_per_chunk
from wideep_jax.reference import dense_moe_reference
from wideep_jax.routing import RouterSpec, Routing, route


def _reference(layer, x, **kw):
    return dense_moe_reference(x, unsharded(layer.weights()), layer.spec, **kw)


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
@pytest.mark.parametrize("kind,shared", [("softmax", 0), ("noaux_tc", 1)])
def test_wideep_matches_dense_reference(rng, ep, kind, shared):
    spec = make_spec(kind=kind, top_k=4, shared=shared)
    layer = make_layer(spec, ep=ep, seed=int(rng.integers(1 << 30)))
    x = random_tokens(rng, 8 * ep, spec.hidden_size)
    y, stats = run_layer(layer, x)
    assert_close(y, _reference(layer, x))
    assert int(stats.expert_counts.sum()) == x.shape[0] * spec.top_k


@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 8])
def test_top_k_range(rng, top_k):
    spec = make_spec(top_k=top_k, shared=1)
    layer = make_layer(spec, ep=4, seed=int(rng.integers(1 << 30)))
    x = random_tokens(rng, 24, spec.hidden_size)
    assert_close(run_layer(layer, x)[0], _reference(layer, x))


@pytest.mark.parametrize("ep", [1, 4])
def test_local_backend_matches_reference(rng, ep):
    spec = make_spec(kind="noaux_tc", top_k=3, shared=1)
    layer = make_layer(spec, backend="CUTLASS", ep=ep)
    assert layer.w_gate_up[...].shape[0] == spec.num_experts
    x = random_tokens(rng, 20, spec.hidden_size)
    y, stats = run_layer(layer, x)
    assert_close(y, _reference(layer, x))
    assert int(stats.slot_counts.sum()) == 20 * 3


def _adversarial_routings(rng, num_tokens, spec, ep):
    experts_per_rank = spec.num_experts // ep
    everything_to_expert_0 = random_routing(rng, num_tokens, spec.num_experts, 1, experts=[0])
    ids = np.broadcast_to(np.arange(spec.top_k) % experts_per_rank, (num_tokens, spec.top_k))
    on_rank_last = ids + experts_per_rank * (ep - 1)
    return {
        "one_expert": everything_to_expert_0,
        "one_rank": random_routing(rng, num_tokens, spec.num_experts, spec.top_k,
                                   experts=np.arange(experts_per_rank) + experts_per_rank * (ep - 1)),
        "same_experts_all_tokens": (on_rank_last, None),
    }


@pytest.mark.parametrize("case", ["one_expert", "one_rank", "same_experts_all_tokens"])
def test_adversarial_routing(rng, case):
    ep = 4
    top_k = 1 if case == "one_expert" else 4
    spec = make_spec(top_k=top_k, experts=16)
    layer = make_layer(spec, ep=ep)
    num_tokens = 32
    routing = _adversarial_routings(rng, num_tokens, spec, ep)[case]
    if isinstance(routing, tuple):
        routing = Routing(jnp.asarray(routing[0], jnp.int32),
                          jnp.asarray(rng.uniform(0.1, 1, (num_tokens, top_k)), jnp.float32))
    x = random_tokens(rng, num_tokens, spec.hidden_size)
    y, stats = run_layer(layer, x, routing=routing)
    assert_close(y, _reference(layer, x, routing=routing))
    # Every token lands on one rank: that rank receives all tokens exactly once.
    rank_tokens = np.asarray(stats.rank_tokens)
    assert rank_tokens.max() == num_tokens and rank_tokens.sum() == num_tokens
    np.testing.assert_array_equal(
        np.asarray(stats.expert_counts),
        np.bincount(np.asarray(routing.ids).ravel(), minlength=spec.num_experts))


def test_padding_and_token_mask(rng):
    spec = make_spec(top_k=2, shared=1)
    layer = make_layer(spec, ep=4)
    x = random_tokens(rng, 13, spec.hidden_size)  # 13 does not divide by 4
    mask = jnp.asarray(rng.random(13) < 0.7)
    y, stats = run_layer(layer, x, token_mask=mask)
    assert y.shape == (13, spec.hidden_size)
    assert_close(y, _reference(layer, x, token_mask=mask))
    assert np.all(np.asarray(y)[~np.asarray(mask)] == 0)
    assert int(stats.expert_counts.sum()) == int(mask.sum()) * spec.top_k


@pytest.mark.parametrize("backend", ["WIDEEP", "CUTLASS"])
def test_chunking_by_max_num_tokens(rng, backend):
    spec = make_spec(top_k=2, shared=1)
    x = random_tokens(rng, 44, spec.hidden_size)  # 11 per rank: chunks of 3 need padding
    whole = make_layer(spec, backend=backend, ep=4)
    # 12 tokens of the EP group per chunk, as TensorRT-LLM counts them: 3 per rank.
    chunked = make_layer(spec, backend=backend, ep=4, max_num_tokens=12)
    assert rows_per_chunk(11, 4, 12) == 3
    y_whole, s_whole = run_layer(whole, x)
    y_chunked, s_chunked = run_layer(chunked, x)
    assert_close(y_chunked, _reference(chunked, x))
    assert_close(y_chunked, y_whole, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(s_whole.expert_counts), np.asarray(s_chunked.expert_counts))


@pytest.mark.parametrize("backend, ep", [("WIDEEP", 4), ("CUTLASS", 4), ("CUTLASS", 1)])
def test_zero_tokens(backend, ep):
    """An empty batch (a rank with no requests) gives an empty output and zero counts,
    chunked or not, instead of a shape error."""
    spec = make_spec(top_k=2, shared=1)
    for max_num_tokens in (None, 12):
        layer = make_layer(spec, backend=backend, ep=ep, max_num_tokens=max_num_tokens)
        y, stats = run_layer(layer, random_tokens(np.random.default_rng(), 0, spec.hidden_size))
        assert y.shape == (0, spec.hidden_size)
        for name, value in stats._asdict().items():
            assert not np.asarray(value).any(), name


@pytest.mark.parametrize("local_tokens", [1, 5, 11, 256, 1000])
@pytest.mark.parametrize("num_ranks", [1, 4, 36])
@pytest.mark.parametrize("max_num_tokens", [1, 12, 100, 9216])
def test_rows_per_chunk_bounds_the_ep_groups_tokens(local_tokens, num_ranks, max_num_tokens):
    rows = rows_per_chunk(local_tokens, num_ranks, max_num_tokens)
    chunks = -(-local_tokens // rows)
    if max_num_tokens >= num_ranks:
        assert rows * num_ranks <= max_num_tokens  # the group's tokens in one chunk
    else:
        assert rows == 1  # at least one row per rank
    # TensorRT-LLM's ceil(group tokens / max_num_tokens) chunks, and no more unless
    # the bound needs them (when max_num_tokens // R does not divide evenly).
    want = -(-local_tokens * num_ranks // max_num_tokens)
    at_bound = -(-local_tokens // max(1, max_num_tokens // num_ranks))
    assert min(want, local_tokens) <= chunks <= max(min(want, local_tokens), at_bound)
    assert rows_per_chunk(local_tokens, num_ranks, None) is None
    assert rows_per_chunk(0, num_ranks, max_num_tokens) is None  # no tokens: nothing to split


def test_stats_are_exact(rng):
    ep, spec = 4, make_spec(top_k=3, experts=16)
    layer = make_layer(spec, ep=ep)
    routing = random_routing(rng, 40, spec.num_experts, spec.top_k)
    x = random_tokens(rng, 40, spec.hidden_size)
    _, stats = run_layer(layer, x, routing=routing)
    ids = np.asarray(routing.ids)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), np.bincount(ids.ravel(), minlength=16))
    # Identity placement: slot == expert; rank = expert // 4; a token counts once per rank.
    np.testing.assert_array_equal(np.asarray(stats.slot_counts), np.bincount(ids.ravel(), minlength=16))
    want = [sum(np.any(ids[t] // 4 == r) for t in range(40)) for r in range(ep)]
    np.testing.assert_array_equal(np.asarray(stats.rank_tokens), want)


def test_replicated_slots_and_placement_invariance(rng):
    """Extra slots and shuffled placements change where, not what."""
    spec = make_spec(kind="noaux_tc", top_k=4, experts=16, shared=1)
    ep, num_slots = 4, 24
    perm = rng.permutation(16)
    extra = rng.choice(16, num_slots - 16, replace=False)
    placement = np.concatenate([perm, extra])
    # No rank may hold two replicas of one expert (not required, but realistic).
    lb = {"num_slots": num_slots, "initial_global_assignments": {5: placement.tolist()}}
    plain = make_layer(spec, ep=ep, seed=3)
    placed = make_layer(spec, ep=ep, seed=3, layer_idx=5, load_balancer=lb)
    assert placed.w_gate_up[...].shape[0] == num_slots
    np.testing.assert_array_equal(np.asarray(placed.slot_to_expert[...]), placement)
    x = random_tokens(rng, 64, spec.hidden_size)
    y_plain, _ = run_layer(plain, x)
    y_placed, stats = run_layer(placed, x)
    assert_close(y_placed, _reference(placed, x))
    assert_close(y_placed, y_plain, rtol=1e-6)
    # Replicas share the load: an expert's slots add up to its pairs, and each
    # source rank's round-robin keeps its replicas within one pair of each other.
    counts = np.asarray(stats.slot_counts)
    expert_counts = np.asarray(stats.expert_counts)
    assert counts.sum() == 64 * 4
    np.testing.assert_array_equal(np.bincount(placement, weights=counts, minlength=16), expert_counts)
    for e in extra:
        replica_counts = counts[placement == e]
        assert replica_counts.max() - replica_counts.min() <= ep


def test_bfloat16(rng):
    spec = make_spec(kind="noaux_tc", top_k=4, shared=1, dtype=jnp.bfloat16)
    layer = make_layer(spec, ep=4)
    x = random_tokens(rng, 32, spec.hidden_size, jnp.bfloat16)
    y, _ = run_layer(layer, x)
    assert y.dtype == jnp.bfloat16
    assert_close(y, _reference(layer, x), rtol=1e-2)


def test_gradients_match_dense_reference(rng):
    spec = make_spec(kind="softmax", top_k=2, shared=1)
    layer = make_layer(spec, ep=4)
    x = random_tokens(rng, 16, spec.hidden_size)
    weights = unsharded(layer.weights())
    cot = jnp.asarray(rng.standard_normal((16, spec.hidden_size)), jnp.float32)

    def loss_layer(w, x):
        y, _ = moe_forward(x, w, spec=spec, config=layer.config, mesh=layer.mesh)
        return jnp.sum(y * cot)

    def loss_ref(w, x):
        return jnp.sum(dense_moe_reference(x, w, spec) * cot)

    diff = ("router", "w_gate_up", "w_down", "shared_gate_up", "shared_down")
    g_layer = jax.jit(jax.grad(loss_layer, argnums=(0, 1), allow_int=True))(weights, x)
    g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1), allow_int=True))(weights, x)
    assert_close(g_layer[1], g_ref[1], rtol=1e-5)
    for name in diff:
        assert_close(getattr(g_layer[0], name), getattr(g_ref[0], name), rtol=1e-5)


def test_nnx_grad_and_optax_step(rng):
    """Research users fine-tune with optax: one step lowers the loss."""
    import optax

    spec = make_spec(top_k=2)
    layer = make_layer(spec, ep=2)
    x = random_tokens(rng, 16, spec.hidden_size)
    target = random_tokens(rng, 16, spec.hidden_size)
    optimizer = nnx.Optimizer(layer, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer):
        def loss_fn(layer):
            return jnp.mean((layer(x)[0] - target) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn)(layer)
        optimizer.update(layer, grads)
        return loss

    first = float(step(layer, optimizer))
    second = float(step(layer, optimizer))
    assert second < first


@pytest.mark.parametrize("kind,on_input", [("noaux_tc", False), ("llama4", True)])
def test_no_recompilation_when_routing_changes(rng, kind, on_input):
    spec = make_spec(kind=kind, top_k=4, shared=1, on_input=on_input)
    layer = make_layer(spec, ep=4)
    graphdef, state = nnx.split(layer)

    @jax.jit
    def forward(state, x, routing):
        return nnx.merge(graphdef, state)(x, routing=routing)

    for _ in range(5):
        x = random_tokens(rng, 32, spec.hidden_size)
        forward(state, x, random_routing(rng, 32, spec.num_experts, spec.top_k))
    assert forward._cache_size() == 1


def test_wideep_needs_a_mesh():
    spec = make_spec()
    with pytest.raises(ValueError, match="WIDEEP.*ep"):
        MoELayer(spec, MoEConfig(backend="WIDEEP"), mesh=None, rngs=nnx.Rngs(0))
    # Either backend: a mesh without the EP axis is refused where the layer is built.
    dp_only = jax.make_mesh((2,), ("dp",), devices=jax.devices()[:2])
    for backend in ("WIDEEP", "CUTLASS"):
        with pytest.raises(ValueError, match="ep_axis='ep'.*('dp',)"):
            MoELayer(spec, MoEConfig(backend=backend), mesh=dp_only, rngs=nnx.Rngs(0))
    layer = make_layer(spec, ep=2)
    with pytest.raises(ValueError, match="hidden_size=32"):
        layer(jnp.zeros((4, 7)))


def test_bad_weights_and_routing_are_refused(rng):
    """Arrays that do not fit the spec, a slot table with an unknown or unplaced expert,
    and routing ids outside [0, E) are errors that name the array; none runs silently
    with another expert's weights."""
    spec = make_spec(experts=8, shared=1)
    layer = make_layer(spec, ep=2, load_balancer={"num_slots": 10})
    w, config, mesh = unsharded(layer.weights()), layer.config, layer.mesh
    x = random_tokens(rng, 8, spec.hidden_size)
    call = lambda weights, routing=None: moe_forward(x, weights, spec=spec, config=config, mesh=mesh,
                                                      routing=routing)
    call(w)  # the layer's own arrays pass
    with pytest.raises(ValueError, match=r"weights.router has shape \(32, 9\); allowed: \(32, 8\)"):
        call(w._replace(router=jnp.zeros((32, 9))))
    with pytest.raises(ValueError, match=r"weights.w_gate_up has shape \(8, 32, 32\); allowed: \(10, 32, 32\)"):
        call(w._replace(w_gate_up=w.w_gate_up[:8]))
    with pytest.raises(ValueError, match=r"weights.shared_down has shape None"):
        call(w._replace(shared_down=None))
    with pytest.raises(ValueError, match=r"weights.slot_to_expert has shape \(2, 5\); allowed: \[num_slots\]"):
        call(w._replace(slot_to_expert=w.slot_to_expert.reshape(2, 5)))
    with pytest.raises(ValueError, match="multiple of the 2 EP ranks"):
        call(w._replace(w_gate_up=w.w_gate_up[:9], w_down=w.w_down[:9], slot_to_expert=w.slot_to_expert[:9]))
    unplaced = w.slot_to_expert.at[3].set(4).at[3 + 8].set(4)  # expert 3 has no slot
    with pytest.raises(ValueError, match=r"experts without a slot \[3\]"):
        call(w._replace(slot_to_expert=unplaced))
    with pytest.raises(ValueError, match=r"slot_to_expert: got values in \[0, 8\]"):
        call(w._replace(slot_to_expert=w.slot_to_expert.at[9].set(8)))
    routing = random_routing(rng, 8, spec.num_experts, spec.top_k)
    for bad in (8, -1):
        with pytest.raises(ValueError, match=r"routing.ids: got values in .*; allowed: \[0, 8\)"):
            call(w, routing._replace(ids=routing.ids.at[2, 1].set(bad)))
    with pytest.raises(ValueError, match="routing.ids has dtype float32; allowed: an integer dtype"):
        call(w, routing._replace(ids=routing.ids.astype(jnp.float32)))
    with pytest.raises(ValueError, match="routing.weights has dtype int32; allowed: a floating dtype"):
        call(w, Routing(routing.ids, routing.ids))  # ids and weights swapped
    # Integer tokens would come back as truncated integer sums.
    with pytest.raises(ValueError, match="x has dtype int32; allowed: a floating dtype"):
        moe_forward(jnp.ones((8, spec.hidden_size), jnp.int32), w, spec=spec, config=config, mesh=mesh)
    no_shared = make_spec(experts=8)
    with pytest.raises(ValueError, match="shared_gate_up / shared_down are given"):
        moe_forward(x, w, spec=no_shared, config=config, mesh=mesh)


def test_masked_tokens_routing_ids_are_not_checked(rng):
    """Padding rows often carry id -1: a masked-out token's ids are never read, so an
    eager call takes them (and gives what jit gives) instead of refusing them; a kept
    token's bad id is still refused, naming it."""
    spec = make_spec(experts=8)
    layer = make_layer(spec, ep=2)
    x = random_tokens(rng, 7, spec.hidden_size)
    routing = random_routing(rng, 7, spec.num_experts, spec.top_k)
    mask = jnp.ones(7, bool).at[2].set(False).at[6].set(False)
    padded = routing._replace(ids=routing.ids.at[2].set(-1).at[6, 1].set(99))
    got, stats = layer(x, token_mask=mask, routing=padded)  # eager: the ids are checked here
    want, want_stats = run_layer(layer, x, mask, routing)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(stats, want_stats):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.asarray(got)[[2, 6]].any()
    with pytest.raises(ValueError, match=r"routing.ids: .*\(first: 8 at token 4, k 0\); allowed: \[0, 8\) "
                                         r"for tokens the token_mask keeps"):
        layer(x, token_mask=mask, routing=padded._replace(ids=padded.ids.at[4, 0].set(8)))
    with pytest.raises(ValueError, match=r"routing.ids: got values in \[-1, 99\] \(first: -1 at token 2, k 0\)"):
        layer(x, routing=padded)  # no mask: every token is routed


def test_plain_tuple_routing_and_list_token_mask(rng):
    """A plain (ids, weights) tuple runs as the Routing it spells, and a list token_mask as
    its array, eagerly and under jit (both raised AttributeError); a swapped (weights, ids)
    pair (jax.lax.top_k's order) and other types are refused, naming the argument."""
    spec = make_spec(experts=8)
    layer = make_layer(spec, ep=2)
    x = random_tokens(rng, 6, spec.hidden_size)
    routing = random_routing(rng, 6, spec.num_experts, spec.top_k)
    mask = [True, False, True, True, False, True]
    want, want_stats = layer(x, token_mask=jnp.asarray(mask), routing=routing)
    w, kw = layer.weights(), dict(spec=spec, config=layer.config, mesh=layer.mesh)
    jitted = jax.jit(lambda ids, wts: moe_forward(x, w, token_mask=mask, routing=(ids, wts), **kw))
    for got, stats in (layer(x, token_mask=mask, routing=tuple(routing)), jitted(*routing)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for a, b in zip(stats, want_stats):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"float ids .* and integer weights .*swapped\? allowed: \(ids, weights\)"):
        layer(x, routing=(routing.weights, routing.ids))
    with pytest.raises(TypeError, match=r"routing: got list of length 2; allowed: a Routing\(ids, weights\), "
                                        r"a plain \(ids, weights\) tuple, or None"):
        layer(x, routing=list(routing))
    with pytest.raises(TypeError, match=r"routing: got ArrayImpl; allowed: a Routing"):
        layer(x, routing=routing.ids)
    with pytest.raises(TypeError, match=r"routing.weights: got NoneType; allowed: a float \[tokens, top_k\] array"):
        layer(x, routing=(routing.ids, None))
    with pytest.raises(TypeError, match=r"token_mask: got str; allowed: a bool \[tokens\] array"):
        layer(x, token_mask="all")
    with pytest.raises(TypeError, match=r"token_mask: got a list that is not an array .*; allowed: a bool"):
        layer(x, token_mask=[True, [False]] + [True] * 4)
    with pytest.raises(ValueError, match=r"token_mask has shape \(5,\); allowed: \[6\]"):
        layer(x, token_mask=mask[:5])
    with pytest.raises(ValueError, match=r"token_mask has dtype float32; allowed: bool \(or 0/1 integers\)"):
        layer(x, token_mask=[0.2, 0.0] * 3)  # cast to bool, 0.2 would keep its token
    int_mask, _ = layer(x, token_mask=np.asarray(mask, np.int32), routing=routing)
    np.testing.assert_array_equal(np.asarray(int_mask), np.asarray(want))


@pytest.mark.parametrize("backend, ep", [("WIDEEP", 4), ("CUTLASS", 1)])
def test_nan_in_masked_tokens_reaches_no_gradient(rng, backend, ep):
    """A masked-out row holding NaN / inf (and NaN routing weights) changes neither the
    output nor any gradient: all equal, exactly, those of the batch with zeros there
    (it used to poison the shared experts' weight gradients through 0 * NaN)."""
    spec = make_spec(kind="llama4", top_k=2, experts=8, shared=1, on_input=True)
    layer = make_layer(spec, backend=backend, ep=ep, seed=int(rng.integers(1 << 30)))
    weights, config, mesh = unsharded(layer.weights()), layer.config, layer.mesh
    num_tokens = 9
    routing = random_routing(rng, num_tokens, spec.num_experts, spec.top_k)
    mask = jnp.ones(num_tokens, bool).at[0].set(False).at[5].set(False)  # token 0 fills padding rows
    clean = random_tokens(rng, num_tokens, spec.hidden_size).at[0].set(0.0).at[5].set(0.0)
    dirty = clean.at[0].set(jnp.nan).at[5, 3].set(jnp.inf)
    dirty_weights = routing.weights.at[0].set(jnp.nan)
    cot = jnp.asarray(rng.standard_normal((num_tokens, spec.hidden_size)), jnp.float32)

    def loss(w, x, rw, use_routing):
        y, _ = moe_forward(x, w, spec=spec, config=config, mesh=mesh, token_mask=mask,
                           routing=Routing(routing.ids, rw) if use_routing else None)
        return jnp.sum(y * cot), y

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True, allow_int=True), static_argnums=3)
    routed = {}
    for use_routing in (False, True):
        (g_clean, y_clean) = grad(weights, clean, routing.weights, use_routing)
        (g_dirty, y_dirty) = routed[use_routing] = grad(weights, dirty, dirty_weights, use_routing)
        np.testing.assert_array_equal(np.asarray(y_dirty), np.asarray(y_clean))
        leaves_clean, leaves_dirty = jax.tree.leaves(g_clean), jax.tree.leaves(g_dirty)
        assert len(leaves_clean) == len(leaves_dirty)
        for a, b in zip(leaves_dirty, leaves_clean):
            if jnp.issubdtype(a.dtype, jnp.floating):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.isfinite(np.asarray(g_dirty[0].shared_gate_up)).all()
    # The reference zeroes masked rows too, and the layer's gradients match it.
    ref_grad = jax.grad(lambda w: jnp.sum(dense_moe_reference(dirty, w, spec, token_mask=mask) * cot), allow_int=True)(weights)
    for name in ("router", "shared_gate_up", "shared_down"):
        assert_close(getattr(routed[False][0][0], name), getattr(ref_grad, name))


@pytest.mark.parametrize("backend", ["WIDEEP", "CUTLASS"])
def test_bad_routing_ids_under_jit_give_nan_not_another_expert(rng, backend):
    """Under jit the ids cannot be checked: a token with an id outside [0, E) comes out
    NaN (every element), the other tokens equal the run without it, masked tokens stay 0."""
    spec = make_spec(experts=8)
    layer = make_layer(spec, backend=backend, ep=2)
    w, config, mesh = layer.weights(), layer.config, layer.mesh
    x = random_tokens(rng, 9, spec.hidden_size)  # odd: padded to the 2 ranks inside
    mask = jnp.ones(9, bool).at[7].set(False)
    fwd = jax.jit(lambda x, ids, wts: moe_forward(x, w, spec=spec, config=config, mesh=mesh, token_mask=mask,
                                                  routing=Routing(ids, wts)))
    routing = random_routing(rng, 9, spec.num_experts, spec.top_k)
    want, want_stats = fwd(x, routing.ids, routing.weights)
    want = np.asarray(want)
    ids = routing.ids.at[2, 1].set(8).at[5, 0].set(-3).at[7, 0].set(99)  # token 7 is masked
    got, stats = fwd(x, ids, routing.weights)
    got = np.asarray(got)
    assert np.isnan(got[[2, 5]]).all()
    keep = [t for t in range(9) if t not in (2, 5)]
    np.testing.assert_array_equal(got[keep], want[keep])
    assert not np.isnan(want).any() and (got[7] == 0).all()
    # The bad pairs are counted on no expert (-3 would otherwise wrap around to expert 5).
    counts = np.asarray(want_stats.expert_counts).copy()
    counts[int(routing.ids[2, 1])] -= 1
    counts[int(routing.ids[5, 0])] -= 1
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), counts)


@pytest.mark.parametrize("backend", ["WIDEEP", "CUTLASS"])
def test_unplaced_expert_under_jit_gives_nan_not_another_expert(rng, backend):
    """Under jit a slot table is not checked: tokens routed to an expert it gives no slot
    come out NaN; tokens routed to untouched experts equal the run with the right table."""
    spec = make_spec(experts=8)
    layer = make_layer(spec, backend=backend, ep=2, load_balancer={"num_slots": 10})
    w, config, mesh = layer.weights(), layer.config, layer.mesh
    x = random_tokens(rng, 64, spec.hidden_size)  # 16 left expert 3 unrouted (seed 3421670776)
    fwd = jax.jit(lambda x, w: moe_forward(x, w, spec=spec, config=config, mesh=mesh)[0])
    want = np.asarray(fwd(x, w))
    table = np.asarray(w.slot_to_expert)
    assert table[3] == 3 and (table == 3).sum() == 1
    unplaced = w._replace(slot_to_expert=jax.device_put(jnp.asarray(table).at[3].set(0), w.slot_to_expert.sharding))
    got = np.asarray(fwd(x, unplaced))
    ids = np.asarray(route(x @ w.router, spec.top_k, spec.router).ids)
    to3 = (ids == 3).any(-1)
    untouched = ~(np.isin(ids, [0, 3]).any(-1))  # slot 3 (expert 3's weights) now answers for 0
    assert to3.any() and untouched.any()
    assert np.isnan(got[to3]).all()
    np.testing.assert_array_equal(got[untouched], want[untouched])
    assert not np.isnan(want).any()


def test_spec_refuses_bad_shared_widths_and_dtypes():
    for kwargs, message in (({"num_shared_experts": 1.5}, "num_shared_experts=1.5"),
                            ({"num_shared_experts": 1, "shared_intermediate_size": 0},
                             "shared_intermediate_size=0: allowed: a positive int, or None"),
                            ({"shared_intermediate_size": 64}, "with num_shared_experts=0 would be ignored"),
                            ({"router": "softmax"}, "MoESpec.router='softmax': allowed: a RouterSpec"),
                            ({"router": RouterSpec(norm_topk_prob="false")},
                             "RouterSpec.norm_topk_prob='false': must be True or False"),
                            ({"dtype": "int8"}, "dtype='int8': allowed: a floating dtype"),
                            ({"param_dtype": "nope"}, "param_dtype='nope'")):
        with pytest.raises(ValueError, match=message):
            MoESpec(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, **kwargs)
    assert MoESpec(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, num_shared_experts=2).shared_width == 8
    numpy_ints = MoESpec(hidden_size=np.int64(8), intermediate_size=np.int32(4), num_experts=4, top_k=2)
    assert numpy_ints.hidden_size == 8 and type(numpy_ints.hidden_size) is int


def test_user_example_from_the_issue(rng):
    """The README's example: DeepSeek routing, WIDEEP from the shipped config file."""
    from pathlib import Path

    from wideep_jax import load_moe_config

    path = Path(__file__).resolve().parent.parent / "configs" / "wide_ep.yaml"
    spec = make_spec(kind="noaux_tc", experts=256, top_k=8, n_group=8, topk_group=4,
                     hidden=16, inter=8, shared=1)
    cfg = load_moe_config(path, num_experts=256, ep_size=4)
    moe = MoELayer(spec, cfg, mesh=make_mesh(4), layer_idx=3, rngs=nnx.Rngs(0))
    assert moe.w_gate_up[...].shape[0] == 288
    x = random_tokens(rng, 32, spec.hidden_size)
    y, stats = run_layer(moe, x)
    assert_close(y, _reference(moe, x))
    assert stats.expert_counts.shape == (256,) and int(stats.expert_counts.sum()) == 32 * 8


def test_placement_changes_are_data(rng):
    """New placements (weights moved with them) keep the output and never recompile."""
    from wideep_jax.reference import expert_weights

    spec = make_spec(kind="noaux_tc", top_k=4, experts=16, shared=1)
    num_slots, ep = 24, 4
    layer = make_layer(spec, ep=ep, load_balancer={"num_slots": num_slots})
    master_up, master_down = expert_weights(unsharded(layer.weights()), spec.num_experts)
    x = random_tokens(rng, 32, spec.hidden_size)
    graphdef, state = nnx.split(layer)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    y0, _ = forward(state, x)
    for _ in range(100):
        placement = np.concatenate([rng.permutation(16), rng.choice(16, num_slots - 16, replace=False)])
        s2e = jnp.asarray(placement, jnp.int32)
        layer.slot_to_expert[...] = jax.device_put(s2e, layer.slot_to_expert[...].sharding)
        layer.w_gate_up[...] = jax.device_put(master_up[s2e], layer.w_gate_up[...].sharding)
        layer.w_down[...] = jax.device_put(master_down[s2e], layer.w_down[...].sharding)
        y, stats = forward(nnx.state(layer), x)
        assert_close(y, y0, rtol=1e-6)
        counts = np.asarray(stats.slot_counts)
        np.testing.assert_array_equal(np.bincount(placement, weights=counts, minlength=16).astype(int),
                                      np.asarray(stats.expert_counts))
    assert forward._cache_size() == 1


def test_user_routing_with_repeated_experts(rng):
    """A caller's routing may name one expert twice: both pairs count, nothing is cut."""
    spec = make_spec(top_k=8, experts=16)
    layer = make_layer(spec, ep=8)  # 2 local slots per rank < top_k
    ids = np.tile(np.array([0, 0, 1, 1, 0, 1, 0, 1]), (16, 1))
    routing = Routing(jnp.asarray(ids, jnp.int32), jnp.asarray(rng.uniform(0.1, 1, (16, 8)), jnp.float32))
    x = random_tokens(rng, 16, spec.hidden_size)
    y, stats = run_layer(layer, x, routing=routing)
    assert_close(y, _reference(layer, x, routing=routing))
    assert int(stats.slot_counts.sum()) == 16 * 8


def test_local_first_replica_selection_same_output(rng):
    """local_first changes which replica computes a pair, never the result."""
    spec = make_spec(kind="noaux_tc", top_k=4, experts=16, shared=1)
    placement = np.concatenate([rng.permutation(16), rng.permutation(16)[:8]])
    lb = {"num_slots": 24, "initial_global_assignments": {0: placement.tolist()}}
    round_robin = make_layer(spec, ep=4, seed=5, layer_idx=0, load_balancer=lb)
    local = make_layer(spec, ep=4, seed=5, layer_idx=0, load_balancer=lb, replica_selection="local_first")
    assert local.config.replica_selection == "local_first"
    x = random_tokens(rng, 64, spec.hidden_size)
    y_rr, s_rr = run_layer(round_robin, x)
    y_local, s_local = run_layer(local, x)
    assert_close(y_local, _reference(local, x))
    assert_close(y_local, y_rr, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(s_local.expert_counts), np.asarray(s_rr.expert_counts))
    assert not np.array_equal(np.asarray(s_local.slot_counts), np.asarray(s_rr.slot_counts))


@pytest.mark.parametrize("routing_kind", ["random", "one_expert", "one_rank"])
def test_cutlass_shards_slots_and_matches_wideep(rng, routing_kind):
    """CUTLASS over a mesh is TensorRT-LLM's all-gather EP: each device holds only its
    slots, and outputs and statistics equal the all-to-all path's on the same weights,
    with replicated slots and adversarial routing (everything to one expert / rank)."""
    ep, spec = 4, make_spec(top_k=2, experts=8, shared=1)
    seed = int(rng.integers(1 << 30))
    cfg = {"load_balancer": {"num_slots": 12}}  # 4 replicated experts
    wide = make_layer(spec, backend="WIDEEP", ep=ep, seed=seed, **cfg)
    gathered = make_layer(spec, backend="CUTLASS", ep=ep, seed=seed, **cfg)
    assert gathered.w_gate_up[...].sharding.spec[0] == "ep"
    assert {s.data.shape[0] for s in gathered.w_gate_up[...].addressable_shards} == {12 // ep}
    num_tokens = 40
    x = random_tokens(rng, num_tokens, spec.hidden_size)
    # Slots s -> expert s % 8, 3 per rank: experts 4 and 5 live only on rank 1.
    routing = random_routing(rng, num_tokens, spec.num_experts, spec.top_k,
                             experts=[4, 5] if routing_kind == "one_rank" else None)
    if routing_kind == "one_expert":  # every token's first pair to expert 4, the second elsewhere
        others = rng.choice([e for e in range(8) if e != 4], num_tokens)
        routing = Routing(jnp.asarray(np.stack([np.full(num_tokens, 4), others], 1), jnp.int32), routing.weights)
    y_wide, s_wide = run_layer(wide, x, routing=routing)
    y_gathered, s_gathered = run_layer(gathered, x, routing=routing)
    assert_close(y_gathered, _reference(gathered, x, routing=routing))
    assert_close(y_gathered, y_wide, rtol=1e-6)
    for got, want in zip(s_gathered, s_wide):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("backend, selection", [("WIDEEP", "round_robin"), ("WIDEEP", "local_first"),
                                                ("CUTLASS", "round_robin")])
def test_negative_slot_entry_under_jit_holds_no_expert(rng, backend, selection):
    """Under jit a slot table is not checked: a slot marked -1 holds no expert. Where every
    expert keeps another slot the output is unchanged; an expert left with none comes out
    NaN (the unplaced-expert guard). A -1 used to shift every expert onto its neighbour's
    slots: wrong outputs everywhere, no NaN."""
    spec = make_spec(experts=8)
    extra = {} if selection == "round_robin" else {"replica_selection": selection}
    layer = make_layer(spec, backend=backend, ep=2, load_balancer={"num_slots": 10}, **extra)
    w, config, mesh = layer.weights(), layer.config, layer.mesh
    x = random_tokens(rng, 64, spec.hidden_size)  # 64: some token surely routes to every expert
    fwd = jax.jit(lambda x, w: moe_forward(x, w, spec=spec, config=config, mesh=mesh)[0])
    want = np.asarray(fwd(x, w))
    table = np.asarray(w.slot_to_expert)
    assert (table == table[9]).sum() == 2  # slot 9 is a replica
    with_hole = lambda slot: w._replace(slot_to_expert=jax.device_put(jnp.asarray(table).at[slot].set(-1),
                                                                      w.slot_to_expert.sharding))
    assert_close(fwd(x, with_hole(9)), want, rtol=1e-6)
    alone = int(table[2])
    assert (table == alone).sum() == 1  # slot 2 holds the only replica of its expert
    got = np.asarray(fwd(x, with_hole(2)))
    ids = np.asarray(route(x @ w.router, spec.top_k, spec.router).ids)
    to_alone = (ids == alone).any(-1)
    assert to_alone.any() and (~to_alone).any()
    assert np.isnan(got[to_alone]).all()
    assert_close(got[~to_alone], want[~to_alone], rtol=1e-6)


def test_dense_reference_refuses_an_unplaced_expert(rng):
    """The reference reads each expert's first slot: an expert with none read slot 0's
    weights (argmax of no match), silently; it is refused, naming the experts."""
    from wideep_jax.reference import expert_weights

    spec = make_spec(experts=8)
    w = unsharded(make_layer(spec, backend="CUTLASS", ep=1).weights())
    x = random_tokens(rng, 4, spec.hidden_size)
    unplaced = w._replace(slot_to_expert=w.slot_to_expert.at[3].set(0))
    with pytest.raises(ValueError, match=r"weights.slot_to_expert gives experts \[3\] no slot; "
                                         r"allowed: every expert in \[0, 8\) in >= 1 slot"):
        dense_moe_reference(x, unplaced, spec)
    with pytest.raises(ValueError, match=r"experts \[3\] no slot"):
        expert_weights(unplaced, 8)
    jax.jit(lambda w: expert_weights(w, 8))(unplaced)  # under jit it cannot be checked


@pytest.mark.parametrize("kernel, hidden, inter, dtype, match", [
    ("mosaic_gpu", 64, 64, jnp.float32, r"expert_kernel='mosaic_gpu' takes bfloat16 or float16 operands, got MoESpec.dtype=float32"),
    ("triton", 64, 64, jnp.float32, r"expert_kernel='triton' takes bfloat16 or float16 operands, got MoESpec.dtype=float32"),
    ("mosaic_gpu", 64, 96, jnp.bfloat16, r"expert_kernel='mosaic_gpu' needs hidden_size and intermediate_size that "
                                         r"are multiples of 64, got intermediate_size=96; allowed: such widths, or "
                                         r"moe_config.expert_kernel 'auto'"),
    ("triton", 40, 32, jnp.bfloat16, r"multiples of 16, got hidden_size=40"),
])
def test_named_expert_kernel_that_cannot_take_the_layer_is_refused(rng, kernel, hidden, inter, dtype, match):
    """A named Pallas kernel that cannot take the tokens' dtype or the layer's widths is an
    error naming the key before any kernel runs (it failed inside the kernel before, naming
    its tiles); 'xla' takes the same layer."""
    spec = make_spec(hidden=hidden, inter=inter, experts=8, top_k=2, dtype=dtype)
    x = random_tokens(rng, 16, hidden, dtype)
    with pytest.raises(ValueError, match=match):
        run_layer(make_layer(spec, ep=2, expert_kernel=kernel), x)
    y, _ = run_layer(make_layer(spec, ep=2, expert_kernel="xla"), x)
    assert np.isfinite(np.asarray(y, np.float32)).all()
