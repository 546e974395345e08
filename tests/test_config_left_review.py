"""Review of config loading and of what MoEStats counts for ids that have no slot.

Config: ``ep_axis`` must be a usable mesh axis name; TensorRT-LLM files with YAML merge
keys load; MoE options that would be silently ignored (a ``moe_config`` under
``pytorch_backend_config``, an MoE key in other letter case or misspelt beside a legacy
key) are refused. Stats: under jit, a (token, k) pair whose expert id is outside
``[0, E)`` or whose expert has no slot is computed nowhere and counted nowhere.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_helpers import make_layer, make_spec, random_routing, random_tokens
from wideep_jax import moe_forward
from wideep_jax.config import ConfigError, ConfigWarning, MoEConfig, load_moe_config
from wideep_jax.placement import choose_slots, replica_table
from wideep_jax.routing import Routing


def raises(key: str, value: str, allowed: str):
    """pytest.raises(ConfigError) whose message names ``key``, then ``value``, then ``allowed``."""
    return pytest.raises(ConfigError, match=f"(?s){re.escape(key)}.*{re.escape(value)}.*{re.escape(allowed)}")


# --- item 1: string-valued keys ---------------------------------------------------------------

@pytest.mark.parametrize("bad", ["  ", "\t", " ep", "ep ", "ep axis", "ep\n", "0ep", "ep-1", ""])
def test_ep_axis_must_be_a_usable_mesh_axis_name(bad):
    """A whitespace-only name (or one with spaces, or not identifier-like) was accepted and
    only failed later, as 'not an axis of the mesh' or as a mesh built with that name."""
    allowed = "letters, digits and underscores, not starting with a digit"
    with raises("moe_config.ep_axis", repr(bad), allowed):
        load_moe_config({"backend": "WIDEEP", "ep_axis": bad})
    with raises("moe_config.ep_axis", repr(bad), allowed):
        MoEConfig(ep_axis=bad)


@pytest.mark.parametrize("good", ["ep", "expert", "_ep", "ep2", "EP_axis"])
def test_ep_axis_names_that_load(good):
    assert load_moe_config({"ep_axis": good}).ep_axis == good


@pytest.mark.parametrize("key, bad", [
    ("backend", "  "), ("backend", " WIDEEP"), ("backend", ""), ("alltoall_backend", " "),
    ("replica_selection", "\t"), ("expert_kernel", ""), ("load_balancer", "  "),
])
def test_other_string_keys_refuse_empty_and_whitespace(key, bad):
    """The other string-valued keys already refuse these (pinned): names are matched
    exactly (case aside), a blank path names no file."""
    with raises(f"moe_config.{key}", repr(bad), "allowed"):
        load_moe_config({key: bad})
    with raises("moe_config.load_balancer.reshard", repr(" "), "one of host, collective"):
        load_moe_config({"backend": "WIDEEP", "load_balancer": {"layer_updates_per_iter": 1, "reshard": " "}})


# --- item 3: TensorRT-LLM files ---------------------------------------------------------------

def test_yaml_merge_keys_load_as_in_tensorrt_llm(tmp_path):
    """TensorRT-LLM reads its files with yaml.safe_load, which merges `<<: *anchor`; the
    duplicate-key loader refused every merge key as invalid YAML. A key written beside the
    merge overrides the merged one (YAML's rule); a key written twice is still refused."""
    path = tmp_path / "merged.yaml"
    path.write_text("base: &base\n  backend: WIDEEP\n  max_num_tokens: 64\n"
                    "enable_attention_dp: true\n"
                    "moe_config:\n  <<: *base\n  max_num_tokens: 128\n"
                    "  load_balancer:\n    <<: {num_slots: 16}\n")
    cfg = load_moe_config(path, num_experts=8, ep_size=2)
    assert (cfg.backend, cfg.max_num_tokens, cfg.load_balancer.num_slots) == ("WIDEEP", 128, 16)
    path.write_text("x: &x {backend: WIDEEP}\nenable_attention_dp: true\n"
                    "moe_config:\n  <<: *x\n  max_num_tokens: 1\n  max_num_tokens: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'max_num_tokens' \(allowed: each key once"):
        load_moe_config(path)


@pytest.mark.parametrize("source", [
    {"enable_attention_dp": True, "pytorch_backend_config": {"moe_config": {"backend": "WIDEEP"}}},
    {"pytorch_backend_config": {"moe_config": {"backend": "WIDEEP"}}},
    {"moe_config": {"backend": "CUTLASS"}, "pytorch_backend_config": {"moe_config": {"backend": "WIDEEP"}}},
])
def test_moe_config_under_pytorch_backend_config_is_refused(source):
    """It was silently ignored: the MoE ran with the defaults (CUTLASS), not WIDEEP."""
    with raises("pytorch_backend_config.moe_config", "got a dict", "allowed: moe_config at the top level"):
        load_moe_config(source)


@pytest.mark.parametrize("source, key, near", [
    ({"enable_attention_dp": True, "MOE_CONFIG": {"backend": "WIDEEP"}}, "MOE_CONFIG", "moe_config"),
    ({"enable_attention_dp": True, "pytorch_backend_config": {"MOE_BACKEND": "WIDEEP"}},
     "pytorch_backend_config.MOE_BACKEND", "moe_backend"),
    # beside a legacy key, a misspelt one used to be ignored: the placement silently lost
    ({"moe_backend": "WIDEEP", "moe_load_balancr": {"num_slots": 16}}, "moe_load_balancr", "moe_load_balancer"),
    ({"pytorch_backend_config": {"moe_backend": "WIDEEP", "moe_max_num_token": 64}},
     "pytorch_backend_config.moe_max_num_token", "moe_max_num_tokens"),
    ({"moe_config": {"backend": "WIDEEP"}, "Moe_Load_Balancer": {"num_slots": 16}}, "Moe_Load_Balancer",
     "moe_load_balancer"),
])
def test_moe_option_in_other_case_or_misspelt_beside_others_is_refused(source, key, near):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: unknown option .*allowed: '{near}' "
                                          r"\(a misspelt MoE option would be ignored"):
        load_moe_config(source)


