"""Broken Hugging Face checkpoints (config.json, safetensors files, missing tensors) raise
errors naming the file, the key or tensor, the bad value and what is allowed."""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from wideep_jax.models import from_hf_config, from_pretrained
from wideep_jax.models.config import CheckpointError
from wideep_jax.models.loading import CheckpointNotFoundError, MissingTensorError

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _config(arch: str) -> dict:
    return json.loads((FIXTURES / f"{arch}_tiny" / "config.json").read_text())


def _copy(tmp_path: Path, arch: str = "qwen3_moe", **changes) -> Path:
    """A copy of a tiny fixture checkpoint with config.json's keys updated by ``changes``."""
    folder = tmp_path / f"{arch}_copy"
    shutil.copytree(FIXTURES / f"{arch}_tiny", folder)
    (folder / "config.json").write_text(json.dumps(_config(arch) | changes))
    return folder


def _load(folder: Path):
    return from_pretrained(folder, dtype=jnp.float32)


def test_layers_missing_from_the_weights_are_listed_with_the_folder_and_cause(tmp_path):
    # ValueErrors; KeyError and FileNotFoundError too, as these cases raised before.
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(MissingTensorError, CheckpointError) and issubclass(MissingTensorError, KeyError)
    assert issubclass(CheckpointNotFoundError, CheckpointError) and issubclass(CheckpointNotFoundError,
                                                                               FileNotFoundError)
    folder = _copy(tmp_path, num_hidden_layers=5)  # the weights hold layers 0..2
    names = [f"'model.layers.{i}.{n}.weight'" for i in (3, 4) for n in ("input_layernorm", "post_attention_layernorm")]
    with pytest.raises(MissingTensorError, match=re.escape(
            f"{folder}: checkpoint has no tensor {', '.join(names)} (4 missing); likely cause: config.json "
            "num_hidden_layers=5, but the weights hold only layers 0..2 (layers 3..4 absent)")):
        _load(folder)


def _without(tmp_path: Path, name: str, index: dict | None = None) -> Path:
    """The qwen3_moe fixture without tensor ``name`` (and with ``index`` as its index file)."""
    from safetensors.numpy import load_file, save_file

    folder = _copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_missing_tensor_names_the_folder_and_likely_cause(tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    folder = _without(tmp_path / "a", name)
    with pytest.raises(MissingTensorError, match=re.escape(
            f"{folder}: checkpoint has no tensor {name!r} (1 missing); likely cause: config.json does not match")):
        _load(folder)
    # The index puts it in a shard the folder lacks (an interrupted download).
    shard = "model-00002-of-00002.safetensors"
    from safetensors.numpy import load_file

    rest = {n: "model.safetensors" for n in load_file(_copy(tmp_path / "src") / "model.safetensors") if n != name}
    folder = _without(tmp_path / "b", name, {"metadata": {}, "weight_map": {**rest, name: shard}})
    with pytest.raises(MissingTensorError, match=re.escape(
            f"{name!r} (1 missing); likely cause: model.safetensors.index.json puts them in [{shard!r}], "
            "which the folder lacks")):
        _load(folder)


@pytest.mark.parametrize("text, message", [
    ("[1]", ": holds a list ([1]); expected a JSON object of model settings"),
    ('"qwen3_moe"', ": holds a str (qwen3_moe); expected a JSON object"),
    ("{not json", ": not valid JSON (Expecting property name"),
    (b"\xff\xfe{}", ": not valid JSON ("),
])
def test_config_json_that_is_not_a_json_object(tmp_path, text, message):
    folder = _copy(tmp_path)
    file = folder / "config.json"
    file.write_bytes(text) if isinstance(text, bytes) else file.write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(f"{file}{message}")):
        _load(folder)


def test_from_hf_config_of_a_list():
    with pytest.raises(CheckpointError, match=re.escape("config.json holds a list ([1]); allowed: a JSON object")):
        from_hf_config([1])
    with pytest.raises(CheckpointError, match=re.escape("text_config=[1]; allowed: a JSON object")):
        from_hf_config({"model_type": "llama4", "text_config": [1]})


