"""Review tests for the EPLB placement algorithm: loads the checked entry point cannot
refuse (under jit) or that JAX would silently change (int64 counts)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from wideep_jax.eplb import algorithm as alg
from wideep_jax.eplb import algorithm_reference as ref
from test_eplb_algorithm import _check_valid


def test_int64_counts_above_int32_keep_their_value():
    # Token counts summed over a long window: 3e9 > 2**31 - 1. jnp.asarray with x64
    # off wrapped it to a negative int32, so the hottest expert counted as zero load.
    load = np.array([3_000_000_000, 1, 2, 3, 4, 5, 6, 7], np.int64)
    got = np.asarray(alg.compute_placement(load, 12, 4))
    _check_valid(got, 8, 12, 4)
    assert (got == 0).sum() == 4  # the hot expert gets a replica on every rank
    np.testing.assert_array_equal(got, np.asarray(alg.compute_placement(load.astype(np.float32), 12, 4)))
    np.testing.assert_array_equal(got, ref.compute_placement(load, 12, 4))
    rows = np.stack([load, load[::-1]])  # 2-D, and a Python list of ints
    np.testing.assert_array_equal(np.asarray(alg.compute_placement(rows.tolist(), 12, 4)),
                                  ref.compute_placement(rows, 12, 4))


# (E, S, ep, nodes); each case also runs migration-aware with a random current placement.
SHAPES = [(8, 12, 4, 1), (8, 8, 4, 1), (16, 24, 8, 2)]


@pytest.mark.parametrize("num_experts,num_slots,ep_size,num_nodes", SHAPES)
def test_inf_loads_under_jit_give_valid_placements(num_experts, num_slots, ep_size, num_nodes):
    # Under jit the loads cannot be checked; +inf made every rank-load comparison a tie
    # with the masked-out ranks (experts without a slot, -1 slots, duplicates).
    rng = np.random.default_rng(0)
    load = rng.random((3, num_experts)).astype(np.float32)
    load[0, 1] = np.inf
    load[1, [0, 5]] = np.inf
    load[2, :] = np.inf
    current = rng.integers(0, num_experts, (3, num_slots)).astype(np.int32)
    kw = dict(num_slots=num_slots, ep_size=ep_size, num_nodes=num_nodes)
    fresh = np.asarray(jax.jit(lambda l: alg.compute_placement(l, **kw))(load))
    moved = np.asarray(jax.jit(lambda l, c: alg.compute_placement(l, **kw, current=c, tolerance=0.1))(
        load, current))
    for placement in (fresh, moved):
        _check_valid(placement, num_experts, num_slots, ep_size, num_nodes)
    np.testing.assert_array_equal(fresh, ref.compute_placement(load, **kw))
    np.testing.assert_array_equal(moved, ref.compute_placement(load, **kw, current=current, tolerance=0.1))
    # The infinite experts dominate: same as loads of 1 for them and 0 for the rest.
    limit = np.isinf(load).astype(np.float32)
    np.testing.assert_array_equal(fresh, np.asarray(alg.compute_placement(limit, **kw)))


def test_huge_loads_under_jit_give_valid_placements():
    # Finite loads whose float32 rank sums overflow (refused outside jit): the
    # migration-aware path left a slot at -1. Found by a random search.
    load = np.array([[2.8215271732554793e+38, 2.0209559244837274e+38, 2.9574014690794943e+38,
                      1.4907430095937232e+38, 9.234121695965083e+37, 8.1147598488310715e+37,
                      1.2879679969884474e+38, 2.829347056278167e+38, 2.3630674402323616e+38,
                      3.2052792618637825e+36, 1.737239899873159e+38, 1.0038248248316259e+38,
                      3.000795278778315e+38, 9.731088394917117e+37, 2.0453962280561277e+38,
                      2.7268659224497004e+38]], np.float32)
    current = np.array([[1, 5, 4, 12, 8, 0, 11, 1, 6, 3, 3, 5, 10, 0, 2, 11, 6, 12, 6, 1, 5, 0, 12, 10]],
                       np.int32)
    kw = dict(num_slots=24, ep_size=8, num_nodes=2)
    moved = np.asarray(jax.jit(lambda l, c: alg.compute_placement(l, **kw, current=c, tolerance=0.1))(
        load, current))
    _check_valid(moved, 16, 24, 8, 2)
    np.testing.assert_array_equal(moved, ref.compute_placement(load, **kw, current=current, tolerance=0.1))
    # Scaling by a power of two is exact: the same placement as the loads scaled down.
    small = load * np.float32(2.0 ** -64)
    np.testing.assert_array_equal(moved, np.asarray(alg.compute_placement(small, **kw, current=current,
                                                                          tolerance=0.1)))
