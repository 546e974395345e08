"""Placement: replica tables and round-robin replica choice vs. NumPy references.

Everything here is integer bookkeeping, so every comparison is exact. Inputs
are drawn fresh each run (the ``rng`` fixture prints its seed on failure).
Shapes are fixed per jitted function so each compiles once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from wideep_jax.config import default_placement
from wideep_jax.placement import ReplicaTable, choose_slots, replica_table

E = 8  # experts
T = 48  # tokens
K = 4  # top-k


# ----------------------------------------------------------------------------- builders


def random_placement(rng: np.random.Generator, num_slots: int, num_experts: int = E,
                     *, skew: bool = False) -> np.ndarray:
    """Every expert at least once, the extra slots random (or all on one hot expert)."""
    assert num_slots >= num_experts
    extra = num_slots - num_experts
    if skew:
        hot = rng.integers(num_experts)
        extra_ids = np.full(extra, hot)
    else:
        extra_ids = rng.integers(0, num_experts, extra)
    placement = np.concatenate([np.arange(num_experts), extra_ids])
    return rng.permutation(placement).astype(np.int32)


def routing_ids(rng: np.random.Generator, mode: str, num_tokens: int = T, top_k: int = K,
                num_experts: int = E) -> np.ndarray:
    """int32 [T, K] expert ids for one routing pattern."""
    if mode == "random":  # distinct experts per token
        return np.stack([rng.choice(num_experts, top_k, replace=False)
                         for _ in range(num_tokens)]).astype(np.int32)
    if mode == "one_expert":  # every pair of every token on one expert
        return np.full((num_tokens, top_k), rng.integers(num_experts), np.int32)
    if mode == "hot_expert":  # every token picks one hot expert plus random distinct others
        hot = rng.integers(num_experts)
        others = [e for e in range(num_experts) if e != hot]
        rows = [rng.permutation(np.concatenate([[hot], rng.choice(others, top_k - 1, replace=False)]))
                for _ in range(num_tokens)]
        return np.stack(rows).astype(np.int32)
    raise ValueError(mode)


def random_valid(rng: np.random.Generator, num_tokens: int = T) -> np.ndarray:
    return rng.random(num_tokens) < 0.75


# ----------------------------------------------------------------------------- references


def ref_replicas(placement: np.ndarray, num_experts: int) -> list[list[int]]:
    """Replica j of expert e = the j-th slot (ascending) that holds e."""
    return [[s for s in range(len(placement)) if placement[s] == e] for e in range(num_experts)]


def ref_choose_slots(ids: np.ndarray, valid: np.ndarray, placement: np.ndarray, num_experts: int,
                     rank_offset: int) -> np.ndarray:
    """Token-major round robin over each expert's replicas, starting at rank_offset."""
    replicas = ref_replicas(placement, num_experts)
    seen = [0] * num_experts
    out = np.zeros(ids.shape, np.int32)
    for t in range(ids.shape[0]):
        if not valid[t]:
            continue  # slot 0, and it uses up no turn
        for k in range(ids.shape[1]):
            e = ids[t, k]
            reps = replicas[e]
            out[t, k] = reps[(seen[e] + rank_offset) % len(reps)]
            seen[e] += 1
    return out


# ----------------------------------------------------------------------------- jitted entry points


@functools.partial(jax.jit, static_argnames="num_experts")
def _table(slot_to_expert, num_experts):
    return replica_table(slot_to_expert, num_experts)


@functools.partial(jax.jit, static_argnames="num_experts")
def _choose(ids, valid, slot_to_expert, rank_offset, num_experts):
    table = replica_table(slot_to_expert, num_experts)
    return choose_slots(ids, valid, table, rank_offset=rank_offset)


def choose(ids, valid, placement, rank_offset=0, num_experts=E) -> np.ndarray:
    out = _choose(jnp.asarray(ids, jnp.int32), jnp.asarray(valid, bool),
                  jnp.asarray(placement, jnp.int32), jnp.int32(rank_offset), num_experts)
    return np.asarray(out)


# ----------------------------------------------------------------------------- replica_table


@pytest.mark.parametrize("num_slots", [E, 12, 16, 32])
@pytest.mark.parametrize("skew", [False, True])
def test_replica_table_random(rng, num_slots, skew):
    for _ in range(5):
        placement = random_placement(rng, num_slots, skew=skew)
        table = _table(jnp.asarray(placement), E)
        assert isinstance(table, ReplicaTable)
        sorted_slots, first, count = (np.asarray(a) for a in table[:3])
        assert sorted_slots.shape == (num_slots,) and first.shape == (E,) and count.shape == (E,)
        assert sorted(sorted_slots.tolist()) == list(range(num_slots))  # a permutation
        replicas = ref_replicas(placement, E)
        for e in range(E):
            assert count[e] == len(replicas[e]), (e, placement)
            got = sorted_slots[first[e]: first[e] + count[e]]
            assert_array_equal(got, replicas[e])  # exactly its slots, ascending
            assert np.all(placement[got] == e)