def test_missing_config_json_or_folder(tmp_path):
    folder = _copy(tmp_path)
    (folder / "config.json").unlink()
    expected = "expected a Hugging Face checkpoint folder with config.json (a JSON object) and *.safetensors files"
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{folder / 'config.json'}: no such file; {expected}")):
        _load(folder)
    (folder / "config.json").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{folder / 'config.json'}: not a file; {expected}")):
        _load(folder)
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'}: no such folder")):
        _load(tmp_path / "nowhere")
    folder = _copy(tmp_path / "b")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{folder}: no *.safetensors files; {expected}")):
        _load(folder)


def test_rope_type_without_its_keys():
    config = _config("llama4_text")
    scaling = {k: v for k, v in config.pop("rope_parameters").items() if k != "factor"}
    with pytest.raises(CheckpointError, match=re.escape(
            "config.json: missing key rope_scaling.factor (rope_type='llama3'); allowed: rope type 'llama3' with "
            "all of ['factor', 'original_max_position_embeddings', 'low_freq_factor', 'high_freq_factor']")):
        from_hf_config(config | {"rope_scaling": scaling})
    with pytest.raises(CheckpointError, match=re.escape("config.json: rope_scaling.factor='8'; allowed: a finite "
                                                        "number")):
        from_hf_config(config | {"rope_scaling": scaling | {"factor": "8"}})
    with pytest.raises(CheckpointError, match=re.escape(
            "config.json: rope_scaling.original_max_position_embeddings=16.5; allowed: an int >= 1")):
        from_hf_config(config | {"rope_scaling": scaling | {"factor": 8.0, "original_max_position_embeddings": 16.5}})
    with pytest.raises(CheckpointError, match=re.escape("config.json: rope_scaling=[8]; allowed: a JSON object")):
        from_hf_config(config | {"rope_scaling": [8]})


def _write_weights(folder: Path, data: bytes) -> Path:
    file = folder / "model.safetensors"
    file.write_bytes(data)
    return file


def test_safetensors_files_that_are_empty_or_corrupt(tmp_path):
    folder = _copy(tmp_path)
    original = (folder / "model.safetensors").read_bytes()
    layout = "expected an 8-byte header length, that many bytes of JSON header, then the tensor data"
    file = _write_weights(folder, b"")
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: 0 bytes; not a safetensors file (truncated or "
                                                        f"corrupt?): {layout}")):
        _load(folder)
    # Garbage: its first 8 bytes read as a header length far past the file's end.
    _write_weights(folder, struct.pack("<Q", 2**40) + b"\x00" * 56)
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: 64 bytes and a header length of {2**40}; "
                                                        "not a safetensors file")):
        _load(folder)
    _write_weights(folder, struct.pack("<Q", 9) + b"not json!")
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: safetensors header is not valid JSON (")):
        _load(folder)
    _write_weights(folder, struct.pack("<Q", 3) + b"[1]")
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: safetensors header is a list; expected a JSON")):
        _load(folder)
    # Truncated (a partial download): tensor data past the file's end.
    _write_weights(folder, original[:len(original) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: tensor '") + r".*'data_offsets'.*"
                       + re.escape("; expected dtype, shape (ints >= 0) and data_offsets [begin, end] within the "
                                   "file's")):
        _load(folder)


def test_a_tensor_whose_offsets_disagree_with_its_shape(tmp_path):
    """data_offsets too short for dtype x shape would read the next tensor's bytes."""
    folder = _copy(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] // 2]  # same offsets, half the elements
    text = json.dumps(header).encode()
    file = _write_weights(folder, struct.pack("<Q", len(text)) + text + data[8 + size:])
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: tensor {name!r}: data_offsets") + ".*"
                       + re.escape("bytes; its dtype F32 and shape [24] need 96")):
        _load(folder)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", 48.7), ("hidden_size", "abc"), ("hidden_size", -48), ("hidden_size", 0), ("hidden_size", True),
    ("num_hidden_layers", "3"), ("num_experts_per_tok", 2.5), ("vocab_size", [96]), ("decoder_sparse_step", 0),
    ("head_dim", 16.5), ("num_local_experts", -1),
])
def test_integer_keys_must_be_ints(tmp_path, key, value):
    message = re.escape(f"config.json: {key}={value!r}; allowed: an int >= ")
    with pytest.raises(CheckpointError, match=message):
        from_hf_config(_config("qwen3_moe") | {key: value})
    if key == "hidden_size":  # from the folder too, before anything is read
        with pytest.raises(CheckpointError, match=message):
            _load(_copy(tmp_path, hidden_size=value))