def test_tensorrt_llm_options_beside_moe_sections_still_load():
    """The near-miss check leaves real TensorRT-LLM options (moe_expert_parallel_size is one)
    and the engine's own keys alone."""
    source = {"moe_config": {"backend": "WIDEEP", "max_num_tokens": 9216}, "enable_attention_dp": True,
              "moe_expert_parallel_size": 4, "moe_tensor_parallel_size": 1, "max_batch_size": 8}
    assert load_moe_config(source).max_num_tokens == 9216
    legacy = {"pytorch_backend_config": {"moe_backend": "WIDEEP", "moe_max_num_tokens": 64},
              "moe_cluster_parallel_size": 1}
    assert load_moe_config(legacy) == MoEConfig(backend="WIDEEP", max_num_tokens=64)


# --- item 2: pairs with no slot are counted nowhere -------------------------------------------

E = 8


def test_choose_slots_gives_a_pair_without_a_slot_slot_minus_one():
    """An id outside [0, E) of a valid token took padding's slot 0 (>= E) or wrapped onto the
    last expert's replicas (< 0); an expert without a slot read a neighbour's replica. All
    are -1 now, no slot; padding tokens keep slot 0; good pairs still hold their expert."""
    placement = np.array([0, 1, 2, 3, 4, 5, 6, 0], np.int32)  # expert 7 has no slot
    table = replica_table(jnp.asarray(placement), E)
    ids = np.array([[E, 1], [-1, 2], [7, 0], [3, 4], [E + 5, -2]], np.int32)
    valid = np.array([True, True, True, False, True])
    got = np.asarray(jax.jit(lambda i, v: choose_slots(i, v, table, rank_offset=1))(ids, valid))
    bad = valid[:, None] & ((ids < 0) | (ids >= E) | (ids == 7))
    np.testing.assert_array_equal(got[bad], -1)
    np.testing.assert_array_equal(got[~valid], 0)
    good = valid[:, None] & ~bad
    np.testing.assert_array_equal(placement[got[good]], ids[good])
    for rank in range(2):
        local = np.asarray(choose_slots(jnp.asarray(ids), jnp.asarray(valid), table, local_rank=rank, num_ranks=2))
        np.testing.assert_array_equal(local[bad], -1)
        np.testing.assert_array_equal(placement[local[good]], ids[good])


