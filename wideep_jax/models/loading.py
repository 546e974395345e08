"""``from_pretrained``: a Hugging Face checkpoint folder into a `CausalLM`, tensor by tensor.

Safetensors files are memory-mapped and read one tensor at a time; a layer's
experts are gathered into its slot layout (following the layer's placement,
replicas included) and placed straight onto their devices, so host memory
stays near one layer's experts. Both expert layouts are read: the Hub's
per-expert tensors (``experts.{e}.gate_proj`` / Mixtral's ``w1, w3, w2``) and
transformers 5's fused ``experts.gate_up_proj`` / ``experts.down_proj`` (Llama 4's
fused tensors are input-major). Llama 4's multimodal checkpoints load their text
model (``language_model.``); the image tower's tensors are skipped.
FP8 block-quantized weights (DeepSeek-V3/R1's ``F8_E4M3`` tensors with a float32
``weight_scale_inv`` per 128x128 block) are dequantized as they are read.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wideep_jax.config import MoEConfig
from wideep_jax.layer import MoELayer
from wideep_jax.models.config import CheckpointError, _int, _integer, _token_id, _token_ids, from_hf_config
from wideep_jax.models.decoder import CausalLM

_FP8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, **_FP8}
_IGNORED = ("rotary_emb.inv_freq",)
_VISION = ("vision_model.", "multi_modal_projector.")  # Llama 4's image tower, unused by the decoder
# config.json's ``quantization_config`` values that we read (DeepSeek-V3/R1's).
_QUANT_METHODS, _FP8_FORMATS = ("fp8",), ("e4m3", "e5m2")
_EXPECTED = "a Hugging Face checkpoint folder with config.json (a JSON object) and *.safetensors files"


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint folder, its ``config.json`` or its ``*.safetensors`` files are missing."""


class MissingTensorError(CheckpointError, KeyError):
    """Tensors the model needs are not in the checkpoint (a KeyError too, as before)."""

    def __str__(self) -> str:  # not KeyError's quoted repr
        return str(self.args[0])


def read_config(folder: Path) -> dict:
    """``folder/config.json``, with ``generation_config.json``'s ``eos_token_id`` and
    ``pad_token_id`` over its own where that file gives them (transformers' ``generate``
    stops on those: Qwen3's lists two end tokens there, config.json one); errors name the
    file and what is expected there."""
    file = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: no such folder; expected {_EXPECTED}")
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: {'not a file' if file.exists() else 'no such file'}; "
                                      f"expected {_EXPECTED}")
    try:
        config = json.loads(file.read_bytes())
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{file}: not valid JSON ({err}); expected a JSON object of model settings") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: holds a {type(config).__name__} ({str(config)[:40]}); "
                              "expected a JSON object of model settings (model_type, hidden_size, ...)")
    return _with_generation_ids(folder, config)


def _with_generation_ids(folder: Path, config: dict) -> dict:
    file = folder / "generation_config.json"
    if not file.is_file():
        return config
    try:
        generation = json.loads(file.read_bytes())
    except ValueError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); expected a JSON object of generation "
                              "settings") from None
    if not isinstance(generation, dict):
        raise CheckpointError(f"{file}: holds a {type(generation).__name__}; expected a JSON object of generation "
                              "settings")
    ids = {k: generation[k] for k in ("eos_token_id", "pad_token_id") if generation.get(k) is not None}
    try:  # checked here, so that an error names this file
        _token_ids(ids, "eos_token_id"), _token_id(ids, "pad_token_id")
    except CheckpointError as err:
        raise CheckpointError(str(err).replace("config.json", str(file), 1)) from None
    config = config | ids
    if isinstance(config.get("text_config"), dict):  # Llama 4: the text model's ids
        config["text_config"] = config["text_config"] | ids
    return config