def test_replica_table_identity_and_unplaced(rng):
    placement = default_placement(24, E, 1)  # one rank: slot s -> expert s % E
    assert_array_equal(placement, np.arange(24) % E)
    sorted_slots, first, count = (np.asarray(a) for a in _table(jnp.asarray(placement), E)[:3])
    assert_array_equal(count, np.full(E, 3))
    for e in range(E):
        assert_array_equal(sorted_slots[first[e]: first[e] + 3], [e, e + E, e + 2 * E])
    # An expert held by no slot gets count 0 (the others stay exact).
    placement = rng.integers(1, E, 16).astype(np.int32)  # expert 0 nowhere
    sorted_slots, first, count = (np.asarray(a) for a in _table(jnp.asarray(placement), E)[:3])
    for e, reps in enumerate(ref_replicas(placement, E)):
        assert count[e] == len(reps)
        assert_array_equal(sorted_slots[first[e]: first[e] + count[e]], reps)


# ----------------------------------------------------------------------------- choose_slots


def test_choose_slots_and_tile_schedule_have_no_loops():
    """Both run in every MoE forward. XLA's GPU runtime drives a while loop from the host,
    an iteration at a time (jnp.searchsorted's default method is one), which made the
    host the bound of a decode step; so neither may lower to one."""
    from pallas_kernels.grouped_matmul.schedule import tile_schedule

    ids = jnp.zeros((64, 8), jnp.int32)
    text = _choose.lower(ids, jnp.ones((64,), bool), jnp.arange(32, dtype=jnp.int32) % E, 3,
                         num_experts=E).as_text()
    assert "stablehlo.while" not in text and "stablehlo.gather" in text
    text = jax.jit(tile_schedule, static_argnums=(1, 2, 3)).lower(jnp.ones((64,), jnp.int32), 4096, 128,
                                                                  8).as_text()
    assert "stablehlo.while" not in text and "stablehlo.compare" in text


@pytest.mark.parametrize("num_slots", [E, 16, 32])
@pytest.mark.parametrize("mode", ["random", "one_expert", "hot_expert"])
def test_choose_slots_matches_reference(rng, num_slots, mode):
    for _ in range(3):
        placement = random_placement(rng, num_slots, skew=mode != "random")
        ids = routing_ids(rng, mode)
        valid = random_valid(rng)
        offset = int(rng.integers(0, 64))
        got = choose(ids, valid, placement, offset)
        assert_array_equal(got, ref_choose_slots(ids, valid, placement, E, offset))
        # Every chosen slot of a valid token holds the routed expert.
        assert np.all(placement[got[valid]] == ids[valid])
        # Padding tokens get slot 0.
        assert np.all(got[~valid] == 0)


def test_choose_slots_invalid_tokens_take_no_turn(rng):
    placement = random_placement(rng, 32)
    for mode in ["random", "one_expert", "hot_expert"]:
        ids = routing_ids(rng, mode)
        valid = random_valid(rng)
        offset = int(rng.integers(0, 8))
        got = choose(ids, valid, placement, offset)
        # The valid tokens get the same slots as if the padding tokens were not there.
        n = int(valid.sum())
        packed_ids = np.zeros_like(ids)
        packed_ids[:n] = ids[valid]
        packed_valid = np.arange(T) < n
        packed = choose(packed_ids, packed_valid, placement, offset)
        assert_array_equal(got[valid], packed[:n])
        # No valid token at all: every slot is 0.
        assert_array_equal(choose(ids, np.zeros(T, bool), placement, offset), 0)


@pytest.mark.parametrize("mode", ["random", "one_expert", "hot_expert"])
def test_choose_slots_round_robin_is_even(rng, mode):
    for num_slots in [16, 32]:
        placement = random_placement(rng, num_slots, skew=True)
        ids = routing_ids(rng, mode)
        valid = random_valid(rng)
        got = choose(ids, valid, placement, int(rng.integers(0, 8)))
        replicas = ref_replicas(placement, E)
        for e in range(E):
            picked = got[valid][ids[valid] == e]
            per_replica = np.asarray([np.sum(picked == s) for s in replicas[e]])
            assert per_replica.sum() == picked.size  # nothing outside the expert's replicas
            assert per_replica.max() - per_replica.min() <= 1, (e, per_replica)