@pytest.mark.parametrize("arch, key, value", [
    ("deepseek_v3", "q_lora_rank", 1.5), ("deepseek_v3", "n_routed_experts", "8"),
    ("deepseek_v3", "first_k_dense_replace", -1), ("llama4_text", "attention_chunk_size", 2.5),
    ("mixtral", "intermediate_size", 64.5),
])
def test_integer_keys_of_each_architecture(arch, key, value):
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {key}={value!r}; allowed: an int >= ")):
        from_hf_config(_config(arch) | {key: value})


def test_an_integral_float_reads_as_its_int_a_fraction_is_an_error(tmp_path):
    """48.0 (as some exporters write) is read as 48, exactly; 48.7 is not truncated to it."""
    with pytest.raises(CheckpointError, match=re.escape("config.json: hidden_size=48.7; allowed: an int >= 1")):
        _load(_copy(tmp_path / "a", hidden_size=48.7))
    cfg = from_hf_config(_config("qwen3_moe") | {"hidden_size": 48.0, "num_hidden_layers": 3.0})
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (48, 3) and type(cfg.hidden_size) is int
    assert _load(_copy(tmp_path / "b", hidden_size=48.0)).embed.get_value().shape == (96, 48)


@pytest.mark.parametrize("arch, key, value", [
    ("qwen3_moe", "mlp_only_layers", "1"), ("qwen3_moe", "mlp_only_layers", 1),
    ("qwen3_moe", "mlp_only_layers", [3]), ("qwen3_moe", "mlp_only_layers", [-1]),
    ("qwen3_moe", "mlp_only_layers", ["1"]), ("qwen3_moe", "mlp_only_layers", [True]),
    ("llama4_text", "moe_layers", "13"), ("llama4_text", "moe_layers", [1, 4]),
])
def test_layer_lists_hold_layer_indices(arch, key, value):
    layers = _config(arch)["num_hidden_layers"]
    with pytest.raises(CheckpointError, match=re.escape(
            f"config.json: {key}={value!r}; allowed: a list of layer indices (ints) in "
            f"[0, num_hidden_layers={layers})")):
        from_hf_config(_config(arch) | {key: value})
    assert from_hf_config(_config("qwen3_moe") | {"mlp_only_layers": [1.0]}).moe_layers == (0, 2)


@pytest.mark.parametrize("arch, key, value", [
    ("qwen3_moe", "tie_word_embeddings", "false"), ("qwen3_moe", "norm_topk_prob", "false"),
    ("qwen3_moe", "use_sliding_window", "false"), ("mixtral", "tie_word_embeddings", 0),
    ("deepseek_v3", "norm_topk_prob", 1), ("deepseek_v3", "rope_interleave", "true"),
    ("llama4_text", "attention_bias", "false"), ("llama4_text", "use_qk_norm", "false"),
    ("llama4_text", "attn_temperature_tuning", [True]),
])
def test_flags_must_be_true_or_false(arch, key, value):
    """bool("false") is True: a flag written as a string (or 0/1) is an error, not read as true."""
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {key}={value!r}; allowed: true or false")):
        from_hf_config(_config(arch) | {key: value})
    assert getattr(from_hf_config(_config(arch) | {key: False}), key, False) is False