def _expected_rank_tokens(ids: np.ndarray, keep: np.ndarray, num_ranks: int) -> np.ndarray:
    """Tokens with a pair on each rank's slots (identity placement: slot = expert)."""
    per_rank = E // num_ranks
    return np.array([int((keep & (ids // per_rank == r)).any(axis=1).sum()) for r in range(num_ranks)])


@pytest.mark.parametrize("backend, ep", [("WIDEEP", 2), ("CUTLASS", 2), ("CUTLASS", 1)])
def test_stats_count_only_pairs_that_were_computed(rng, backend, ep):
    """Under jit a pair whose id is outside [0, E) was run on a clipped id's slot (with a NaN
    weight) and counted in slot_counts and rank_tokens though no expert was routed to: the
    slot counts summed to more than the expert counts. Now it is computed nowhere: every
    statistic counts exactly the pairs given a slot, and its token is still NaN."""
    spec = make_spec(experts=E)
    layer = make_layer(spec, backend=backend, ep=ep)
    w, config, mesh = layer.weights(), layer.config, layer.mesh
    assert np.array_equal(np.asarray(w.slot_to_expert), np.arange(E))  # slot s holds expert s
    x = random_tokens(rng, 10, spec.hidden_size)
    mask = jnp.ones(10, bool).at[7].set(False)
    fwd = jax.jit(lambda x, ids, wts: moe_forward(x, w, spec=spec, config=config, mesh=mesh, token_mask=mask,
                                                  routing=Routing(ids, wts)))
    routing = random_routing(rng, 10, E, spec.top_k)
    want, _ = fwd(x, routing.ids, routing.weights)
    ids = routing.ids.at[2, 1].set(E).at[5, 0].set(-3).at[6].set(jnp.array([99, -1])).at[7, 0].set(99)
    got, stats = fwd(x, ids, routing.weights)
    ids, keep = np.asarray(ids), np.asarray(mask)[:, None] & (np.asarray(ids) >= 0) & (np.asarray(ids) < E)
    want_counts = np.bincount(ids[keep], minlength=E)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), want_counts)
    np.testing.assert_array_equal(np.asarray(stats.slot_counts), want_counts)  # slot s = expert s
    np.testing.assert_array_equal(np.asarray(stats.rank_expert_counts).sum(axis=0), want_counts)
    np.testing.assert_array_equal(np.asarray(stats.rank_tokens), _expected_rank_tokens(ids, keep, ep))
    got, want = np.asarray(got), np.asarray(want)
    assert np.isnan(got[[2, 5, 6]]).all() and (got[7] == 0).all()
    rest = [t for t in range(10) if t not in (2, 5, 6)]
    np.testing.assert_array_equal(got[rest], want[rest])


@pytest.mark.parametrize("backend", ["WIDEEP", "CUTLASS"])
def test_stats_leave_out_pairs_of_an_expert_without_a_slot(rng, backend):
    """Under jit a slot table is not checked: pairs routed to an expert it gives no slot ran
    on a neighbour's slot and were counted there. Now slot counts sum to the expert counts,
    which leave that expert out, and its tokens are NaN."""
    spec = make_spec(experts=E)
    layer = make_layer(spec, backend=backend, ep=2)
    w, config, mesh = layer.weights(), layer.config, layer.mesh
    table = np.arange(E, dtype=np.int32)
    table[3] = 0  # expert 3 has no slot, expert 0 two
    unplaced = w._replace(slot_to_expert=jax.device_put(jnp.asarray(table), w.slot_to_expert.sharding))
    x = random_tokens(rng, 16, spec.hidden_size)
    ids = jnp.asarray(np.stack([rng.choice(E, spec.top_k, replace=False) for _ in range(16)]), jnp.int32)
    ids = ids.at[0].set(jnp.array([3, 1]))
    weights = jnp.full(ids.shape, 0.5)
    got, stats = jax.jit(lambda w, ids: moe_forward(x, w, spec=spec, config=config, mesh=mesh,
                                                    routing=Routing(ids, weights)))(unplaced, ids)
    ids = np.asarray(ids)
    keep = ids != 3
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), np.bincount(ids[keep], minlength=E))
    slot_counts = np.asarray(stats.slot_counts)
    assert slot_counts.sum() == keep.sum()
    np.testing.assert_array_equal(np.bincount(table, weights=slot_counts, minlength=E).astype(int),
                                  np.bincount(ids[keep], minlength=E))
    got = np.asarray(got)
    assert np.isnan(got[(ids == 3).any(axis=1)]).all() and not np.isnan(got[keep.all(axis=1)]).any()


# --- MoE parallel sizes of an LLM-API file ------------------------------------------------------

@pytest.mark.parametrize("key", ["moe_tensor_parallel_size", "moe_cluster_parallel_size"])
def test_moe_tensor_or_cluster_parallel_size_above_one_is_said_to_be_ignored(key):
    """Experts are never split over ranks here: a size > 1 was read as nothing, silently."""
    with pytest.warns(ConfigWarning, match=f"{key}=2: experts are not split over ranks here"):
        cfg = load_moe_config({key: 2, "moe_config": {"backend": "WIDEEP"}}, num_experts=8, ep_size=4)
    assert cfg.backend == "WIDEEP"


def test_moe_expert_parallel_size_unlike_the_ep_group_is_said():
    with pytest.warns(ConfigWarning, match="moe_expert_parallel_size=8, but the EP group has 4 ranks"):
        load_moe_config({"moe_expert_parallel_size": 8, "enable_attention_dp": True}, num_experts=8, ep_size=4)


@pytest.mark.parametrize("options", [
    {"moe_expert_parallel_size": 4, "moe_tensor_parallel_size": 1, "moe_cluster_parallel_size": 1},
    {"moe_expert_parallel_size": -1, "moe_tensor_parallel_size": None},  # TensorRT-LLM's 'auto' values
    {"moe_expert_parallel_size": 8},  # no ep_size given: nothing to compare
])
def test_matching_or_auto_parallel_sizes_load_quietly(options, recwarn):
    ep_size = None if options == {"moe_expert_parallel_size": 8} else 4
    load_moe_config({**options, "moe_config": {"backend": "WIDEEP"}}, num_experts=8 if ep_size else None,
                    ep_size=ep_size)
    assert not [w for w in recwarn if issubclass(w.category, ConfigWarning)]