def _read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset of its tensor data. The file begins
    with the header's length (8 bytes, little-endian), checked against the file's size."""
    total = file.stat().st_size
    layout = "an 8-byte header length, that many bytes of JSON header, then the tensor data"
    with file.open("rb") as f:
        prefix = f.read(8)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if size is None or size > total - 8:
            found = "" if size is None else f" and a header length of {size}"
            raise CheckpointError(f"{file}: {total} bytes{found}; not a safetensors file (truncated or corrupt?): "
                                  f"expected {layout}")
        try:
            header = json.loads(f.read(size))
        except ValueError as err:
            raise CheckpointError(f"{file}: safetensors header is not valid JSON ({err}); expected {layout}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is a {type(header).__name__}; expected a JSON object")
    data = total - 8 - size
    for name, info in header.items():
        if name != "__metadata__" and not _entry_ok(info, data):
            raise CheckpointError(f"{file}: tensor {name!r}: header entry {info!r}; expected dtype, shape (ints "
                                  f">= 0) and data_offsets [begin, end] within the file's {data} data bytes")
    return header, 8 + size


def _entry_ok(info, data: int) -> bool:
    """A safetensors header entry: dtype, shape and data_offsets inside the ``data`` bytes."""
    ints = lambda values, n=None: (isinstance(values, list) and (n is None or len(values) == n)
                                   and all(type(v) is int and v >= 0 for v in values))
    return (isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape"))
            and ints(info.get("data_offsets"), 2) and info["data_offsets"][0] <= info["data_offsets"][1] <= data)


def _block_size(hf_config: dict) -> tuple[int, int]:
    """The FP8 weight block size from config.json's ``quantization_config`` ([128, 128] if absent)."""
    quant = hf_config.get("quantization_config")
    if quant is None:
        return (128, 128)
    if not isinstance(quant, dict):  # quant.get would raise a bare AttributeError
        raise CheckpointError(f"config.json: quantization_config={quant!r}; allowed: a JSON object or null")
    # null fmt / weight_block_size: their defaults, as for config.json's other keys
    method = quant.get("quant_method")
    fmt = "e4m3" if quant.get("fmt") is None else quant["fmt"]
    block = [128, 128] if quant.get("weight_block_size") is None else quant["weight_block_size"]
    if method not in _QUANT_METHODS:
        raise CheckpointError(f"config.json: quantization_config.quant_method={method!r} is not supported; "
                              f"allowed: {list(_QUANT_METHODS)}")
    if fmt not in _FP8_FORMATS:
        raise CheckpointError(f"config.json: quantization_config.fmt={fmt!r} is not supported; "
                              f"allowed: {list(_FP8_FORMATS)}")
    sizes = [_integer(b) for b in block] if isinstance(block, list) else []  # true is not a size; 128.0 is
    if len(sizes) != 2 or any(b is None or b < 1 for b in sizes):
        raise CheckpointError(f"config.json: quantization_config.weight_block_size={block!r}; allowed: two ints "
                              ">= 1 (rows, columns), e.g. [128, 128]")
    return tuple(sizes)


def _dequantize(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``weight * scale`` per block of the last two axes, one row block at a time (the memmap
    is read once, and no full-size scale is built); the last blocks may be partial."""
    rows, cols = block
    out = np.empty(weight.shape, np.float32)
    for i in range(scale.shape[-2]):
        r = slice(i * rows, (i + 1) * rows)
        per_col = np.repeat(scale[..., i, :].astype(np.float32), cols, axis=-1)[..., None, :weight.shape[-1]]
        out[..., r, :] = weight[..., r, :].astype(np.float32) * per_col
    return out


_INDEX = "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files that hold a checkpoint, as transformers picks them: the
    shards ``model.safetensors.index.json`` names (those present: the tensors of a missing
    one are reported when the model needs them), else ``model.safetensors``, else every
    ``*.safetensors`` file (a folder written by hand). Other files are not read: Mistral's
    ``consolidated*.safetensors`` beside the HF shards, a PEFT ``adapter_model.safetensors``,
    a stale shard of an older download."""
    folder = Path(folder)
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not shards or not all(isinstance(s, str) and s.endswith(".safetensors") for s in shards):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a safetensors index; allowed: a JSON object whose weight_map maps "
                                  "tensor names to the *.safetensors files of the folder") from None
        present = [folder / s for s in shards if (folder / s).is_file()]
        if not present:
            raise CheckpointNotFoundError(f"{folder}: {_INDEX} names {len(shards)} shard files ({shards[0]!r}, ...), "
                                          "none of which is in the folder (an incomplete download?)")
        return present
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