def test_no_rope_layers_hold_0_or_1():
    config = _config("llama4_text")
    flags = ["1", "0"] * (config["num_hidden_layers"] // 2)  # "0" would be truthy: a RoPE layer
    with pytest.raises(CheckpointError, match=re.escape(
            f"config.json: no_rope_layers={flags!r}; allowed: a list of 1 (RoPE) or 0 (NoPE), one per layer")):
        from_hf_config(config | {"no_rope_layers": flags})


def _rope_case(arch: str, section: str, **changes) -> dict:
    """The fixture's rope keys, moved to ``section``, with ``changes``."""
    config = _config(arch)
    return config | {"rope_parameters": None, section: config["rope_parameters"] | changes}


@pytest.mark.parametrize("arch, section, key, value, allowed", [
    ("deepseek_v3", "rope_parameters", "beta_fast", "32", "a finite number"),
    ("deepseek_v3", "rope_scaling", "beta_slow", [1], "a finite number"),
    ("deepseek_v3", "rope_scaling", "mscale", "abc", "a finite number"),
    ("deepseek_v3", "rope_scaling", "mscale_all_dim", True, "a finite number"),
    ("deepseek_v3", "rope_scaling", "beta_fast", 0, "a finite number > 0"),
    ("deepseek_v3", "rope_scaling", "beta_slow", -1.0, "a finite number > 0"),
    ("deepseek_v3", "rope_scaling", "factor", 0.0, "a finite number > 0"),
    ("deepseek_v3", "rope_scaling", "truncate", "false", "true or false"),
    ("llama4_text", "rope_scaling", "low_freq_factor", 0, "a finite number > 0"),
    ("llama4_text", "rope_parameters", "high_freq_factor", -4.0, "a finite number > 0"),
    ("llama4_text", "rope_scaling", "factor", -8.0, "a finite number > 0"),
    ("llama4_text", "rope_scaling", "rope_theta", 0.0, "a finite number > 0"),
])
def test_rope_numbers_are_checked(arch, section, key, value, allowed):
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {section}.{key}={value!r}; allowed: {allowed}")):
        from_hf_config(_rope_case(arch, section, **{key: value}))
    # null: the key's default (as before), for the keys that have one
    if key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        assert from_hf_config(_rope_case(arch, section, **{key: None})).rope.kind == "yarn"


@pytest.mark.parametrize("value", [["fp8"], "fp8", 1])
def test_quantization_config_must_be_an_object(tmp_path, value):
    with pytest.raises(CheckpointError, match=re.escape(
            f"config.json: quantization_config={value!r}; allowed: a JSON object or null")):
        _load(_copy(tmp_path, quantization_config=value))


@pytest.mark.parametrize("arch, changes, message", [
    ("qwen3_moe", {"num_key_value_heads": 3}, "num_key_value_heads=3 with num_attention_heads=4; allowed: a "
                                              "divisor of num_attention_heads"),
    ("mixtral", {"num_key_value_heads": 8}, "num_key_value_heads=8 with num_attention_heads=4; allowed: a "
                                            "divisor of num_attention_heads"),
    ("qwen3_moe", {"head_dim": None, "hidden_size": 50}, "hidden_size=50 with num_attention_heads=4 and no "
                                                         "head_dim; allowed: a multiple of num_attention_heads, or "
                                                         "head_dim given"),
])
def test_attention_heads_must_split_evenly(arch, changes, message):
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
        from_hf_config(_config(arch) | changes)


def test_head_rules_keep_real_layouts():
    # Qwen3: an explicit head_dim unlike hidden_size / heads (16, not 48 / 4).
    assert from_hf_config(_config("qwen3_moe")).head_dim == 16
    assert from_hf_config(_config("qwen3_moe") | {"head_dim": None}).head_dim == 12
    # DeepSeek's MLA has its own head dims and no kv head groups.
    cfg = from_hf_config(_config("deepseek_v3") | {"num_key_value_heads": 3, "head_dim": None, "hidden_size": 50})
    assert cfg.mla is not None and cfg.head_dim == cfg.mla.qk_rope_head_dim


@pytest.mark.parametrize("arch, key, value, allowed", [
    ("qwen3_moe", "model_type", "llama", "is not supported; allowed: ('qwen3_moe', 'mixtral', 'deepseek_v3', "
                                         "'llama4_text', 'llama4')"),
    ("qwen3_moe", "model_type", None, "is not supported; allowed: ('qwen3_moe',"),
    ("mixtral", "hidden_act", "gelu", "is not supported; allowed: 'silu'"),
    ("llama4_text", "hidden_act", ["silu"], "is not supported; allowed: 'silu'"),
    ("deepseek_v3", "topk_method", "greedy", "is not supported; allowed: 'noaux_tc'"),
    ("deepseek_v3", "scoring_func", "softmax", "is not supported; allowed: 'sigmoid'"),
])
def test_unsupported_architecture_settings(tmp_path, arch, key, value, allowed):
    message = re.escape(f"config.json: {key}={value!r} {allowed}")
    with pytest.raises(CheckpointError, match=message):
        from_hf_config(_config(arch) | {key: value})
    if arch == "qwen3_moe":  # from the folder too, before anything is read
        with pytest.raises(CheckpointError, match=message):
            _load(_copy(tmp_path, **{key: value}))


def test_null_architecture_settings_take_their_defaults():
    for arch, key in (("mixtral", "hidden_act"), ("deepseek_v3", "topk_method"), ("deepseek_v3", "scoring_func")):
        assert from_hf_config(_config(arch) | {key: None}) == from_hf_config(_config(arch))


@pytest.mark.parametrize("key, value, allowed", [
    ("eos_token_id", "7", "an int token id, a list of them, or null"),
    ("eos_token_id", [7, 1.5], "an int token id, a list of them, or null"),
    ("eos_token_id", True, "an int token id, a list of them, or null"),
    ("pad_token_id", "0", "an int token id or null"),
    ("pad_token_id", [0], "an int token id or null"),
])
def test_token_ids(key, value, allowed):
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {key}={value!r}; allowed: {allowed}")):
        from_hf_config(_config("qwen3_moe") | {key: value})


@pytest.mark.parametrize("changes, message", [
    ({"no_rope_layers": [1, 0]}, "no_rope_layers=[1, 0] has 2 entries; allowed: one per layer (num_hidden_layers=4)"),
    ({"layer_types": 3}, "layer_types=3; allowed: a list of 4 entries (num_hidden_layers), each one of "
                         "('chunked_attention', 'full_attention')"),
    ({"layer_types": "full_attention"}, "layer_types='full_attention'; allowed: a list of 4 entries"),
    ({"layer_types": [["full_attention"]] * 4}, "layer_types=[['full_attention'], "),
    ({"layer_types": ["sliding_attention"] * 4}, "layer_types=['sliding_attention', "),
    ({"layer_types": ["full_attention"] * 3}, "layer_types=['full_attention', 'full_attention', 'full_attention']; "
                                              "allowed: a list of 4 entries"),
    ({"attention_chunk_size": None}, "attention_chunk_size=None (missing) with chunked_attention layers [0, 1, 2] "
                                     "in layer_types; allowed: an int >= 1, or layer_types without chunked_attention"),
    ({"floor_scale": 0}, "floor_scale=0; allowed: a finite number > 0"),
])
def test_llama4_layer_settings(changes, message):
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
        from_hf_config(_config("llama4_text") | changes)
    config = _config("llama4_text")  # multimodal: the text model's keys, under text_config
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
        from_hf_config({"model_type": "llama4", "text_config": config | changes})


@pytest.mark.parametrize("arch, section, changes, message", [
    ("llama4_text", "rope_scaling", {"rope_type": "dynamic"}, "rope_scaling.rope_type='dynamic' is not supported; "
                                                              "allowed: 'default', 'yarn', 'llama3'"),
    ("llama4_text", "rope_parameters", {"rope_type": ["llama3"]}, "rope_parameters.rope_type=['llama3'] is not "
                                                                  "supported"),
    ("llama4_text", "rope_scaling", {"rope_type": None, "type": {"llama3": 1}}, "rope_scaling.type={'llama3': 1} is "
                                                                                "not supported"),
    ("deepseek_v3", "rope_scaling", {"attention_factor": 1.5}, "rope_scaling.attention_factor=1.5 is not supported "
                                                               "for yarn; allowed: null"),
    ("deepseek_v3", "rope_parameters", {"truncate": False}, "rope_parameters.truncate=false is not supported for "
                                                            "yarn; allowed: true"),
])
def test_rope_types(arch, section, changes, message):
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
        from_hf_config(_rope_case(arch, section, **changes))


def test_rope_type_under_its_old_key_or_null():
    config = _config("llama4_text")
    rope = config["rope_parameters"]
    old = {k: v for k, v in rope.items() if k != "rope_type"} | {"type": "llama3"}
    assert from_hf_config(config | {"rope_parameters": old}) == from_hf_config(config)
    assert from_hf_config(config | {"rope_parameters": {"rope_type": None, "rope_theta": 7.0}}).rope.kind == "default"


@pytest.mark.parametrize("arch, changes, message", [
    ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok=9 with num_local_experts=8; allowed: an int "
                                              "in [1, num_local_experts]"),
    ("qwen3_moe", {"num_experts": 1}, "num_experts_per_tok=2 with num_experts=1; allowed"),  # num_experts wins
    ("mixtral", {"num_experts_per_tok": 7}, "num_experts_per_tok=7 with num_local_experts=6; allowed: an int in "
                                            "[1, num_local_experts]"),
    ("llama4_text", {"num_experts_per_tok": 7}, "num_experts_per_tok=7 with num_local_experts=6; allowed"),
    ("deepseek_v3", {"n_group": 3}, "n_group=3 with n_routed_experts=16; allowed: a divisor of n_routed_experts"),
    ("deepseek_v3", {"n_group": 16, "topk_group": 2}, "n_group=16 with n_routed_experts=16 gives groups of 1 expert; "
                                                      "allowed: n_group=1 or groups of >= 2 experts"),
    ("deepseek_v3", {"topk_group": 5}, "topk_group=5 with n_group=4; allowed: an int in [1, n_group]"),
    ("deepseek_v3", {"topk_group": 1, "num_experts_per_tok": 5}, "num_experts_per_tok=5 with topk_group=1 of "
                                                                 "n_group=4 groups of 4 experts; allowed: <= "
                                                                 "topk_group * (n_routed_experts // n_group) = 4"),
    ("deepseek_v3", {"routed_scaling_factor": 0}, "routed_scaling_factor=0; allowed: a finite number > 0"),
])
def test_moe_keys_must_agree(tmp_path, arch, changes, message):
    """Checked when config.json is read, naming its keys (not the MoE layer's fields, later)."""
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
        from_hf_config(_config(arch) | changes)
    if arch == "qwen3_moe":
        with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
            _load(_copy(tmp_path, **changes))


