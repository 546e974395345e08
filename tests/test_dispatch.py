"""Dispatch plan and the XLA all-to-all backend vs. NumPy references.

The plan is integer bookkeeping and dispatch/combine only move data, so every
check is exact. Token values are dyadic (multiples of 2**-6 in [-8, 8)) and
routing weights are 1.0 or multiples of 1/4, so every float sum in combine is
exact as well. Inputs are drawn fresh each run (``rng`` prints its seed).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from numpy.testing import assert_array_equal

from wideep_jax.comm import ReceivedTokens, XlaAllToAll, get_alltoall_backend
from wideep_jax.dispatch import DispatchPlan, make_dispatch_plan

ROUTINGS = ["random", "one_slot", "one_rank", "every_rank", "none_valid"]


# ----------------------------------------------------------------------------- builders


def random_slots(rng: np.random.Generator, mode: str, num_tokens: int, top_k: int,
                 num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """int32 [T, K] global slots for one routing pattern."""
    num_slots = num_ranks * slots_per_rank
    if num_tokens == 0:  # np.stack needs at least one row
        return np.zeros((0, top_k), np.int32)
    if mode in ("random", "none_valid"):  # distinct slots per token
        return np.stack([rng.choice(num_slots, top_k, replace=False)
                         for _ in range(num_tokens)]).astype(np.int32)
    if mode == "one_slot":  # every pair of every token on one slot (one expert, one replica)
        return np.full((num_tokens, top_k), rng.integers(num_slots), np.int32)
    if mode == "one_rank":  # every token goes to one rank only
        rank = rng.integers(num_ranks)
        local = np.stack([rng.choice(slots_per_rank, top_k, replace=slots_per_rank < top_k)
                          for _ in range(num_tokens)])
        return (rank * slots_per_rank + local).astype(np.int32)
    if mode == "every_rank":  # every token goes to every rank (needs K >= R)
        assert top_k >= num_ranks
        rows = []
        for _ in range(num_tokens):
            ranks = np.concatenate([np.arange(num_ranks),
                                    rng.integers(0, num_ranks, top_k - num_ranks)])
            rows.append(rng.permutation(ranks * slots_per_rank
                                        + rng.integers(0, slots_per_rank, top_k)))
        return np.stack(rows).astype(np.int32)
    raise ValueError(mode)


def random_valid(rng: np.random.Generator, mode: str, num_tokens: int) -> np.ndarray:
    if mode == "none_valid":
        return np.zeros(num_tokens, bool)
    valid = rng.random(num_tokens) < 0.75
    if num_tokens:
        valid[rng.integers(num_tokens)] = True
    return valid


def dyadic_tokens(rng: np.random.Generator, shape) -> np.ndarray:
    """Floats with few mantissa bits: sums of small multiples stay exact."""
    return (rng.integers(-512, 512, shape) / 64.0).astype(np.float32)


def random_weights(rng: np.random.Generator, shape) -> np.ndarray:
    return (rng.integers(1, 9, shape) / 4.0).astype(np.float32)


# ----------------------------------------------------------------------------- reference


def ref_plan(slots, weights, valid, num_ranks, slots_per_rank, capacity):
    """Loop reference: per destination, the tokens with >= 1 pair there, in token order."""
    num_tokens, top_k = slots.shape
    send_token = np.zeros((num_ranks, capacity), np.int32)
    send_count = np.zeros(num_ranks, np.int32)
    send_slot = np.full((num_ranks, capacity, top_k), -1, np.int32)
    send_weight = np.zeros((num_ranks, capacity, top_k), np.float32)
    token_row = np.full((num_tokens, num_ranks), -1, np.int32)
    for r in range(num_ranks):
        i = 0
        for t in range(num_tokens):
            if not valid[t]:
                continue
            pairs = [k for k in range(top_k) if slots[t, k] // slots_per_rank == r]
            if not pairs:
                continue
            send_token[r, i] = t
            token_row[t, r] = i
            for k in pairs:
                send_slot[r, i, k] = slots[t, k] % slots_per_rank
                send_weight[r, i, k] = weights[t, k]
            i += 1
        send_count[r] = i
    return DispatchPlan(send_token, send_count, send_slot, send_weight, token_row)


def assert_plan_equal(got: DispatchPlan, want: DispatchPlan):
    for name, g, w in zip(DispatchPlan._fields, got, want):
        g = np.asarray(g)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert_array_equal(g, w, err_msg=name)


# ----------------------------------------------------------------------------- plan


@functools.partial(jax.jit, static_argnames=("num_ranks", "slots_per_rank", "capacity"))
def _plan(slots, weights, valid, *, num_ranks, slots_per_rank, capacity=None):
    return make_dispatch_plan(slots, weights, valid, num_ranks=num_ranks,
                              slots_per_rank=slots_per_rank, capacity=capacity)


@pytest.mark.parametrize("mode", ROUTINGS)
@pytest.mark.parametrize("num_ranks,slots_per_rank,capacity", [(4, 3, None), (4, 3, 29), (8, 2, None)])
def test_plan_matches_reference(rng, mode, num_ranks, slots_per_rank, capacity):
    num_tokens, top_k = 24, 8
    cap = num_tokens if capacity is None else capacity
    for _ in range(3):
        slots = random_slots(rng, mode, num_tokens, top_k, num_ranks, slots_per_rank)
        weights = random_weights(rng, (num_tokens, top_k))
        valid = random_valid(rng, mode, num_tokens)
        got = _plan(jnp.asarray(slots), jnp.asarray(weights), jnp.asarray(valid),
                    num_ranks=num_ranks, slots_per_rank=slots_per_rank, capacity=capacity)
        assert got.num_ranks == num_ranks and got.capacity == cap
        want = ref_plan(slots, weights, valid, num_ranks, slots_per_rank, cap)
        assert_plan_equal(got, want)

        send_token, send_count, send_slot, _, token_row = (np.asarray(a) for a in got)
        for r in range(num_ranks):
            sent = send_token[r, : send_count[r]]
            assert np.all(np.diff(sent) > 0)  # increasing, each token at most once
            assert np.all(valid[sent])  # padding tokens are never sent
            # token_row inverts send_token.
            assert_array_equal(token_row[sent, r], np.arange(send_count[r]))
            assert np.sum(token_row[:, r] >= 0) == send_count[r]
        assert np.all(token_row[~valid] == -1)
        # Each valid pair appears exactly once, on its slot's rank.
        pairs_sent = (send_slot >= 0).sum()
        assert pairs_sent == valid.sum() * top_k
        if mode == "one_rank":
            assert (send_count > 0).sum() <= 1
        if mode == "every_rank":
            assert_array_equal(send_count, np.full(num_ranks, valid.sum()))


def test_plan_dedups_tokens_per_rank(rng):
    """All K pairs of a token on one rank: one row carrying all K pairs."""
    slots = np.full((6, 4), 5, np.int32)  # rank 1 of 4 (slots_per_rank 4), local slot 1
    slots[3] = [4, 5, 6, 7]
    weights = random_weights(rng, slots.shape)
    plan = _plan(jnp.asarray(slots), jnp.asarray(weights), jnp.ones(6, bool),
                 num_ranks=4, slots_per_rank=4)
    assert_array_equal(np.asarray(plan.send_count), [0, 6, 0, 0])
    assert_array_equal(np.asarray(plan.send_token)[1], np.arange(6))
    expected_slots = np.full((6, 4), 1)
    expected_slots[3] = [0, 1, 2, 3]
    assert_array_equal(np.asarray(plan.send_slot)[1], expected_slots)
    assert_array_equal(np.asarray(plan.send_weight)[1], weights)
    assert_array_equal(np.asarray(plan.send_slot)[[0, 2, 3]], -1)


@pytest.mark.parametrize("capacity", [0, 1, 23])
def test_plan_capacity_below_tokens_raises(rng, capacity):
    slots = random_slots(rng, "random", 24, 2, 4, 2)
    with pytest.raises(ValueError, match="capacity"):
        make_dispatch_plan(jnp.asarray(slots), jnp.ones((24, 2)), jnp.ones(24, bool),
                           num_ranks=4, slots_per_rank=2, capacity=capacity)


# ----------------------------------------------------------------------------- XLA backend round trip

R = 4  # EP ranks
T = 16  # tokens per rank
K = 4  # top-k (== R so "every_rank" is possible)
H = 8  # hidden
SPR = 3  # slots per rank


def test_backend_lookup():
    assert isinstance(get_alltoall_backend("xla"), XlaAllToAll)
    assert isinstance(get_alltoall_backend("auto"), XlaAllToAll)
    with pytest.raises(ValueError, match="alltoall_backend"):
        get_alltoall_backend("nope")


@functools.lru_cache(maxsize=None)
def _round_trip_fn():
    mesh = jax.make_mesh((R,), ("ep",), devices=jax.devices()[:R])
    backend = XlaAllToAll()

    def body(x, slots, weights, valid):
        plan = make_dispatch_plan(slots, weights, valid, num_ranks=R, slots_per_rank=SPR)
        recv = backend.dispatch(x, plan, axis_name="ep")
        assert isinstance(recv, ReceivedTokens)
        pair_weight = jnp.where(recv.slot >= 0, recv.weight, 0.0).sum(-1)  # [R, C]
        # Padding rows get NaN: combine must never read them.
        partial = jnp.where(recv.valid_rows()[:, :, None], recv.x * pair_weight[:, :, None], jnp.nan)
        y = backend.combine(partial, plan, recv.count, axis_name="ep")
        return y, recv, plan

    spec = P("ep")
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 4,
                               out_specs=(spec, ReceivedTokens(spec, spec, spec, spec),
                                          DispatchPlan(spec, spec, spec, spec, spec)),
                               check_vma=False))
    return mesh, fn


@pytest.mark.parametrize("mode", ROUTINGS)
@pytest.mark.parametrize("weight_kind", ["ones", "dyadic"])
def test_xla_round_trip(rng, mode, weight_kind):
    mesh, fn = _round_trip_fn()
    sharding = NamedSharding(mesh, P("ep"))
    x = dyadic_tokens(rng, (R, T, H))
    slots = np.stack([random_slots(rng, mode, T, K, R, SPR) for _ in range(R)])  # [src, T, K]
    valid = np.stack([random_valid(rng, mode, T) for _ in range(R)])
    weights = (np.ones((R, T, K), np.float32) if weight_kind == "ones"
               else random_weights(rng, (R, T, K)))

    def put(a):
        return jax.device_put(jnp.asarray(a.reshape(R * T, *a.shape[2:])), sharding)

    y, recv, plan = fn(put(x), put(slots), put(weights), put(valid))
    y = np.asarray(y).reshape(R, T, H)
    C = T
    rx = np.asarray(recv.x).reshape(R, R, C, H)  # [dst, src, row, H]
    rslot = np.asarray(recv.slot).reshape(R, R, C, K)
    rweight = np.asarray(recv.weight).reshape(R, R, C, K)
    rcount = np.asarray(recv.count).reshape(R, R)  # [dst, src]
    # Per-rank plan outputs were concatenated along axis 0: split them back per source.
    plans = [DispatchPlan(*(np.asarray(a).reshape(R, -1, *a.shape[1:])[src] for a in plan))
             for src in range(R)]

    for src in range(R):
        want = ref_plan(slots[src], weights[src], valid[src], R, SPR, C)
        assert_plan_equal(plans[src], want)
        for dst in range(R):
            n = want.send_count[dst]
            assert rcount[dst, src] == n
            tokens = want.send_token[dst, :n]
            # Received rows are exactly the sender's token rows, in the plan's order.
            assert_array_equal(rx[dst, src, :n], x[src, tokens])
            assert_array_equal(rslot[dst, src, :n], want.send_slot[dst, :n])
            assert_array_equal(rweight[dst, src, :n], want.send_weight[dst, :n])
        # Every pair of a valid token arrived once, at its slot's rank and local slot.
        for t in np.flatnonzero(valid[src]):
            for k in range(K):
                dst, local = divmod(int(slots[src, t, k]), SPR)
                row = want.token_row[t, dst]
                assert rslot[dst, src, row, k] == local
                assert rweight[dst, src, row, k] == weights[src, t, k]

    # Combine: each source gets x[t] * (sum of its K weights) exactly; padding gets 0.
    expected = np.where(valid[:, :, None], x * weights.sum(-1, keepdims=True), 0.0)
    if weight_kind == "ones":
        expected = np.where(valid[:, :, None], x * K, 0.0)
    assert np.all(np.isfinite(y))
    assert_array_equal(y, expected.astype(np.float32))


def test_plan_refuses_bad_shapes_and_sizes(rng):
    """Mismatched shapes would broadcast (one weight for every pair) and a zero rank or
    slot count would drop every token: both are refused, naming the argument."""
    slots = jnp.asarray(random_slots(rng, "random", 6, 2, 2, 4))
    weights, valid = jnp.asarray(random_weights(rng, (6, 2))), jnp.ones(6, bool)
    cases = [
        (dict(weights=weights[:, :1]), r"weights has shape \(6, 1\); allowed: .*\(6, 2\)"),
        (dict(weights=weights[:, :, None]), r"weights has shape \(6, 2, 1\)"),
        (dict(valid=valid[:5]), r"valid has shape \(5,\); allowed: \[6\]"),
        (dict(slots=slots[:, 0]), r"slots has shape \(6,\); allowed: \[tokens, top_k\]"),
        (dict(num_ranks=0), "num_ranks=0; allowed: an int >= 1"),
        (dict(slots_per_rank=0), "slots_per_rank=0; allowed: an int >= 1"),
    ]
    for change, needle in cases:
        args = dict(slots=slots, weights=weights, valid=valid, num_ranks=2, slots_per_rank=4) | change
        with pytest.raises(ValueError, match=needle):
            make_dispatch_plan(**args)


def test_plan_takes_an_int_mask_as_nonzero(rng):
    """``valid`` given as ints: any nonzero value marks a real token (not only 1)."""
    slots = jnp.asarray(random_slots(rng, "random", 6, 2, 2, 4))
    weights = jnp.asarray(random_weights(rng, (6, 2)))
    mask = rng.integers(0, 2, 6) * rng.integers(1, 5, 6)
    mask[0] = 2
    want = make_dispatch_plan(slots, weights, jnp.asarray(mask != 0), num_ranks=2, slots_per_rank=4)
    got = make_dispatch_plan(slots, weights, jnp.asarray(mask, jnp.int32), num_ranks=2, slots_per_rank=4)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert_array_equal(np.asarray(a), np.asarray(b))


def test_plan_refuses_non_int_sizes_and_float_slots_or_mask(rng):
    """slots_per_rank written as S / R is a float: 3.75 split the slots at fractional
    boundaries (slot 29 went to rank 7 as its local slot 2), silently; a float mask was cut
    to bool (0.2 kept its token) and float slots to ints. All refused, naming the argument;
    the same checks guard `experts.routed_experts` (float slots failed there as an
    unrelated indexing error)."""
    from wideep_jax.experts import routed_experts

    slots = jnp.asarray(random_slots(rng, "random", 6, 2, 2, 4))
    weights, valid = jnp.asarray(random_weights(rng, (6, 2))), jnp.ones(6, bool)
    cases = [
        (dict(slots_per_rank=30 / 8), "slots_per_rank=3.75; allowed: an int >= 1"),
        (dict(slots_per_rank=4.0), "slots_per_rank=4.0; allowed: an int >= 1"),
        (dict(num_ranks=2.0), "num_ranks=2.0; allowed: an int >= 1"),
        (dict(num_ranks=True), "num_ranks=True; allowed: an int >= 1"),
        (dict(capacity=6.0), "capacity=6.0; allowed: an int >= the local token count 6, or None"),
        (dict(valid=jnp.full(6, 0.2)), r"valid has dtype float32; allowed: bool \(or 0/1 integers\)"),
        (dict(slots=slots.astype(jnp.float32)), "slots has dtype float32; allowed: an integer dtype"),
    ]
    for change, needle in cases:
        args = dict(slots=slots, weights=weights, valid=valid, num_ranks=2, slots_per_rank=4) | change
        with pytest.raises(ValueError, match=needle):
            make_dispatch_plan(**args)
    make_dispatch_plan(slots, weights, valid, num_ranks=np.int64(2), slots_per_rank=np.int32(4), capacity=np.int64(7))
    x, w_gate_up, w_down = jnp.ones((6, 8)), jnp.ones((4, 8, 6)), jnp.ones((4, 3, 8))
    local = slots % 4
    with pytest.raises(ValueError, match="slot has dtype float32; allowed: an integer dtype"):
        routed_experts(x, local.astype(jnp.float32), weights, valid, w_gate_up, w_down)
    with pytest.raises(ValueError, match=r"valid has dtype float32; allowed: bool"):
        routed_experts(x, local, weights, jnp.full(6, 0.2), w_gate_up, w_down)