class Checkpoint:
    """Name -> lazily read NumPy array over a folder's checkpoint files (:func:`checkpoint_files`).

    FP8 tensors are returned dequantized to float32 with their ``_scale_inv`` in blocks of
    ``block`` (rows, columns); reading one marks its scale as used too.
    """

    def __init__(self, folder: Path, block: tuple[int, int] = (128, 128)):
        self.folder, self.block = Path(folder), tuple(block)
        files = checkpoint_files(self.folder)
        if not files:
            raise CheckpointNotFoundError(f"{folder}: no *.safetensors files; expected {_EXPECTED}")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for file in files:
            header, base = _read_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self._where:  # which copy to read would depend on the files' order
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is in two checkpoint files: "
                                          f"{self._where[name][0].name!r} and {file.name!r}; allowed: each "
                                          "tensor in one *.safetensors file")
                self._where[name] = (file, info, base)
        self.unused = set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor ``name`` (memory-mapped); raises naming it if missing or misshapen."""
        if name not in self._where:
            raise self.missing([name])
        file, info, base = self._where[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r}: dtype {info['dtype']!r} is not supported; "
                                  f"allowed: {sorted(_DTYPES)}")
        begin, end = info["data_offsets"]
        need = math.prod(info["shape"]) * np.dtype(_DTYPES[info["dtype"]]).itemsize
        if end - begin != need:
            raise CheckpointError(f"{file}: tensor {name!r}: data_offsets {info['data_offsets']} hold {end - begin} "
                                  f"bytes; its dtype {info['dtype']} and shape {info['shape']} need {need}")
        array = np.memmap(file, dtype=_DTYPES[info["dtype"]], mode="r", offset=base + begin,
                          shape=tuple(info["shape"])) if end > begin else np.zeros(info["shape"])
        if shape is not None and tuple(array.shape) != tuple(shape):
            raise CheckpointError(f"{file}: tensor {name!r}: shape {tuple(array.shape)}, expected {tuple(shape)} "
                                  "(from config.json's sizes)")
        if info["dtype"] in _FP8:
            array = self._dequantized(name, info["dtype"], array)
        self.unused.discard(name)
        return array

    def missing(self, names: list[str], cause: str | None = None) -> MissingTensorError:
        """The error for tensors the model needs that the checkpoint lacks: a few of their
        names, their count, the folder and ``cause`` (else the likely one)."""
        shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
        if cause is None:  # a shard the index names but the folder lacks, else a config/weights mismatch
            index = self.folder / _INDEX
            try:
                shards = sorted({json.loads(index.read_text())["weight_map"][n] for n in names})
            except (OSError, ValueError, KeyError, TypeError):
                shards = []
            absent = [shard for shard in shards if not (self.folder / shard).is_file()]
            cause = (f"{index.name} puts them in {absent}, which the folder lacks (an incomplete download?)"
                     if absent else "config.json does not match these weights (another architecture, or other "
                     "layer or expert counts), or a *.safetensors file of the checkpoint is missing")
        return MissingTensorError(f"{self.folder}: checkpoint has no tensor {shown} ({len(names)} missing); "
                                  f"likely cause: {cause}")

    def _dequantized(self, name: str, dtype: str, weight: np.ndarray) -> np.ndarray:
        scale_name = f"{name}_scale_inv"
        file = self._where[name][0]
        if scale_name not in self._where:
            raise CheckpointError(f"{file}: tensor {name!r}: dtype {dtype} without a block scale {scale_name!r} in "
                                  f"{self.folder}; allowed: FP8 weights with their scale")
        if weight.ndim < 2:
            raise CheckpointError(f"{file}: tensor {name!r}: dtype {dtype} with shape {weight.shape}; allowed: "
                                  "FP8 weights with 2 or more axes")
        rows, cols = self.block
        want = weight.shape[:-2] + (-(-weight.shape[-2] // rows), -(-weight.shape[-1] // cols))
        scale_file, scale, _ = self._where[scale_name]
        if tuple(scale["shape"]) != want:
            raise CheckpointError(f"{scale_file}: tensor {scale_name!r}: shape {tuple(scale['shape'])}, expected "
                                  f"{want} (weight {weight.shape} in blocks of {self.block}, config.json "
                                  "quantization_config.weight_block_size)")
        return _dequantize(weight, self.get(scale_name), self.block)


def _set(variable, value: np.ndarray, sharding, dtype) -> None:
    value = np.asarray(value).astype(dtype)
    expected = variable.get_value().shape  # the abstract model holds shapes only
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"internal: shape {value.shape} for a parameter of shape {expected}")
    variable.set_value(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))


def _experts(ckpt: Checkpoint, prefix: str, model_type: str, num_experts: int, hidden: int, width: int,
             dtype=np.float32):
    """(gate_up [E, H, 2I], down [E, I, H]) in our layout, from either checkpoint layout.

    Per-expert tensors are gathered straight into ``dtype`` (the parameter dtype), so a
    layer's experts take their final size on the host, not float32's."""
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in ckpt and model_type == "llama4_text":
        # Llama 4 stores its fused experts input-major already: [E, H, 2I] and [E, I, H].
        gate_up = np.asarray(ckpt.get(fused, (num_experts, hidden, 2 * width)))
        down = np.asarray(ckpt.get(f"{prefix}.experts.down_proj", (num_experts, width, hidden)))
        return gate_up, down
    if fused in ckpt:
        gate_up = np.asarray(ckpt.get(fused, (num_experts, 2 * width, hidden))).transpose(0, 2, 1)
        down = np.asarray(ckpt.get(f"{prefix}.experts.down_proj", (num_experts, hidden, width))).transpose(0, 2, 1)
        return gate_up, down
    names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    gate_up = np.empty((num_experts, hidden, 2 * width), dtype)
    down = np.empty((num_experts, width, hidden), dtype)
    for e in range(num_experts):
        base = f"{prefix}.experts.{e}"
        gate_up[e, :, :width] = ckpt.get(f"{base}.{names[0]}.weight", (width, hidden)).T
        gate_up[e, :, width:] = ckpt.get(f"{base}.{names[1]}.weight", (width, hidden)).T
        down[e] = ckpt.get(f"{base}.{names[2]}.weight", (hidden, width)).T
    return gate_up, down


def _put_slots(variable, per_expert: np.ndarray, slot_to_expert: np.ndarray, sharding, dtype) -> None:
    """Each device builds only its own slots (replicas copied from their expert)."""
    shape = (len(slot_to_expert),) + per_expert.shape[1:]
    if sharding is None:
        variable.set_value(jnp.asarray(per_expert[slot_to_expert].astype(dtype)))
        return
    variable.set_value(jax.make_array_from_callback(
        shape, sharding, lambda index: per_expert[slot_to_expert[index[0]]].astype(dtype)[(slice(None),) + index[1:]]))


def from_pretrained(path, *, moe_config: MoEConfig | None = None, mesh: Mesh | None = None,
                    dtype=jnp.bfloat16) -> CausalLM:
    """Loads a Hugging Face checkpoint folder (config.json + safetensors) as a `CausalLM`.

    Args:
      path: folder with ``config.json`` and one or more ``*.safetensors`` files.
      moe_config: how to run the MoE layers (backend, slots, placement); None = local.
      mesh: device mesh (required for ``backend: WIDEEP``); other weights are replicated.
      dtype: parameter and activation dtype (FP8 checkpoints are dequantized to it).

    Returns:
      The model, callable as ``model(input_ids) -> logits [batch, seq, vocab]``.

    Raises:
      CheckpointError: config.json (its keys, quantization_config) or the tensors (names,
        dtypes, shapes) are invalid; the message names the file, key or tensor, the value and
        what is allowed (`CheckpointNotFoundError` / `MissingTensorError` for absent ones).
      TypeError, ValueError: an argument of the wrong kind (``path``, ``moe_config``, ``mesh``,
        a non-floating ``dtype``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}: allowed: a checkpoint folder (a str or os.PathLike)")
    if moe_config is not None and not isinstance(moe_config, MoEConfig):
        raise TypeError(f"moe_config={moe_config!r}: allowed: a MoEConfig (e.g. from load_moe_config) or None")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh={mesh!r}: allowed: a jax.sharding.Mesh or None")
    folder = Path(path)
    hf_config = read_config(folder)
    cfg = from_hf_config(hf_config, dtype=dtype)
    mtp = _mtp_layers(hf_config, cfg)  # config.json checked in full before any tensor is read
    ckpt = Checkpoint(folder, _block_size(hf_config))
    # Built abstractly (no random weights), then every parameter is read from the checkpoint.
    model = nnx.eval_shape(lambda: CausalLM(cfg, moe_config, mesh=mesh, rngs=nnx.Rngs(0)))
    replicated = None if mesh is None else NamedSharding(mesh, P())
    h, v = cfg.hidden_size, cfg.vocab_size
    # Llama 4's multimodal checkpoints hold the text model under "language_model.".
    root = "language_model." if "language_model.model.embed_tokens.weight" in ckpt else ""
    _check_layers(ckpt, cfg.num_hidden_layers, root)
    _set(model.embed, ckpt.get(f"{root}model.embed_tokens.weight", (v, h)), replicated, dtype)
    _set(model.norm.weight, ckpt.get(f"{root}model.norm.weight", (h,)), replicated, dtype)
    if model.lm_head is not None:
        _set(model.lm_head, ckpt.get(f"{root}lm_head.weight", (v, h)).T, replicated, dtype)
    mlp = "feed_forward" if cfg.model_type == "llama4_text" else "mlp"
    for i, layer in enumerate(model.layers):
        p = f"{root}model.layers.{i}"
        _set(layer.input_norm.weight, ckpt.get(f"{p}.input_layernorm.weight", (h,)), replicated, dtype)
        _set(layer.post_attn_norm.weight, ckpt.get(f"{p}.post_attention_layernorm.weight", (h,)), replicated, dtype)
        if cfg.mla is not None:
            _load_latent_attention(ckpt, layer.attn, cfg, p, replicated, dtype)
        else:
            _load_attention(ckpt, layer.attn, cfg, p, replicated, dtype)
        if isinstance(layer.mlp, MoELayer):
            _load_moe(ckpt, layer.mlp, i, moe_config, cfg, p, mesh, replicated, dtype)
        else:
            w = cfg.intermediate_size
            gate = ckpt.get(f"{p}.{mlp}.gate_proj.weight", (w, h))
            up = ckpt.get(f"{p}.{mlp}.up_proj.weight", (w, h))
            _set(layer.mlp.gate_up, np.concatenate([gate.T, up.T], axis=1), replicated, dtype)
            _set(layer.mlp.down, ckpt.get(f"{p}.{mlp}.down_proj.weight", (h, w)).T, replicated, dtype)
    # DeepSeek-V3's multi-token-prediction layers sit right past num_hidden_layers; inference
    # skips them. Any other layer past the model (a config.json with too few layers) is an error.
    layer_of = re.compile(rf"{re.escape(root)}model\.layers\.(\d+)\.").match
    unused, extra = [], []
    for n in sorted(ckpt.unused):
        hit = layer_of(n)
        index = int(hit.group(1)) if hit else None
        if n.endswith(_IGNORED) or (root and n.startswith(_VISION)):  # text-only inference of Llama 4
            continue
        if index is not None and index in mtp:
            continue
        (extra if index is not None and index >= cfg.num_hidden_layers else unused).append(n)
    if extra:
        allowed = (f"layers 0..{cfg.num_hidden_layers - 1}" + (f" and DeepSeek-V3's multi-token-prediction "
                   f"layers {mtp.start}..{mtp.stop - 1} (num_nextn_predict_layers={len(mtp)})" if mtp else ""))
        raise CheckpointError(f"{folder}: checkpoint tensor {extra[0]!r} belongs to a layer past config.json "
                              f"num_hidden_layers={cfg.num_hidden_layers} ({len(extra)} such tensors: {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''}); allowed: {allowed}")
    if unused:
        raise CheckpointError(f"{folder}: checkpoint tensors not used by {cfg.model_type}: {unused[:5]}"
                              f"{' ...' if len(unused) > 5 else ''} ({len(unused)} in all); allowed: only the "
                              f"tensors of config.json's model_type={cfg.model_type!r} with its layer and expert "
                              "counts")
    return model