def test_moe_key_checks_keep_dense_models():
    # Qwen3 with no experts: every layer dense, num_experts_per_tok unused.
    assert from_hf_config(_config("qwen3_moe") | {"num_experts": 0, "num_experts_per_tok": 9}).moe_layers == ()


@pytest.mark.parametrize("dtype", [jnp.int32, "float33", "int8"])
def test_dtype_argument(tmp_path, dtype):
    message = re.escape(f"dtype={dtype!r}: allowed: a floating dtype (e.g. jnp.bfloat16, jnp.float32)")
    with pytest.raises(ValueError, match=message) as err:
        from_hf_config(_config("qwen3_moe"), dtype=dtype)
    assert not isinstance(err.value, CheckpointError)  # the caller's argument, not the checkpoint
    with pytest.raises(ValueError, match=message):
        from_pretrained(FIXTURES / "qwen3_moe_tiny", dtype=dtype)


def test_from_pretrained_arguments():
    folder = FIXTURES / "qwen3_moe_tiny"
    with pytest.raises(TypeError, match=re.escape("path=None: allowed: a checkpoint folder (a str or os.PathLike)")):
        from_pretrained(None)
    with pytest.raises(TypeError, match=re.escape("moe_config={'backend': 'WIDEEP'}: allowed: a MoEConfig (e.g. "
                                                  "from load_moe_config) or None")):
        from_pretrained(folder, moe_config={"backend": "WIDEEP"})
    with pytest.raises(TypeError, match=re.escape("mesh='ep': allowed: a jax.sharding.Mesh or None")):
        from_pretrained(folder, mesh="ep")