def test_choose_slots_rank_offset_rotates(rng):
    placement = random_placement(rng, 32, skew=True)
    replicas = ref_replicas(placement, E)
    ids = routing_ids(rng, "random")
    valid = np.ones(T, bool)
    base = choose(ids, valid, placement, 0)
    for offset in range(1, 12):
        got = choose(ids, valid, placement, offset)
        for t in range(T):
            for k in range(K):
                reps = replicas[ids[t, k]]
                j0 = reps.index(base[t, k])
                assert got[t, k] == reps[(j0 + offset) % len(reps)]
        # The first pair (token-major) of each expert starts on replica offset % count.
        flat_ids, flat_got = ids.reshape(-1), got.reshape(-1)
        for e in np.unique(flat_ids):
            first = flat_got[np.argmax(flat_ids == e)]
            assert first == replicas[e][offset % len(replicas[e])]
    # Experts with a single replica never move.
    assert_array_equal(choose(ids, valid, jnp.asarray(default_placement(E, E, 4)), 5),
                       default_placement(E, E, 4)[ids])


def test_choose_slots_deterministic(rng):
    placement = random_placement(rng, 32)
    ids = routing_ids(rng, "hot_expert")
    valid = random_valid(rng)
    a = choose(ids, valid, placement, 3)
    b = choose(ids.copy(), valid.copy(), placement.copy(), 3)
    assert_array_equal(a, b)
    # Eager (un-jitted) call agrees too.
    table = replica_table(jnp.asarray(placement), E)
    eager = choose_slots(jnp.asarray(ids), jnp.asarray(valid), table, rank_offset=3)
    assert_array_equal(np.asarray(eager), a)


def test_choose_slots_vmapped_rank_offset(rng):
    """A traced rank offset (as inside shard_map via axis_index) works per source."""
    placement = random_placement(rng, 16)
    ids = routing_ids(rng, "hot_expert")
    valid = random_valid(rng)
    table = replica_table(jnp.asarray(placement), E)
    offsets = jnp.arange(4, dtype=jnp.int32)
    got = jax.jit(jax.vmap(lambda r: choose_slots(jnp.asarray(ids), jnp.asarray(valid), table,
                                                  rank_offset=r)))(offsets)
    for r in range(4):
        assert_array_equal(np.asarray(got[r]), ref_choose_slots(ids, valid, placement, E, r))


def test_no_recompile_when_placement_changes(rng):
    @jax.jit
    def fn(ids, valid, slot_to_expert, rank_offset):
        table = replica_table(slot_to_expert, E)
        return choose_slots(ids, valid, table, rank_offset=rank_offset), table

    ids = routing_ids(rng, "random")
    valid = random_valid(rng)
    for i in range(20):
        placement = random_placement(rng, 32, skew=bool(i % 2))
        slots, table = fn(jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(placement), jnp.int32(i))
        assert_array_equal(np.asarray(slots), ref_choose_slots(ids, valid, placement, E, i))
        assert_array_equal(np.asarray(table.count), np.bincount(placement, minlength=E))
    assert fn._cache_size() == 1


@pytest.mark.parametrize("mode", ["random", "hot_expert"])
def test_local_first_uses_own_rank_replicas(rng, mode):
    num_ranks, num_slots = 4, 16
    placement = random_placement(rng, num_slots)
    ids = routing_ids(rng, mode)
    valid = random_valid(rng)
    table = replica_table(jnp.asarray(placement), E)
    per_rank = num_slots // num_ranks
    for rank in range(num_ranks):
        round_robin = np.asarray(choose_slots(jnp.asarray(ids), jnp.asarray(valid), table, rank_offset=rank))
        local = np.asarray(choose_slots(jnp.asarray(ids), jnp.asarray(valid), table, rank_offset=rank,
                                        local_rank=rank, num_ranks=num_ranks))
        own = placement[rank * per_rank:(rank + 1) * per_rank]
        for t in range(T):
            for k in range(K):
                if not valid[t]:
                    assert local[t, k] == 0
                    continue
                e = ids[t, k]
                assert placement[local[t, k]] == e  # always a replica of the routed expert
                if e in own:  # the lowest replica slot on this rank
                    assert local[t, k] == rank * per_rank + int(np.flatnonzero(own == e)[0])
                else:
                    assert local[t, k] == round_robin[t, k]


# ----------------------------------------------------------------------------- a model's placement