def _check_layers(ckpt: Checkpoint, layers: int, root: str) -> None:
    """Each of config.json's ``num_hidden_layers`` layers has its norms in the checkpoint;
    else one error lists the missing tensors before anything is read."""
    norms = ("input_layernorm.weight", "post_attention_layernorm.weight")
    name = lambda i, norm: f"{root}model.layers.{i}.{norm}"
    missing = [name(i, n) for i in range(layers) for n in norms if name(i, n) not in ckpt]
    if not missing:
        return
    absent = [i for i in range(layers) if all(name(i, n) not in ckpt for n in norms)]
    cause = None  # the generic one, unless the last layers are absent and no others
    if absent and absent[0] > 0 and absent == list(range(absent[0], layers)) and len(missing) == 2 * len(absent):
        cause = (f"config.json num_hidden_layers={layers}, but the weights hold only layers 0..{absent[0] - 1} "
                 f"(layers {absent[0]}..{layers - 1} absent)")
    raise ckpt.missing(missing, cause)


def _mtp_layers(hf_config: dict, cfg) -> range:
    """Layer indices of DeepSeek-V3's multi-token-prediction layers, which the checkpoint holds
    past ``num_hidden_layers`` and inference does not use; empty for other architectures.
    ``num_nextn_predict_layers`` absent: 1, as DeepSeek-V3/R1 ship."""
    if cfg.model_type != "deepseek_v3":
        return range(0)
    count = _int(hf_config, "num_nextn_predict_layers", 1, minimum=0)  # null: 1 too
    return range(cfg.num_hidden_layers, cfg.num_hidden_layers + count)