def _with_tensors(tmp_path: Path, arch: str = "qwen3_moe", **tensors) -> Path:
    """A copy of a fixture with ``tensors`` (name -> array) replaced or added."""
    from safetensors.numpy import load_file, save_file

    folder = _copy(tmp_path, arch)
    weights = load_file(folder / "model.safetensors") | tensors
    save_file(weights, folder / "model.safetensors")
    return folder


def test_a_tensor_of_an_unsupported_dtype(tmp_path):
    import numpy as np

    folder = _with_tensors(tmp_path, **{"model.norm.weight": np.ones(48, np.int8)})
    with pytest.raises(CheckpointError, match=re.escape(
            f"{folder / 'model.safetensors'}: tensor 'model.norm.weight': dtype 'I8' is not supported; allowed: "
            "['BF16', 'F16', 'F32', 'F64', 'F8_E4M3', 'F8_E5M2', 'I32', 'I64']")):
        _load(folder)


@pytest.mark.parametrize("value", [None, 1.0])
def test_num_nextn_predict_layers_null_or_integral(tmp_path, value):
    import numpy as np

    # The fixture's layer 3 tensor is read as DeepSeek-V3's one MTP layer (null: the default 1).
    extra = {"model.layers.3.enorm.weight": np.ones(48, np.float32)}
    _load(_with_tensors(tmp_path / "a", "deepseek_v3", **extra))
    folder = _with_tensors(tmp_path / "b", "deepseek_v3", **extra)
    (folder / "config.json").write_text(json.dumps(_config("deepseek_v3") | {"num_nextn_predict_layers": value}))
    _load(folder)


