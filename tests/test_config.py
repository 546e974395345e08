"""Tests for wideep_jax.config: TRT-LLM moe_config loading and validation."""
import dataclasses
import re
import runpy
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from wideep_jax.config import (
    ALLTOALL_BACKENDS,
    ONLINE_ONLY_KEYS,
    TRTLLM_LOCAL_BACKENDS,
    WIDEEP_ONLY_KEYS,
    ConfigError,
    ConfigWarning,
    LoadBalancerConfig,
    MoEConfig,
    load_moe_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
E = 256  # DeepSeek-V3 routed experts


def raises(key: str, value: str):
    """pytest.raises(ConfigError) whose message names ``key`` and then ``value``."""
    return pytest.raises(ConfigError, match=f"(?s){re.escape(key)}.*{re.escape(value)}")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- example configs -------------------------------------------------------------------------

@pytest.mark.parametrize("ep_size", [4, 36])
def test_wide_ep_offline_example(ep_size):
    cfg = load_moe_config(CONFIGS / "wide_ep.yaml", num_experts=E, ep_size=ep_size)
    assert (cfg.backend, cfg.max_num_tokens, cfg.alltoall_backend, cfg.ep_axis) == ("WIDEEP", 9216, "auto", "ep")
    lb = cfg.load_balancer
    assert lb.num_slots == 288 and lb.layer_updates_per_iter == 0 and not lb.is_online
    iga = lb.initial_global_assignments
    assert isinstance(iga, types.MappingProxyType)
    assert sorted(iga) == list(range(3, 61))
    for layer, ids in iga.items():
        assert type(layer) is int and isinstance(ids, tuple) and len(ids) == 288
        assert all(type(e) is int for e in ids)
        assert ids[:E] == tuple(range(E)) and len(set(ids[E:])) == 32 and max(ids[E:]) < 144
    s2e = cfg.slot_to_expert(7, num_experts=E, ep_size=ep_size)
    assert s2e.dtype == np.int32 and s2e.tolist() == list(iga[7])
    for rank in s2e.reshape(ep_size, -1):  # no rank holds two copies of one expert
        assert len(set(rank.tolist())) == rank.size


@pytest.mark.parametrize("ep_size", [4, 36])
def test_wide_ep_online_example(ep_size):
    cfg = load_moe_config(CONFIGS / "wide_ep_online.yaml", num_experts=E, ep_size=ep_size)
    assert cfg.backend == "WIDEEP" and cfg.max_num_tokens == 9216
    assert cfg.load_balancer == LoadBalancerConfig(num_slots=288, layer_updates_per_iter=1)
    assert cfg.load_balancer.is_online and cfg.num_slots(E) == 288


@pytest.mark.parametrize("ep_size", [4, 36])
def test_placement_file_loads_as_bare_load_balancer(ep_size):
    cfg = load_moe_config({"load_balancer": str(CONFIGS / "moe_load_balancer.yaml")}, num_experts=E, ep_size=ep_size)
    assert cfg.backend == "CUTLASS" and cfg.load_balancer.num_slots == 288


def test_example_placement_is_reproducible(tmp_path):
    script = runpy.run_path(str(CONFIGS / "make_example_placement.py"))
    script["main"]([str(tmp_path / "p.yaml")])
    assert (tmp_path / "p.yaml").read_text() == (CONFIGS / "moe_load_balancer.yaml").read_text()


# --- sources ---------------------------------------------------------------------------------

BODY = {"backend": "wideep", "max_num_tokens": 64, "load_balancer": {"num_slots": 16}}


@pytest.mark.parametrize("source", [BODY, {"moe_config": BODY, "enable_attention_dp": True, "kv_cache_config": {}}])
def test_bare_and_wrapped_mappings(source):
    cfg = load_moe_config(source, num_experts=8, ep_size=4)
    assert cfg == MoEConfig(backend="WIDEEP", max_num_tokens=64, load_balancer=LoadBalancerConfig(num_slots=16))


@pytest.mark.parametrize("wrapped", [False, True])
def test_yaml_file_bare_and_wrapped(tmp_path, wrapped):
    body = "backend: WIDEEP\nalltoall_backend: XLA\nep_axis: expert\n"
    text = "moe_config:\n" + "".join(f"  {line}\n" for line in body.splitlines()) + "use_cuda_graph: true\n" if wrapped else body
    cfg = load_moe_config(write(tmp_path / "c.yaml", text))
    assert (cfg.backend, cfg.alltoall_backend, cfg.ep_axis, cfg.load_balancer) == ("WIDEEP", "xla", "expert", None)


@pytest.mark.parametrize("source", [None, {}, {"moe_config": None}, {"moe_config": {}}])
def test_empty_source_gives_defaults(source, tmp_path):
    assert load_moe_config(source) == MoEConfig()
    assert load_moe_config(write(tmp_path / "empty.yaml", "")) == MoEConfig()
    assert MoEConfig().backend == "CUTLASS" and MoEConfig().alltoall_backend == ALLTOALL_BACKENDS[0]


def test_load_balancer_path_relative_to_config_folder(tmp_path, monkeypatch):
    write(tmp_path / "cfg" / "lb" / "p.yaml", "num_slots: 12\ninitial_global_assignments:\n  0: [0,1,2,3,4,5,6,7,0,1,2,3]\n")
    cfg_file = write(tmp_path / "cfg" / "main.yaml", "moe_config:\n  backend: WIDEEP\n  load_balancer: lb/p.yaml\n")
    monkeypatch.chdir(tmp_path)  # a different cwd must not matter
    cfg = load_moe_config(cfg_file, num_experts=8, ep_size=4)
    assert cfg.load_balancer.initial_global_assignments[0] == (0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3)
    # Relative to cwd for a mapping source.
    monkeypatch.chdir(tmp_path / "cfg")
    assert load_moe_config({"load_balancer": "lb/p.yaml"}).load_balancer.num_slots == 12


PLACEMENT_12 = "num_slots: 12\ninitial_global_assignments:\n  0: [0,1,2,3,4,5,6,7,0,1,2,3]\n"


def test_load_balancer_path_as_tensorrt_llm_opens_it(tmp_path, monkeypatch):
    """TensorRT-LLM opens the path from the current directory: a config in a subfolder
    naming ``sub/lb.yaml`` from the working directory loads."""
    write(tmp_path / "sub" / "lb.yaml", PLACEMENT_12)
    cfg_file = write(tmp_path / "sub" / "opts.yaml", "moe_config:\n  load_balancer: ./sub/lb.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_moe_config(cfg_file).load_balancer.num_slots == 12
    # The config beside its file, run from that folder: one file, found both ways.
    monkeypatch.chdir(tmp_path / "sub")
    assert load_moe_config(write(tmp_path / "sub" / "b.yaml", "load_balancer: lb.yaml\n")).load_balancer.num_slots == 12


def test_load_balancer_path_naming_two_files_or_none_is_an_error(tmp_path, monkeypatch):
    write(tmp_path / "lb.yaml", PLACEMENT_12)
    write(tmp_path / "cfg" / "lb.yaml", PLACEMENT_12.replace("12", "16", 1))
    cfg_file = write(tmp_path / "cfg" / "c.yaml", "load_balancer: lb.yaml\n")
    monkeypatch.chdir(tmp_path)
    with raises(LB, f"{tmp_path / 'lb.yaml'!s}' (from the current directory) and '{tmp_path / 'cfg' / 'lb.yaml'!s}"):
        load_moe_config(cfg_file)
    with raises(LB, f"file not found: 'other.yaml' (looked in '{tmp_path / 'other.yaml'!s}' and "
                    f"'{tmp_path / 'cfg' / 'other.yaml'!s}')"):
        load_moe_config(write(tmp_path / "cfg" / "d.yaml", "load_balancer: other.yaml\n"))
    for empty in ('""', "' '"):  # Path("") is the current directory: no file name at all
        with raises(LB, "(str); allowed: a placement file's path, a mapping, or null (no load balancer)"):
            load_moe_config(write(tmp_path / "cfg" / "e.yaml", f"load_balancer: {empty}\n"))


@pytest.mark.parametrize("nested", [False, True])
def test_legacy_llm_api_moe_options(tmp_path, monkeypatch, nested):
    """TensorRT-LLM's options before moe_config (its EPLB docs' form): top-level
    moe_load_balancer / moe_backend / moe_max_num_tokens, or under pytorch_backend_config."""
    write(tmp_path / "moe_load_balancer.yaml", PLACEMENT_12)
    legacy = "moe_backend: WIDEEP\nmoe_max_num_tokens: 64\nmoe_load_balancer: ./moe_load_balancer.yaml\n"
    text = ("enable_attention_dp: true\npytorch_backend_config:\n  use_cuda_graph: true\n"
            + "".join(f"  {line}\n" for line in legacy.splitlines()) if nested
            else "enable_attention_dp: true\nuse_cuda_graph: true\n" + legacy)
    monkeypatch.chdir(tmp_path)
    cfg = load_moe_config(write(tmp_path / "extra_llm_api_options_eplb.yaml", text), num_experts=8, ep_size=4)
    assert (cfg.backend, cfg.max_num_tokens, cfg.load_balancer.num_slots) == ("WIDEEP", 64, 12)
    assert cfg.load_balancer.initial_global_assignments[0] == (0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3)


def test_llm_api_file_without_moe_options_gives_defaults():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        assert load_moe_config({"enable_attention_dp": False, "cuda_graph_config": {}}) == MoEConfig()
        # Under attention DP, TensorRT-LLM's default backend moves tokens by all-to-all.
        assert load_moe_config({"enable_attention_dp": True, "cuda_graph_config": {}}) == MoEConfig(backend="WIDEEP")
    # The engine's max_num_tokens is not the MoE's: ignored, with a warning saying so.
    with pytest.warns(ConfigWarning, match="max_num_tokens=8192 at the top level .* moe_config.max_num_tokens"):
        cfg = load_moe_config({"enable_attention_dp": True, "max_num_tokens": 8192})
    assert cfg.max_num_tokens is None


@pytest.mark.parametrize("source, key, near", [
    ({"enable_attention_dp": True, "moe_confg": {"backend": "WIDEEP"}}, "moe_confg", "moe_config"),
    ({"cuda_graph_config": {}, "MoE_config": {}}, "MoE_config", "moe_config"),
    ({"enable_attention_dp": True, "pytorch_backend_config": {"moe_backendd": "WIDEEP"}},
     "pytorch_backend_config.moe_backendd", "moe_backend"),
    ({"kv_cache_config": {}, "moe_load_balance": "placement.yaml"}, "moe_load_balance", "moe_load_balancer"),
])
def test_misspelt_moe_section_of_an_llm_api_file_is_an_error(source, key, near):
    """Without its MoE section an LLM-API file gives the defaults, so a misspelt section
    would be silently ignored: a key one typo away from one is refused, naming both."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: unknown option .*allowed: '{near}'"):
        load_moe_config(source)


def test_bare_mapping_errors_say_how_the_file_was_read(tmp_path):
    """A mapping with no moe_config, legacy or LLM-API key is read as a bare moe_config:
    an unknown key says so, and a placement file given as the config is named as one;
    placement-file errors name the file."""
    with pytest.raises(ConfigError, match=r"unknown key 'hidden_size'.*read as a bare moe_config mapping\)$"):
        load_moe_config({"max_num_tokens": 8192, "hidden_size": 7168})
    with pytest.warns(ConfigWarning, match="max_num_tokens=8192 at the top level"):  # dtype: an LLM-API option
        assert load_moe_config({"max_num_tokens": 8192, "dtype": "bfloat16"}) == MoEConfig()
    with pytest.raises(ConfigError, match=r"unknown key 'num_slots'.*looks like a load_balancer placement file"):
        load_moe_config({"num_slots": 8, "initial_global_assignments": {0: [0, 1]}})
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "placement.yaml").write_text("num_slots: 4\ninitial_global_assignments:\n  0: [0, 1, 2, 9]\n")
    for name, message in (("empty", "the placement file is empty"), ("list", r"got \[1\] \(list\)")):
        with pytest.raises(ConfigError, match=rf"^moe_config.load_balancer: {message}.*{name}.yaml'\)$"):
            load_moe_config({"load_balancer": str(tmp_path / f"{name}.yaml")})
    with pytest.raises(ConfigError, match=r"initial_global_assignments\[0\]\[3\]: got 9 .*in the placement file "
                                          r"'.*placement.yaml', for num_experts=4, ep_size=2\)$"):
        load_moe_config({"load_balancer": str(tmp_path / "placement.yaml")}, num_experts=4, ep_size=2)


@pytest.mark.parametrize("source, key, value", [
    ({"moe_config": {"backend": "WIDEEP"}, "moe_backend": "WIDEEP"}, "moe_config and the legacy moe_backend",
     "moe_config.backend replaces moe_backend"),
    ({"moe_load_balancer": {"num_slots": 8}, "pytorch_backend_config": {"moe_load_balancer": {"num_slots": 8}}},
     "moe_load_balancer", "both at the top level and under pytorch_backend_config"),
    # errors in legacy keys name them as the file wrote them
    ({"moe_backend": "FOO"}, "moe_backend: got 'FOO'", "allowed"),
    ({"pytorch_backend_config": {"moe_backend": "WIDEP"}}, "pytorch_backend_config.moe_backend: got 'WIDEP'",
     "allowed"),
    ({"moe_max_num_tokens": 9216.0}, "moe_max_num_tokens: got 9216.0", "allowed"),
    ({"pytorch_backend_config": {"moe_load_balancer": {"num_slots": 0}}},
     "pytorch_backend_config.moe_load_balancer.num_slots: got 0", "allowed"),
    ({"moe_load_balancer": {"num_slot": 8}}, "moe_load_balancer", "unknown key 'num_slot'"),
    ({"backend": "WIDEEP", "max_tokens": 8}, "moe_config", "unknown key 'max_tokens'"),  # bare: still strict
])
def test_legacy_and_llm_api_errors(source, key, value):
    with raises(key, value) as err:
        load_moe_config(source)
    if any(k.startswith("moe_") for k in source) or "pytorch_backend_config" in source:
        assert "moe_config." not in str(err.value) or "moe_config and" in str(err.value), err.value


def test_legacy_key_names_leave_quoted_values_alone(tmp_path, monkeypatch):
    """Only key names are renamed: a path that happens to contain 'moe_config.load_balancer'
    is quoted as written."""
    monkeypatch.chdir(tmp_path)
    with raises("moe_load_balancer: file not found", "'moe_config.load_balancer.yaml'"):
        load_moe_config({"moe_load_balancer": "moe_config.load_balancer.yaml"})
    with raises("moe_load_balancer: file not found", "'/x/moe_config.max_num_tokens/lb.yaml'"):
        load_moe_config({"moe_load_balancer": "/x/moe_config.max_num_tokens/lb.yaml", "moe_max_num_tokens": 4})


def test_legacy_file_errors_name_legacy_keys_it_did_not_write():
    """A legacy file may not add moe_config: the advice names moe_load_balancer instead."""
    with raises("moe_load_balancer.num_slots is not set", "allowed: set moe_load_balancer.num_slots"):
        load_moe_config({"enable_attention_dp": True, "moe_backend": "CUTLASS"}, num_experts=6, ep_size=4)


def test_legacy_key_errors_found_by_validation_name_the_legacy_key():
    source = {"enable_attention_dp": True, "moe_backend": "WIDEEP", "moe_load_balancer": {"num_slots": 7}}
    with raises("moe_load_balancer.num_slots: got 7", "allowed: >= num_experts = 8"):
        load_moe_config(source, num_experts=8, ep_size=2)
    with raises("moe_load_balancer.num_slots is not set", "EP size 3"):
        load_moe_config({"moe_backend": "WIDEEP", "moe_load_balancer": {}}, num_experts=8, ep_size=3)


def test_string_layer_keys_become_ints():
    lb = LoadBalancerConfig(num_slots=4, initial_global_assignments={"3": [0, 1, 2, 3], 5: np.array([3, 2, 1, 0])})
    assert dict(lb.initial_global_assignments) == {3: (0, 1, 2, 3), 5: (3, 2, 1, 0)}
    with pytest.raises(TypeError):
        lb.initial_global_assignments[3] = (0, 0, 0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lb.num_slots = 8


def test_configs_are_hashable_and_comparable():
    a = MoEConfig(backend="wideep", load_balancer=LoadBalancerConfig(num_slots=4, initial_global_assignments={0: [0, 1, 2, 3]}))
    b = MoEConfig(backend="WIDEEP", load_balancer=LoadBalancerConfig(num_slots=4, initial_global_assignments={"0": (0, 1, 2, 3)}))
    c = MoEConfig(backend="WIDEEP", load_balancer=LoadBalancerConfig(num_slots=4, initial_global_assignments={0: [3, 2, 1, 0]}))
    assert a == b and hash(a) == hash(b) and a != c


# --- slot_to_expert --------------------------------------------------------------------------

def test_slot_to_expert_default_is_trtllm_placement():
    """TensorRT-LLM's default: local slot j of rank r holds expert (r * E // R + j) % E."""
    cfg = MoEConfig(load_balancer=LoadBalancerConfig(num_slots=12))
    out = cfg.slot_to_expert(None, num_experts=8, ep_size=4)
    assert out.dtype == np.int32 and out.tolist() == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 0]
    assert cfg.slot_to_expert(None, num_experts=8, ep_size=1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert MoEConfig().slot_to_expert(2, num_experts=8, ep_size=2).tolist() == list(range(8))
    wide = MoEConfig(load_balancer=LoadBalancerConfig(num_slots=288)).slot_to_expert(
        None, num_experts=256, ep_size=32)
    ranks = wide.reshape(32, 9)
    assert all(len(set(r)) == 9 for r in ranks.tolist()) and set(wide.tolist()) == set(range(256))
    assert ranks[:, 0].tolist() == [8 * r for r in range(32)]


def test_slot_to_expert_explicit_layer_and_no_fallback_for_other_layers():
    """A layer the assignments leave out is an error (TensorRT-LLM: a KeyError), not the
    default placement; no assignments, or no layer index, is the default placement."""
    ids = [7, 6, 5, 4, 3, 2, 1, 0]
    cfg = MoEConfig(load_balancer=LoadBalancerConfig(initial_global_assignments={3: ids, 5: ids}))
    assert cfg.slot_to_expert(3, num_experts=8, ep_size=2).tolist() == ids
    with pytest.raises(ConfigError, match=re.escape(
            "moe_config.load_balancer.initial_global_assignments: MoE layer 4 has no placement (it has layers "
            "[3, 5]); allowed: a placement for every MoE layer of the model, or no initial_global_assignments")):
        cfg.slot_to_expert(4, num_experts=8, ep_size=2)
    assert cfg.slot_to_expert(None, num_experts=8, ep_size=2).tolist() == list(range(8))
    for lb in (None, LoadBalancerConfig(num_slots=8), LoadBalancerConfig(initial_global_assignments={})):
        assert MoEConfig(load_balancer=lb).slot_to_expert(4, num_experts=8, ep_size=2).tolist() == list(range(8))
    with raises("layer_idx", "-1"):
        cfg.slot_to_expert(-1, num_experts=8, ep_size=2)
    with raises("moe_config.load_balancer.num_slots", "8"):  # validates first
        cfg.slot_to_expert(3, num_experts=8, ep_size=3)


def test_placement_must_cover_exactly_the_moe_layers():
    """DeepSeek-V3's MoE layers are 3..60: the shipped placement covers them; one left out,
    or a key that is no MoE layer, is refused naming the layers and what is allowed."""
    cfg = load_moe_config(CONFIGS / "wide_ep.yaml", num_experts=E, ep_size=8)
    moe_layers = range(3, 61)
    assert cfg.check_layers(moe_layers) is cfg
    assert all(cfg.slot_to_expert(layer, num_experts=E, ep_size=8).shape == (288,) for layer in moe_layers)
    iga = dict(cfg.load_balancer.initial_global_assignments)
    iga_key = "moe_config.load_balancer.initial_global_assignments: "
    allowed = ("allowed: a placement for every MoE layer of the model, or no initial_global_assignments "
               "(TensorRT-LLM's default placement on every layer)")
    cases = [
        ({k: v for k, v in iga.items() if k != 40},
         "MoE layers [40] have no placement (it has layers [3..39, 41..60], the model's MoE layers are [3..60])"),
        ({**iga, 0: iga[3], 61: iga[3]},
         "layers [0, 61] are not MoE layers of this model (it has layers [0, 3..61], the model's MoE layers are "
         "[3..60])"),
        ({k - 3: v for k, v in iga.items()},  # numbered from 0: both
         "layers [0..2] are not MoE layers of this model and MoE layers [58..60] have no placement (it has "
         "layers [0..57], the model's MoE layers are [3..60])"),
    ]
    for placement, problem in cases:
        bad = MoEConfig(load_balancer=LoadBalancerConfig(num_slots=288, initial_global_assignments=placement))
        with pytest.raises(ConfigError, match=re.escape(f"{iga_key}{problem}; {allowed}")):
            bad.check_layers(moe_layers)
    # Without a placement every layer takes the default one: nothing to check.
    for lb in (None, LoadBalancerConfig(num_slots=288)):
        assert MoEConfig(load_balancer=lb).check_layers(moe_layers).load_balancer is lb


def test_placement_of_multi_token_prediction_layers_is_dropped_with_a_warning():
    """A placement generated from a TensorRT-LLM run with MTP also places DeepSeek-V3's layer
    61 (past its 61 decoder layers; TensorRT-LLM builds it and ignores keys it does not look
    up). Given the model's layer count, such layers are dropped with a warning naming them;
    a stray key inside the model (a dense layer) is still an error, as is any without it."""
    cfg = load_moe_config(CONFIGS / "wide_ep.yaml", num_experts=E, ep_size=8)
    iga = dict(cfg.load_balancer.initial_global_assignments)
    mtp = MoEConfig(backend="WIDEEP", alltoall_backend="xla",
                    load_balancer=LoadBalancerConfig(num_slots=288, initial_global_assignments={**iga, 61: iga[3]}))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        kept = mtp.check_layers(range(3, 61), num_layers=61)
    assert [str(w.message) for w in got] == [
        "moe_config.load_balancer.initial_global_assignments: layers [61] are past the model's 61 decoder layers "
        "(TensorRT-LLM's multi-token-prediction layers, which do not run here): their placements are ignored"]
    assert got[0].filename == __file__
    assert kept.load_balancer.initial_global_assignments == cfg.load_balancer.initial_global_assignments
    assert (kept.backend, kept.alltoall_backend, kept.load_balancer.num_slots) == ("WIDEEP", "xla", 288)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # a config without such layers: unchanged, no warning
        assert cfg.check_layers(range(3, 61), num_layers=61) is cfg
    with raises("initial_global_assignments", "layers [61] are not MoE layers"):
        mtp.check_layers(range(3, 61))
    dense = MoEConfig(load_balancer=LoadBalancerConfig(num_slots=288, initial_global_assignments={**iga, 0: iga[3]}))
    with raises("initial_global_assignments", "layers [0] are not MoE layers"):
        dense.check_layers(range(3, 61), num_layers=61)


# --- errors ----------------------------------------------------------------------------------

LB = "moe_config.load_balancer"
IGA = f"{LB}.initial_global_assignments"


@pytest.mark.parametrize(
    "source, key, value",
    [
        # unknown keys, with the allowed ones listed
        ({"backend": "WIDEEP", "max_tokens": 8}, "moe_config", "'max_tokens'; allowed keys: backend, max_num_tokens"),
        ({"load_balancer": {"slots": 8}}, LB, "'slots'; allowed keys: num_slots"),
        # wrong types: bool is not an int, 9216.0 is not an int
        ({"max_num_tokens": 9216.0}, "moe_config.max_num_tokens", "9216.0 (float)"),
        ({"max_num_tokens": True}, "moe_config.max_num_tokens", "True (bool)"),
        ({"load_balancer": {"num_slots": "288"}}, f"{LB}.num_slots", "'288' (str)"),
        ({"load_balancer": {"layer_updates_per_iter": False}}, f"{LB}.layer_updates_per_iter", "False (bool)"),
        ({"load_balancer": {"layer_updates_per_iter": None}}, f"{LB}.layer_updates_per_iter", "None"),
        ({"load_balancer": {"initial_global_assignments": {0: [0, 1.0]}}}, f"{IGA}[0][1]", "1.0 (float)"),
        ({"load_balancer": {"initial_global_assignments": {0: [0, True]}}}, f"{IGA}[0][1]", "True (bool)"),
        ({"load_balancer": {"initial_global_assignments": {0: "0 1"}}}, f"{IGA}[0]", "'0 1'"),
        ({"load_balancer": {"initial_global_assignments": [[0, 1]]}}, IGA, "[[0, 1]]"),
        ({"load_balancer": [8]}, LB, "[8]"),
        ({"moe_config": [1]}, "moe_config", "[1]"),
        ({"ep_axis": ""}, "moe_config.ep_axis", "''"),
        ({"backend": None}, "moe_config.backend", "None"),
        # bad names
        ({"backend": "MOONCAKE"}, "moe_config.backend", "'MOONCAKE'"),
        ({"alltoall_backend": "mpi"}, "moe_config.alltoall_backend", "'mpi'"),
        # ranges that need no model numbers
        ({"max_num_tokens": 0}, "moe_config.max_num_tokens", "0"),
        ({"max_num_tokens": -5}, "moe_config.max_num_tokens", "-5"),
        ({"load_balancer": {"num_slots": 0}}, f"{LB}.num_slots", "0"),
        ({"load_balancer": {"layer_updates_per_iter": -1}}, f"{LB}.layer_updates_per_iter", "-1"),
        ({"load_balancer": {"initial_global_assignments": {0: [0, -1]}}}, f"{IGA}[0][1]", "-1"),
        ({"load_balancer": {"num_slots": 4, "initial_global_assignments": {2: [0, 1, 2]}}}, f"{IGA}[2]", "3 expert ids"),
        # layer keys
        ({"load_balancer": {"initial_global_assignments": {-1: [0]}}}, IGA, "-1"),
        ({"load_balancer": {"initial_global_assignments": {"abc": [0]}}}, IGA, "'abc'"),
        ({"load_balancer": {"initial_global_assignments": {"-3": [0]}}}, IGA, "'-3'"),
        ({"load_balancer": {"initial_global_assignments": {1.5: [0]}}}, IGA, "1.5"),
        ({"load_balancer": {"initial_global_assignments": {True: [0]}}}, IGA, "True"),
        ({"load_balancer": {"initial_global_assignments": {3: [0], "3": [0]}}}, IGA, "'3'"),
        # online load balancing moves WIDEEP's slots; the local backend has none to move
        ({"backend": "CUTLASS", "load_balancer": {"layer_updates_per_iter": 1}}, f"{LB}.layer_updates_per_iter",
         "1 (int); allowed: 0 with backend 'CUTLASS' (online load balancing runs on the all-to-all path"),
    ],
)
def test_schema_errors(source, key, value):
    with raises(key, value):
        load_moe_config(source)


@pytest.mark.parametrize(
    "lb, ep_size, key, value",
    [
        ({"num_slots": 6}, 2, f"{LB}.num_slots", "6 (int); allowed: >= num_experts = 8"),
        ({"num_slots": 12}, 8, f"{LB}.num_slots", "12 (int); allowed: a multiple of ep_size = 8"),
        # no slot count written: the message names what to change, not an unset key
        ({}, 3, "num_experts=8 (the slot count", f"multiple of the EP size 3; allowed: set {LB}.num_slots to a "
         "multiple of 3 that is >= 8 (e.g. 9)"),
        ({"initial_global_assignments": {1: [0, 1, 2]}}, 2, f"{IGA}[1]", "3 expert ids; allowed: exactly num_slots = 8 (one expert id per slot)"),
        # longer than num_experts: the list may want replica slots, and the message says how
        ({"initial_global_assignments": {1: [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]}}, 2, f"{IGA}[1]",
         f"10 expert ids; allowed: exactly num_slots = 8 (one expert id per slot); num_slots is not set, so it is "
         f"num_experts: set {LB}.num_slots: 10"),
        ({"initial_global_assignments": {1: [0, 1, 2, 3, 4, 5, 6, 8]}}, 2, f"{IGA}[1][7]", "8 (int); allowed: an expert id in [0, 8)"),
        ({"initial_global_assignments": {4: [0, 1, 2, 3, 4, 0, 1, 0]}}, 2, f"{IGA}[4]", "layer 4 gives no slot to experts [5, 6, 7]"),
        # online placement: at most one replica of an expert per rank, node groups of E / num_nodes experts
        ({"num_slots": 20, "layer_updates_per_iter": 1}, 2, f"{LB}.num_slots",
         "20 (int); allowed: <= num_experts * ranks per node group = 16 (here 8 experts, ep_size 2 over num_nodes 1;"),
        ({"num_nodes": 2, "num_slots": 24, "layer_updates_per_iter": 1}, 4, f"{LB}.num_slots",
         "24 (int); allowed: <= num_experts * ranks per node group = 16 (here 8 experts, ep_size 4 over num_nodes 2;"),
        ({"num_nodes": 3, "num_slots": 12, "layer_updates_per_iter": 1}, 6, f"{LB}.num_nodes",
         "3 (int); allowed: a divisor of num_experts = 8"),
    ],
)
def test_model_dependent_errors(lb, ep_size, key, value):
    source = {"backend": "WIDEEP", "load_balancer": lb}
    cfg = load_moe_config(source)  # fine without model numbers
    with raises(key, value):
        load_moe_config(source, num_experts=8, ep_size=ep_size)
    with raises(key, value):
        cfg.validate(num_experts=8, ep_size=ep_size)


def test_slot_count_without_load_balancer_names_the_fix():
    """CUTLASS on a mesh shards slots too: with no load_balancer, num_experts must divide
    over the EP ranks, and the error says so without naming a key the file lacks."""
    for source in ({"backend": "CUTLASS"}, {"backend": "WIDEEP"}):
        with raises("num_experts=6 (the slot count", "allowed: set moe_config.load_balancer.num_slots to a multiple "
                    "of 4 that is >= 6 (e.g. 8) or use an EP size that divides 6") as err:
            load_moe_config(source, num_experts=6, ep_size=4)
        # WIDEEP needs a mesh: mesh=None is advice for CUTLASS only
        assert ("or mesh=None" in str(err.value)) == (source["backend"] == "CUTLASS"), err.value
        load_moe_config(source, num_experts=6, ep_size=3)
        load_moe_config({**source, "load_balancer": {"num_slots": 8}}, num_experts=6, ep_size=4)


@pytest.mark.parametrize("num_experts, ep_size, key, value", [(0, 2, "num_experts", "0"), (8, 2.0, "ep_size", "2.0"), (None, 4, "num_experts", "None")])
def test_bad_model_numbers(num_experts, ep_size, key, value):
    with raises(key, value):
        load_moe_config({}, num_experts=num_experts, ep_size=ep_size)


def test_num_experts_alone_validates_with_one_rank():
    lb = {"num_slots": 6}
    with raises("num_slots", "6"):
        load_moe_config({"load_balancer": lb}, num_experts=8)
    assert load_moe_config({"load_balancer": lb}, num_experts=6).num_slots(6) == 6


def test_bad_source_type():
    with raises("source", "42"):
        load_moe_config(42)


def test_source_errors_use_the_given_name(tmp_path):
    """A tool's flag names the file in its errors (``name=``), in place of ``source``."""
    for source, what in ((42, "got 42"), (tmp_path / "nope.yaml", "file not found"),
                         (write(tmp_path / "list.yaml", "- 1\n"), "allowed: a mapping")):
        with pytest.raises(ConfigError) as err:
            load_moe_config(source, name="--moe-config")
        assert str(err.value).startswith("--moe-config: ") and what in str(err.value), str(err.value)


def test_missing_files(tmp_path):
    with raises("source", str(tmp_path / "nope.yaml")):
        load_moe_config(tmp_path / "nope.yaml")
    cfg = write(tmp_path / "c.yaml", "moe_config:\n  load_balancer: missing_lb.yaml\n")
    with raises(LB, str(tmp_path / "missing_lb.yaml")):
        load_moe_config(cfg)


@pytest.mark.parametrize("text", ["moe_config: [unclosed\n", "moe_config:\n  backend: A\n  backend: B\n"])
def test_invalid_yaml(tmp_path, text):
    bad = write(tmp_path / "bad.yaml", text)
    with raises("source", str(bad)):
        load_moe_config(bad)
    with raises(LB, str(bad)):
        load_moe_config({"load_balancer": str(bad)})


def test_placement_file_errors_name_the_file(tmp_path):
    lb = write(tmp_path / "lb.yaml", "num_slots: 8\ninitial_global_assignments:\n  3: [0, 1, 2]\n")
    with raises(f"{IGA}[3]", str(lb)):
        load_moe_config({"load_balancer": str(lb)})
    write(tmp_path / "lb2.yaml", "[1, 2]\n")
    with raises(LB, "[1, 2]"):
        load_moe_config(write(tmp_path / "c.yaml", "load_balancer: lb2.yaml\n"))


def test_num_nodes_is_not_checked_where_it_does_nothing():
    """Static placement ignores num_nodes (a warning says so), so num_nodes: 3 at EP 4
    loads with a warning, not an error; online, the same value is an error."""
    source = {"backend": "WIDEEP", "load_balancer": {"num_slots": 8, "num_nodes": 3}}
    with pytest.warns(ConfigWarning, match="num_nodes=3 does nothing"):
        load_moe_config(source, num_experts=8, ep_size=4)
    source["load_balancer"]["layer_updates_per_iter"] = 1
    with raises(f"{LB}.num_nodes", "3"):
        load_moe_config(source, num_experts=8, ep_size=4)


_NON_DEFAULT = {"decay": 0.5, "warmup_iters": 3, "reshard": "collective", "num_nodes": 2, "tolerance": 0.2,
                "alltoall_backend": "nccl", "replica_selection": "local_first"}


@pytest.mark.parametrize("key", ONLINE_ONLY_KEYS)
def test_online_only_keys_warn_with_static_placement(key):
    """Set away from its default while placement is static, an online-only key of ours
    does nothing: a ConfigWarning names it. Online, or at its default, no warning."""
    source = {"backend": "WIDEEP", "load_balancer": {"num_slots": 8, key: _NON_DEFAULT[key]}}
    with pytest.warns(ConfigWarning, match=rf"moe_config\.load_balancer\.{key}=.*layer_updates_per_iter = 0") as got:
        load_moe_config(source)
    assert len(got) == 1
    source["load_balancer"]["layer_updates_per_iter"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_moe_config(source)
        default = next(f.default for f in dataclasses.fields(LoadBalancerConfig) if f.name == key)
        load_moe_config({"backend": "WIDEEP", "load_balancer": {"num_slots": 8, key: default}})


@pytest.mark.parametrize("key", WIDEEP_ONLY_KEYS)
def test_wideep_only_keys_warn_with_cutlass(key):
    with pytest.warns(ConfigWarning, match=rf"moe_config\.{key}=.*backend CUTLASS"):
        MoEConfig(backend="CUTLASS", **{key: _NON_DEFAULT[key]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        MoEConfig(backend="WIDEEP", **{key: _NON_DEFAULT[key]})
        MoEConfig(backend="CUTLASS")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load_without_warnings(name):
    path = CONFIGS / name
    source = {"load_balancer": str(path)} if name == "moe_load_balancer.yaml" else path  # a placement file
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_moe_config(source)


@pytest.mark.parametrize("backend", TRTLLM_LOCAL_BACKENDS)
@pytest.mark.parametrize("attention_dp", [False, True])
def test_tensorrt_llm_kernel_backends_load_and_run_on_our_kernels(backend, attention_dp):
    """TensorRT-LLM's other backend names load (its files stay unchanged) and run on our
    kernels; all but AUTO say so with a ConfigWarning naming the value. Without attention
    DP they run the CUTLASS (all-gather) path; in an LLM-API file with enable_attention_dp
    the all-to-all path with online balancing, as TensorRT-LLM runs them since it
    deprecated WIDEEP (its communication factory picks all-to-all under attention DP)."""
    lb = {"num_slots": E, "layer_updates_per_iter": 1} if attention_dp else {"num_slots": E}
    source = {"moe_config": {"backend": backend.lower(), "max_num_tokens": 4096, "load_balancer": lb},
              "enable_attention_dp": attention_dp}
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        cfg = load_moe_config(source, num_experts=E, ep_size=4)
    runs_as = "WIDEEP" if attention_dp else "CUTLASS"
    assert cfg.backend == runs_as and cfg.max_num_tokens == 4096
    assert cfg.load_balancer.is_online == attention_dp
    messages = [str(w.message) for w in got if issubclass(w.category, ConfigWarning)]
    if backend == "AUTO":
        assert messages == []
    else:
        assert len(messages) == 1 and f"moe_config.backend='{backend.lower()}'" in messages[0]
        assert f"runs as {runs_as}" in messages[0]
    # Online balancing needs the all-to-all path: refused where the file does not ask for it,
    # naming the value the file wrote.
    with raises(f"{LB}.layer_updates_per_iter", f"with backend '{backend}'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            load_moe_config({"backend": backend, "load_balancer": {"layer_updates_per_iter": 1}})


@pytest.mark.parametrize("written", [None, "CUTLASS", "cutlass", "WIDEEP"])
def test_attention_dp_files_run_all_to_all_with_online_balancing(written):
    """A current TensorRT-LLM wide-EP file (attention DP on, CUTLASS or no backend, online
    load balancer) loads as WIDEEP without a warning; the same MoE section without attention
    DP keeps CUTLASS (all-gather), and online balancing is refused there."""
    moe = {"max_num_tokens": 9216, "load_balancer": {"num_slots": 288, "layer_updates_per_iter": 1}}
    if written is not None:
        moe["backend"] = written
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cfg = load_moe_config({"enable_attention_dp": True, "moe_config": moe}, num_experts=256, ep_size=4)
        assert cfg.backend == "WIDEEP" and cfg.load_balancer.layer_updates_per_iter == 1
        legacy = load_moe_config({"enable_attention_dp": True, "moe_backend": written or "CUTLASS"},
                                 num_experts=256, ep_size=4)
        assert legacy.backend == "WIDEEP"
        if written != "WIDEEP":
            assert load_moe_config({"enable_attention_dp": False, "moe_backend": written or "CUTLASS"}).backend == \
                "CUTLASS"
    if written != "WIDEEP":
        with raises(f"{LB}.layer_updates_per_iter", f"with backend '{written or 'CUTLASS'}'"):
            load_moe_config({"moe_config": moe})
    with raises("moe_config.backend" if written else "moe_backend", "'GEMM'"):  # checked under attention DP too
        load_moe_config({"enable_attention_dp": True, **({"moe_config": {"backend": "GEMM"}} if written
                                                         else {"moe_backend": "GEMM"})})


def test_tensorrt_llm_combine_flags():
    """disable_finalize_fusion and use_low_precision_moe_combine (TensorRT-LLM keys) load;
    the second does nothing here, so true warns; neither takes a non-bool."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        for value in (True, False):
            assert load_moe_config({"disable_finalize_fusion": value}).disable_finalize_fusion is value
        assert load_moe_config({"use_low_precision_moe_combine": False}).use_low_precision_moe_combine is False
    with pytest.warns(ConfigWarning, match="use_low_precision_moe_combine=True does nothing"):
        load_moe_config({"backend": "WIDEEP", "use_low_precision_moe_combine": True})
    for key in ("disable_finalize_fusion", "use_low_precision_moe_combine"):
        with raises(f"moe_config.{key}", "'yes'"):
            load_moe_config({key: "yes"})
        with raises(f"moe_config.{key}", "1 (int)"):
            load_moe_config({key: 1})


def test_every_config_key_is_documented_in_the_readme():
    import dataclasses
    from pathlib import Path

    from wideep_jax.config import LoadBalancerConfig, MoEConfig

    root = Path(__file__).resolve().parents[1]
    for doc in (root / "README.md", root / "configs" / "CONFIG_TABLE.md"):
        text = doc.read_text()
        for f in dataclasses.fields(MoEConfig):
            assert f"| `moe_config.{f.name}` |" in text, (doc.name, f.name)
        for f in dataclasses.fields(LoadBalancerConfig):
            assert f"| `moe_config.load_balancer.{f.name}` |" in text, (doc.name, f.name)


def test_review_loader_edges(tmp_path):
    """Found in review: a directory as config file gave an OSError text with no rule;
    ``check_layers`` of None or a str raised a TypeError from set arithmetic; a list
    shorter than num_experts was told to set num_slots to its length (0 for an empty list,
    which num_slots can never be); NumPy's bool was refused as 'got np.True_ (bool)'."""
    with pytest.raises(ConfigError, match=re.escape(f"source: cannot read {str(tmp_path)!r}: it is a directory; "
                                                    "allowed: a path to a readable YAML file")):
        load_moe_config(tmp_path)
    placed = MoEConfig(load_balancer=LoadBalancerConfig(initial_global_assignments={3: list(range(8))}))
    for cfg in (placed, MoEConfig()):
        for bad in (None, "abc", 3, [1, -1], [True]):
            with raises("moe_layers", repr(bad)):
                cfg.check_layers(bad)
        assert cfg.check_layers(range(3, 4)) is cfg and cfg.check_layers(np.array([3])) is cfg
    advice = f"set {LB}.num_slots"
    for ids in ([], [0, 1, 2]):
        with pytest.raises(ConfigError, match=re.escape(f"got a list of {len(ids)} expert ids; allowed: exactly "
                                                        "num_slots = 8 (one expert id per slot)")) as info:
            load_moe_config({"load_balancer": {"initial_global_assignments": {0: ids}}}, num_experts=8, ep_size=2)
        assert advice not in str(info.value)
    with pytest.raises(ConfigError, match=re.escape(f"{advice}: 10 for lists of this length")):
        load_moe_config({"load_balancer": {"initial_global_assignments": {0: list(range(8)) + [0, 1]}}},
                        num_experts=8, ep_size=2)
    flag = MoEConfig(disable_finalize_fusion=np.bool_(True)).disable_finalize_fusion
    assert flag is True


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path):
    """A key given twice in one mapping is an error (YAML keeps the last one silently),
    naming the key, the file, where it is and the rule."""
    path = tmp_path / "dup.yaml"
    path.write_text("moe_config:\n    backend: WIDEEP\n    load_balancer:\n        num_slots: 8\n"
                    "        num_slots: 16\n")
    with pytest.raises(ConfigError, match=r"(?s)invalid YAML in .*dup\.yaml.*duplicate key 'num_slots' "
                                          r"\(allowed: each key once per mapping\).*line 5"):
        load_moe_config(path, num_experts=8, ep_size=4)


def test_llm_api_files_with_any_tensorrt_llm_option_and_disaggregated_configs():
    """Options files whose only keys are TensorRT-LLM options this list lacked (dtype,
    gpus_per_node, kv_cache_dtype, ...) were read as bare moe_config mappings and refused
    ('unknown key'); they load with the MoE defaults. A disaggregated-serving config is
    refused with what to load instead, and its per-server section loads as an options file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        for source in ({"dtype": "bfloat16", "gpus_per_node": 4}, {"kv_cache_dtype": "fp8", "enable_min_latency": True},
                       {"context_parallel_size": 2, "cp_config": {}}, {"model": "deepseek-ai/DeepSeek-V3"}):
            assert load_moe_config(source) == MoEConfig()
        gen = {"num_instances": 1, "urls": ["gen:8001"], "router": {"type": "round_robin"}, "enable_attention_dp": True,
               "moe_config": {"backend": "CUTLASS", "load_balancer": {"num_slots": 288, "layer_updates_per_iter": 1}}}
        cfg = load_moe_config(gen, num_experts=E, ep_size=8)
        assert cfg.backend == "WIDEEP" and cfg.load_balancer.layer_updates_per_iter == 1
    disagg = {"hostname": "localhost", "port": 8000, "context_servers": {"num_instances": 1, "urls": ["ctx:8001"]},
              "generation_servers": gen}
    with raises("context_servers", "disaggregated-serving config"):
        load_moe_config(disagg)
    with raises("generation_servers", "['generation_servers']"):
        load_moe_config({"hostname": "localhost", "generation_servers": gen})
    # A bare moe_config mapping is still one: every key checked.
    with raises("moe_config", "unknown key 'load_balancr'"):
        load_moe_config({"backend": "WIDEEP", "load_balancr": {}})