def _load_attention(ckpt, attn, cfg, p, replicated, dtype) -> None:
    h = cfg.hidden_size
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for ours, theirs, out_dim in ((attn.q_proj, "q_proj", q_dim), (attn.k_proj, "k_proj", kv_dim),
                                  (attn.v_proj, "v_proj", kv_dim)):
        _set(ours, ckpt.get(f"{p}.self_attn.{theirs}.weight", (out_dim, h)).T, replicated, dtype)
    _set(attn.o_proj, ckpt.get(f"{p}.self_attn.o_proj.weight", (h, q_dim)).T, replicated, dtype)
    if attn.q_norm is not None:
        _set(attn.q_norm.weight, ckpt.get(f"{p}.self_attn.q_norm.weight", (cfg.head_dim,)), replicated, dtype)
        _set(attn.k_norm.weight, ckpt.get(f"{p}.self_attn.k_norm.weight", (cfg.head_dim,)), replicated, dtype)


def _load_latent_attention(ckpt, attn, cfg, p, replicated, dtype) -> None:
    m, h, nh = cfg.mla, cfg.hidden_size, cfg.num_attention_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    a = f"{p}.self_attn"
    linear = lambda ours, name, shape: _set(ours, ckpt.get(f"{a}.{name}.weight", shape).T, replicated, dtype)
    if m.q_lora_rank is None:
        linear(attn.q_proj, "q_proj", (nh * qk, h))
    else:
        linear(attn.q_a_proj, "q_a_proj", (m.q_lora_rank, h))
        _set(attn.q_a_norm.weight, ckpt.get(f"{a}.q_a_layernorm.weight", (m.q_lora_rank,)), replicated, dtype)
        linear(attn.q_b_proj, "q_b_proj", (nh * qk, m.q_lora_rank))
    linear(attn.kv_a_proj, "kv_a_proj_with_mqa", (m.kv_lora_rank + m.qk_rope_head_dim, h))
    _set(attn.kv_a_norm.weight, ckpt.get(f"{a}.kv_a_layernorm.weight", (m.kv_lora_rank,)), replicated, dtype)
    linear(attn.kv_b_proj, "kv_b_proj", (nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank))
    linear(attn.o_proj, "o_proj", (h, nh * m.v_head_dim))