def test_num_nextn_predict_layers_is_checked_before_any_tensor(tmp_path):
    folder = _copy(tmp_path, "deepseek_v3", num_nextn_predict_layers=1.5)
    (folder / "model.safetensors").write_bytes(b"")  # would be an error of its own, if read
    with pytest.raises(CheckpointError, match=re.escape(
            "config.json: num_nextn_predict_layers=1.5; allowed: an int >= 0")):
        _load(folder)


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "awq"}, "quantization_config.quant_method='awq' is not supported; allowed: ['fp8']"),
    ({"quant_method": "fp8", "fmt": "e2m1"}, "quantization_config.fmt='e2m1' is not supported; allowed: "
                                             "['e4m3', 'e5m2']"),
    ({"quant_method": "fp8", "fmt": ["e4m3"]}, "quantization_config.fmt=['e4m3'] is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [True, True]}, "quantization_config.weight_block_size=[True, True]; "
                                                                 "allowed: two ints >= 1 (rows, columns), e.g. "
                                                                 "[128, 128]"),
    ({"quant_method": "fp8", "weight_block_size": "128"}, "quantization_config.weight_block_size='128'; allowed"),
    ({"quant_method": "fp8", "weight_block_size": [128, 0]}, "quantization_config.weight_block_size=[128, 0]; "),
])
def test_quantization_config_keys(tmp_path, quant, message):
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
        _load(_copy(tmp_path, quantization_config=quant))


def test_quantization_config_null_keys_and_integral_block_sizes():
    from wideep_jax.models.loading import _block_size

    fp8 = {"quant_method": "fp8"}
    assert _block_size({"quantization_config": fp8 | {"fmt": None, "weight_block_size": None}}) == (128, 128)
    block = _block_size({"quantization_config": fp8 | {"weight_block_size": [32.0, 16]}})
    assert block == (32, 16) and all(type(b) is int for b in block)


@pytest.mark.parametrize("value, tuned", [(4, True), (0, False), (True, True), (False, False)])
def test_llama4_attn_temperature_tuning_as_published(value, tuned):
    """Meta's Llama 4 Scout/Maverick configs write ``attn_temperature_tuning: 4``
    (transformers only tests it for truth); it was refused as 'allowed: true or false'.
    Strings, floats, negative ints and lists are still refused."""
    assert from_hf_config(_config("llama4_text") | {"attn_temperature_tuning": value}).attn_temperature_tuning is tuned
    for bad in ("4", 4.0, -1, [True]):
        with pytest.raises(CheckpointError, match=re.escape(f"attn_temperature_tuning={bad!r}; allowed: true or false")):
            from_hf_config(_config("llama4_text") | {"attn_temperature_tuning": bad})


def test_only_the_checkpoints_files_are_read(tmp_path):
    """As transformers: the shards model.safetensors.index.json names, else model.safetensors.
    Mistral's repos ship consolidated*.safetensors beside the HF files (same weights, other
    names), and a PEFT adapter or a stale shard may sit in the folder: reading every
    *.safetensors file refused such a folder ('checkpoint tensors not used')."""
    from safetensors.numpy import load_file, save_file

    from wideep_jax.models.loading import checkpoint_files

    folder = _copy(tmp_path / "plain")
    want = np.asarray(_load(folder).embed[...])
    save_file({"tok_embeddings.weight": np.ones((4, 4), np.float32)}, folder / "consolidated.safetensors")
    save_file({"base_model.lora_A.weight": np.ones((2, 2), np.float32)}, folder / "adapter_model.safetensors")
    assert checkpoint_files(folder) == [folder / "model.safetensors"]
    np.testing.assert_array_equal(np.asarray(_load(folder).embed[...]), want)
    # Sharded: the index's shards only (the consolidated file still ignored).
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, folder / shard)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: shard for shard, part in halves.items() for n in part}}))
    assert checkpoint_files(folder) == [folder / shard for shard in halves]
    np.testing.assert_array_equal(np.asarray(_load(folder).embed[...]), want)
    # An index whose shards are all absent, or that is not an index, says so.
    for shard in halves:
        (folder / shard).rename(folder / f"{shard}.part")
    with pytest.raises(CheckpointNotFoundError, match="names 2 shard files .* none of which is in the folder"):
        _load(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a safetensors index"):
        _load(folder)