def test_model_takes_a_placement_for_every_moe_layer_only(rng):
    """Each MoE layer of a model takes its row of ``initial_global_assignments``; a placement
    that leaves one out is refused before the model builds a layer (TensorRT-LLM fails with
    a KeyError where that layer is built), instead of that layer silently taking the
    default placement."""
    import re

    from flax import nnx

    from wideep_jax.config import ConfigError, load_moe_config
    from wideep_jax.layer import MoELayer
    from wideep_jax.models import CausalLM, DecoderConfig

    cfg = DecoderConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=32,
                        moe_intermediate_size=16, num_experts=E, num_experts_per_tok=2, moe_layers=(1, 2, 3))
    rows = {layer: random_placement(rng, 12).tolist() for layer in cfg.moe_layers}

    def build(rows):
        moe = load_moe_config({"load_balancer": {"num_slots": 12, "initial_global_assignments": rows}},
                              num_experts=E)
        return CausalLM(cfg, moe, rngs=nnx.Rngs(0))

    model = build(rows)
    placed = {layer.mlp.layer_idx: np.asarray(layer.mlp.slot_to_expert[...]) for layer in model.layers
              if isinstance(layer.mlp, MoELayer)}
    assert sorted(placed) == [1, 2, 3]
    for layer, ids in placed.items():
        assert_array_equal(ids, rows[layer])
    del rows[2]
    with pytest.raises(ConfigError, match=re.escape(
            "moe_config.load_balancer.initial_global_assignments: MoE layers [2] have no placement (it has layers "
            "[1, 3], the model's MoE layers are [1..3]); allowed: a placement for every MoE layer of the model, "
            "or no initial_global_assignments")):
        build(rows)


# ----------------------------------------------------------------------------- bad arguments


def test_out_of_range_placement_entry_holds_no_expert(rng):
    """Under jit a slot table cannot be refused: a slot holding -1 (or E) is in no expert's
    replicas, and every other expert keeps exactly its own slots. A -1 used to wrap onto
    expert E-1's count and sort first, moving every expert onto its neighbour's slots."""
    for bad in (-1, -5, E, E + 3):
        placement = random_placement(rng, 16)
        hole = int(rng.integers(16))
        placement[hole] = bad
        table = _table(jnp.asarray(placement), E)
        sorted_slots, first, count = (np.asarray(a) for a in table[:3])
        for e, reps in enumerate(ref_replicas(placement, E)):
            assert count[e] == len(reps), (bad, e, placement)
            assert_array_equal(sorted_slots[first[e]: first[e] + count[e]], reps)
        ids = routing_ids(rng, "random")
        placed = np.isin(ids, placement).all(axis=1)  # tokens whose experts all kept a slot
        got = choose(ids, placed, placement, 3)
        assert hole not in got[placed]
        assert_array_equal(got, ref_choose_slots(ids, placed, placement, E, 3))
        for rank in range(4):
            local = np.asarray(choose_slots(jnp.asarray(ids), jnp.asarray(placed), table,
                                            local_rank=rank, num_ranks=4))
            assert hole not in local[placed]
            assert np.all(placement[local[placed]] == ids[placed])


def test_choose_slots_refuses_bad_arguments(rng):
    """A mask of the wrong shape would broadcast (one entry for every token) or fail as an
    unrelated reshape error; a local_rank outside [0, num_ranks) or a num_ranks that does
    not divide the slots would silently make no slot (or the wrong ones) local."""
    ids = jnp.asarray(routing_ids(rng, "random"))
    valid = jnp.asarray(random_valid(rng))
    table = replica_table(jnp.asarray(random_placement(rng, 16)), E)
    cases = [
        (dict(valid=valid[:1]), rf"valid has shape \(1,\); allowed: \[{T}\]"),
        (dict(valid=jnp.ones((T, K), bool)), rf"valid has shape \({T}, {K}\); allowed: \[{T}\]"),
        (dict(expert_ids=ids[:, 0]), rf"expert_ids has shape \({T},\); allowed: \[tokens, top_k\]"),
        (dict(local_rank=1), r"local_rank=1; allowed: \[0, num_ranks=1\)"),
        (dict(local_rank=4, num_ranks=4), r"local_rank=4; allowed: \[0, num_ranks=4\)"),
        (dict(local_rank=-1, num_ranks=4), r"local_rank=-1; allowed: \[0, num_ranks=4\)"),
        (dict(local_rank=0, num_ranks=3), "num_ranks=3; allowed: an int >= 1 that divides the 16 slots"),
        (dict(local_rank=0, num_ranks=0), "num_ranks=0; allowed: an int >= 1"),
        (dict(local_rank=0, num_ranks=4.0), "num_ranks=4.0; allowed: an int >= 1"),
    ]
    for change, needle in cases:
        args = dict(expert_ids=ids, valid=valid, table=table) | change
        with pytest.raises(ValueError, match=needle):
            choose_slots(**args)
    choose_slots(ids, valid, table, local_rank=jnp.int32(3), num_ranks=4)  # a concrete array rank passes