def _load_moe(ckpt, layer: MoELayer, index: int, moe_config: MoEConfig | None, cfg, prefix, mesh, replicated,
              dtype) -> None:
    h, e, w = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    llama4 = cfg.model_type == "llama4_text"
    if llama4:
        moe, router, shared = f"{prefix}.feed_forward", "router", "shared_expert"
    else:
        moe = f"{prefix}.block_sparse_moe" if f"{prefix}.block_sparse_moe.gate.weight" in ckpt else f"{prefix}.mlp"
        router, shared = "gate", "shared_experts"
    _set(layer.router, ckpt.get(f"{moe}.{router}.weight", (e, h)).T, replicated, dtype)
    gate_up, down = _experts(ckpt, moe, cfg.model_type, e, h, w, np.dtype(dtype))
    # The abstract layer holds no values (and its config no placement file): its index and
    # placement come from the model's config again.
    config = moe_config if moe_config is not None else layer.config
    slot_to_expert = np.asarray(config.slot_to_expert(index, num_experts=e, ep_size=layer.ep_size))
    _set(layer.slot_to_expert, slot_to_expert, replicated, np.int32)
    _set(layer.layer_index, np.int32(index), replicated, np.int32)
    sharded = mesh is not None and layer.config.ep_axis in mesh.axis_names
    slots = None if mesh is None else NamedSharding(mesh, P(layer.config.ep_axis) if sharded else P())
    _put_slots(layer.w_gate_up, gate_up, slot_to_expert, slots, dtype)
    _put_slots(layer.w_down, down, slot_to_expert, slots, dtype)
    if layer.correction_bias is not None:  # noaux_tc routing (DeepSeek-V3); kept in float32
        _set(layer.correction_bias, ckpt.get(f"{moe}.gate.e_score_correction_bias", (e,)), replicated, np.float32)
    if layer.shared_gate_up is not None:
        width = layer.spec.shared_width
        get = lambda name, shape: ckpt.get(f"{moe}.{shared}.{name}.weight", shape)
        _set(layer.shared_gate_up, np.concatenate([get("gate_proj", (width, h)).T, get("up_proj", (width, h)).T],
                                                  axis=1), replicated, dtype)
        _set(layer.shared_down, get("down_proj", (h, width)).T, replicated, dtype)
