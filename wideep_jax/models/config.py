"""Decoder dimensions read from a Hugging Face ``config.json`` (one dataclass for all)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from wideep_jax._checks import is_float_dtype
from wideep_jax.routing import RouterSpec
from wideep_jax.spec import MoESpec


class CheckpointError(ValueError):
    """A Hugging Face checkpoint's ``config.json`` or weights are invalid; the message names
    the file, the key or tensor, the bad value and what is allowed."""


ARCHITECTURES = ("qwen3_moe", "mixtral", "deepseek_v3", "llama4_text", "llama4")
"""``model_type`` values `from_hf_config` reads (``llama4``: the text model of Llama 4's
multimodal checkpoints, read from their ``text_config``)."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``default``, ``yarn`` (DeepSeek-V3's long-context scaling) or
    ``llama3`` (Llama 3/4's frequency-band scaling)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention dims (HF names)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only MoE transformer (Qwen3-MoE, Mixtral, DeepSeek-V3).

    Attributes mirror the Hugging Face names; ``moe_layers`` lists the layers whose
    MLP is the MoE block (the others use a dense SwiGLU of ``intermediate_size``).
    ``mla`` set: DeepSeek's latent attention (else grouped-query attention);
    ``router`` is the MoE routing (softmax top-k, ``noaux_tc`` with
    ``n_shared_experts`` shared experts, or Llama 4's sigmoid top-k with its weight
    on the expert input). Llama 4's attention: ``nope_layers`` skip RoPE (and use
    ``attn_temperature_tuning``), the other layers L2-normalise q and k after RoPE
    (``qk_l2_norm``) and attend within chunks of ``attention_chunk_size`` positions
    where listed in ``chunked_layers``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    norm_topk_prob: bool = True
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32
    rope: RopeConfig | None = None  # None: default RoPE with rope_theta
    mla: MLAConfig | None = None
    router: RouterSpec | None = None  # None: softmax top-k with norm_topk_prob
    n_shared_experts: int = 0
    router_weight_on_input: bool = False  # Llama 4: the routing weight scales the expert's input
    rope_interleaved: bool = False  # RoPE on adjacent pairs (Llama 4) instead of half-split ones
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (Llama 4's no_rope_layers == 0)
    qk_l2_norm: bool = False  # weightless RMS norm of q and k after RoPE, on RoPE layers (Llama 4)
    chunked_layers: tuple[int, ...] = ()  # layers attending within chunks of attention_chunk_size
    attention_chunk_size: int | None = None
    attn_temperature_tuning: bool = False  # Llama 4's query scaling on the NoPE layers
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    eos_token_id: tuple[int, ...] = ()  # config.json's end-of-sequence ids (an int or a list there)
    pad_token_id: int | None = None
    max_position_embeddings: int | None = None  # the trained length; `generate` warns past it

    @property
    def rope_config(self) -> RopeConfig:
        return self.rope or RopeConfig(theta=self.rope_theta)

    def moe_spec(self) -> MoESpec:
        """The MoE layer shape of this model."""
        return MoESpec(
            hidden_size=self.hidden_size, intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts, top_k=self.num_experts_per_tok,
            router=self.router or RouterSpec(kind="softmax", norm_topk_prob=self.norm_topk_prob),
            num_shared_experts=self.n_shared_experts, dtype=self.dtype, param_dtype=self.dtype,
            apply_router_weight_on_input=self.router_weight_on_input,
        )


def _get(cfg: dict, key: str, default=dataclasses.MISSING):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is dataclasses.MISSING:
        raise CheckpointError(f"config.json: missing key {key!r} (model_type={cfg.get('model_type')!r})")
    return default


def _integer(value) -> int | None:
    """``value`` as an int if it is one (bools are not; an integral float such as 48.0, as
    some exporters write, is), else None."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _int(cfg: dict, key: str, default=dataclasses.MISSING, *, minimum: int = 1, name: str | None = None) -> int:
    """An integer key (sizes and counts: >= ``minimum``); a fraction, string or bool is an
    error naming the key (``name``, if given) and the value, never truncated by ``int()``."""
    value = _get(cfg, key, default)
    number = _integer(value)
    if number is None or number < minimum:
        raise CheckpointError(f"config.json: {name or key}={value!r}; allowed: an int >= {minimum}")
    return number


def _float(cfg: dict, key: str, default=dataclasses.MISSING, *, name: str | None = None,
           positive: bool = False) -> float:
    """A number key (``positive``: > 0, as for divisors and logarithms' arguments)."""
    value = _get(cfg, key, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (positive and value <= 0)):
        raise CheckpointError(f"config.json: {name or key}={value!r}; allowed: a finite number{' > 0' * positive}")
    return float(value)


def _bool(cfg: dict, key: str, default=dataclasses.MISSING, *, name: str | None = None) -> bool:
    """A flag: JSON true or false only (bool("false") would be True; 0/1 are not flags)."""
    value = _get(cfg, key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: {name or key}={value!r}; allowed: true or false")
    return value


def _truthy_flag(cfg: dict, key: str, default: bool) -> bool:
    """A flag that published configs write as an int too (Llama 4's ``attn_temperature_tuning:
    4``, which transformers only tests for truth): JSON true/false or an int >= 0."""
    value = _get(cfg, key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value >= 0:
        return value != 0
    raise CheckpointError(f"config.json: {key}={value!r}; allowed: true or false (or an int >= 0, read as "
                          "true when not 0)")


def _layer_indices(cfg: dict, key: str, layers: int) -> tuple[int, ...]:
    """A list of layer indices, each in [0, num_hidden_layers)."""
    value = cfg[key]
    numbers = [_integer(i) for i in value] if isinstance(value, list) else [None]
    if any(i is None or not 0 <= i < layers for i in numbers):
        raise CheckpointError(f"config.json: {key}={value!r}; allowed: a list of layer indices (ints) in "
                              f"[0, num_hidden_layers={layers})")
    return tuple(numbers)


def _token_id(cfg: dict, key: str) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"config.json: {key}={value!r}; allowed: an int token id or null")
    return value


def _token_ids(cfg: dict, key: str) -> tuple[int, ...]:
    """``eos_token_id``: an int or a list of ints (several end-of-sequence tokens) or null."""
    value = cfg.get(key)
    values = value if isinstance(value, list) else [value]
    if value is None:
        return ()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"config.json: {key}={value!r}; allowed: an int token id, a list of them, or null")
    return tuple(values)


def _num_experts(cfg: dict, minimum: int = 1) -> int:
    # Hub configs say num_experts (Qwen) or num_local_experts (Mixtral); transformers 5
    # writes num_local_experts for both.
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    return _int(cfg, key, minimum=minimum)


# transformers' defaults (MixtralConfig, Llama4TextConfig, Qwen3MoeConfig, DeepseekV3Config)
# for keys a config.json leaves out, where they differ between the architectures. A key
# given as null takes the generic fallback instead, as there: num_key_value_heads =
# num_attention_heads, head_dim = hidden_size // num_attention_heads, no sliding window
# or attention chunks.
_ARCH_DEFAULTS = {
    "qwen3_moe": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_key_value_heads": 4, "sliding_window": 4096},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "num_key_value_heads": 8},
    "deepseek_v3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "llama4_text": {"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "num_key_value_heads": 8, "head_dim": 128,
                    "attention_chunk_size": 8192},
}


def _absent_default(cfg: dict, key: str, fallback):
    """transformers' default for ``key`` when config.json leaves it out; ``fallback`` when
    it is given as null (or the architecture has no default of its own)."""
    if key in cfg:
        return fallback
    return _ARCH_DEFAULTS.get(cfg.get("model_type"), {}).get(key, fallback)


# Keys each rope type needs in rope_scaling / rope_parameters.
_ROPE_KEYS = {"llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
              "yarn": ("factor", "original_max_position_embeddings")}


def _rope(cfg: dict) -> RopeConfig:
    sections = [section for section in ("rope_parameters", "rope_scaling") if cfg.get(section) is not None]
    for section in sections:
        if not isinstance(cfg[section], dict):
            raise CheckpointError(f"config.json: {section}={cfg[section]!r}; allowed: a JSON object or null")
    params = {key: value for section in sections for key, value in cfg[section].items()}  # rope_scaling's win
    section = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    # The rope type's key: rope_type (transformers 4.45+) or type (older configs); null: default.
    type_key = "rope_type" if params.get("rope_type") is not None else "type"
    kind = _get(params, type_key, "default")
    theta = (_float(params, "rope_theta", name=f"{section}.rope_theta", positive=True)
             if params.get("rope_theta") is not None
             else _float(cfg, "rope_theta", _absent_default(cfg, "rope_theta", 10000.0), positive=True))
    if kind == "default":
        return RopeConfig(theta=theta)
    if not isinstance(kind, str) or kind not in _ROPE_KEYS:  # a list would not hash
        where = next(s for s in reversed(sections) if cfg[s].get(type_key) is not None)
        raise CheckpointError(f"config.json: {where}.{type_key}={kind!r} is not supported; allowed: 'default', "
                              "'yarn', 'llama3'")
    missing = [key for key in _ROPE_KEYS[kind] if params.get(key) is None]
    if missing:
        raise CheckpointError(f"config.json: missing key {section}.{missing[0]} (rope_type={kind!r}); "
                              f"allowed: rope type {kind!r} with all of {list(_ROPE_KEYS[kind])}")

    def number(key, default=dataclasses.MISSING, *, positive=True):
        # factor, llama3's band factors and YaRN's betas are divisors or logs' arguments: > 0.
        return _float(params, key, default, name=f"{section}.{key}", positive=positive)

    factor = number("factor")
    original = _int(params, "original_max_position_embeddings", name=f"{section}.original_max_position_embeddings")
    if kind == "llama3":
        return RopeConfig(theta=theta, kind="llama3", factor=factor, original_max_position_embeddings=original,
                          low_freq_factor=number("low_freq_factor"), high_freq_factor=number("high_freq_factor"))
    if params.get("attention_factor") is not None:
        raise CheckpointError(f"config.json: {section}.attention_factor={params['attention_factor']!r} is not "
                              "supported for yarn; allowed: null (the factor from mscale and mscale_all_dim)")
    if not _bool(params, "truncate", True, name=f"{section}.truncate"):
        raise CheckpointError(f"config.json: {section}.truncate=false is not supported for yarn; allowed: true")
    return RopeConfig(theta=theta, kind="yarn", factor=factor, original_max_position_embeddings=original,
                      beta_fast=number("beta_fast", 32.0), beta_slow=number("beta_slow", 1.0),
                      mscale=number("mscale", 0.0, positive=False),
                      mscale_all_dim=number("mscale_all_dim", 0.0, positive=False))


def from_hf_config(cfg: dict, *, dtype=jnp.float32) -> DecoderConfig:
    """Reads a Hugging Face config dict; unknown architectures raise naming them.

    Integer keys must hold ints (an integral float such as 48.0 is read as 48; 48.7, "48"
    and true are errors), sizes and counts positive; layer lists hold indices of layers;
    flags are JSON true or false ("false" is an error, not true); the MoE keys must agree
    (num_experts_per_tok at most the expert count; DeepSeek-V3's expert groups). Errors
    about the config are `CheckpointError`; a ``dtype`` that is not a floating dtype is a
    ValueError."""
    if not is_float_dtype(dtype):
        raise ValueError(f"dtype={dtype!r}: allowed: a floating dtype (e.g. jnp.bfloat16, jnp.float32)")
    decoder = _decoder(cfg, dtype)
    _check_moe(cfg["text_config"] if cfg.get("model_type") == "llama4" else cfg, decoder)
    return decoder


def _check_moe(cfg: dict, decoder: DecoderConfig) -> None:
    """The MoE keys agree with each other (else the MoE layer's own check would name its
    fields, not config.json's keys)."""
    if not decoder.moe_layers:
        return
    experts = next(key for key in ("n_routed_experts", "num_experts", "num_local_experts")
                   if cfg.get(key) is not None and (key != "n_routed_experts" or decoder.model_type == "deepseek_v3"))
    e, k = decoder.num_experts, decoder.num_experts_per_tok
    if k > e:
        raise CheckpointError(f"config.json: num_experts_per_tok={k} with {experts}={e}; allowed: an int in "
                              f"[1, {experts}]")
    router = decoder.router
    if router is not None and router.kind == "noaux_tc":
        groups, kept = router.n_group, router.topk_group
        if e % groups:
            raise CheckpointError(f"config.json: n_group={groups} with {experts}={e}; allowed: a divisor of {experts}")
        if groups > 1 and e // groups < 2:  # a group's score is its top-2 experts' sum
            raise CheckpointError(f"config.json: n_group={groups} with {experts}={e} gives groups of {e // groups} "
                                  f"expert; allowed: n_group=1 or groups of >= 2 experts")
        if kept > groups:
            raise CheckpointError(f"config.json: topk_group={kept} with n_group={groups}; allowed: an int in "
                                  "[1, n_group]")
        if k > kept * (e // groups):
            raise CheckpointError(f"config.json: num_experts_per_tok={k} with topk_group={kept} of n_group={groups} "
                                  f"groups of {e // groups} experts; allowed: <= topk_group * ({experts} // n_group) "
                                  f"= {kept * (e // groups)}")
    try:  # anything else the MoE layer refuses
        decoder.moe_spec()
    except ValueError as err:
        raise CheckpointError(f"config.json: the MoE settings are unusable: {err}") from None


def _decoder(cfg: dict, dtype) -> DecoderConfig:
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json holds a {type(cfg).__name__} ({str(cfg)[:40]}); "
                              "allowed: a JSON object of model settings (model_type, hidden_size, ...)")
    if cfg.get("model_type") == "llama4":  # multimodal: the decoder is the text model
        outer = cfg
        if not isinstance(_get(cfg, "text_config"), dict):
            raise CheckpointError(f"config.json: text_config={cfg['text_config']!r}; allowed: a JSON object")
        cfg = cfg["text_config"] | {"model_type": "llama4_text"}
        # The token ids may be given on the outer config only: the text model uses them.
        cfg |= {k: outer[k] for k in ("eos_token_id", "pad_token_id") if cfg.get(k) is None and k in outer}
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"config.json: model_type={model_type!r} is not supported; allowed: {ARCHITECTURES}")
    activation = _get(cfg, "hidden_act", "silu")  # null: the architectures' default
    if activation != "silu":
        raise CheckpointError(f"config.json: hidden_act={activation!r} is not supported; allowed: 'silu'")
    layers = _int(cfg, "num_hidden_layers")
    heads = _int(cfg, "num_attention_heads")
    hidden = _int(cfg, "hidden_size")
    kv_heads = _int(cfg, "num_key_value_heads", _absent_default(cfg, "num_key_value_heads", heads))
    head_dim = _absent_default(cfg, "head_dim", None)
    if model_type != "deepseek_v3":  # MLA has its own head dims and no kv head groups
        _check_heads(cfg, hidden, heads, kv_heads, head_dim)
    rope = _rope(cfg)
    common = dict(
        model_type=model_type, vocab_size=_int(cfg, "vocab_size"), hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=_int(cfg, "head_dim", hidden // heads if head_dim is None else head_dim),
        rms_norm_eps=_float(cfg, "rms_norm_eps", _absent_default(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=rope.theta, rope=rope,
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", False), dtype=dtype,
        eos_token_id=_token_ids(cfg, "eos_token_id"), pad_token_id=_token_id(cfg, "pad_token_id"),
        max_position_embeddings=(None if cfg.get("max_position_embeddings") is None
                                 else _int(cfg, "max_position_embeddings")),
    )
    if model_type == "qwen3_moe":
        step = _int(cfg, "decoder_sparse_step", 1)
        dense_only = _layer_indices(cfg, "mlp_only_layers", layers) if cfg.get("mlp_only_layers") is not None else ()
        num_experts = _num_experts(cfg, minimum=0)  # 0: every layer dense
        moe_layers = tuple(i for i in range(layers)
                           if i not in dense_only and num_experts > 0 and (i + 1) % step == 0)
        window = (_get(cfg, "sliding_window", _absent_default(cfg, "sliding_window", None))
                  if _bool(cfg, "use_sliding_window", False) else None)
        return DecoderConfig(
            **common, intermediate_size=_int(cfg, "intermediate_size"),
            moe_intermediate_size=_int(cfg, "moe_intermediate_size"), num_experts=num_experts,
            num_experts_per_tok=_int(cfg, "num_experts_per_tok"), moe_layers=moe_layers,
            norm_topk_prob=_bool(cfg, "norm_topk_prob", False), qk_norm=True,
            sliding_window=None if window is None else _int(cfg, "sliding_window", window),
        )
    if model_type == "deepseek_v3":
        return _deepseek_v3(cfg, common, layers)
    if model_type == "llama4_text":
        return _llama4(cfg, common, layers)
    # mixtral: every layer is MoE, softmax top-k renormalised, optional sliding window.
    window = _get(cfg, "sliding_window", None)
    width = _int(cfg, "intermediate_size")
    return DecoderConfig(
        **common, intermediate_size=width, moe_intermediate_size=width,
        num_experts=_num_experts(cfg), num_experts_per_tok=_int(cfg, "num_experts_per_tok"),
        moe_layers=tuple(range(layers)), norm_topk_prob=True, qk_norm=False,
        sliding_window=None if window is None else _int(cfg, "sliding_window"),
    )


def _check_heads(cfg: dict, hidden: int, heads: int, kv_heads: int, head_dim: int | None) -> None:
    """Grouped-query attention splits the query heads into num_key_value_heads equal groups;
    without head_dim, each head is hidden_size / num_attention_heads wide (an explicit
    head_dim, as Qwen3's, may differ; ``head_dim``: the architecture's default for an
    absent key, Llama 4's 128)."""
    if heads % kv_heads:
        given = "" if "num_key_value_heads" in cfg else " (absent: transformers' default for this model_type)"
        raise CheckpointError(f"config.json: num_key_value_heads={kv_heads}{given} with "
                              f"num_attention_heads={heads}; allowed: a divisor of num_attention_heads")
    if cfg.get("head_dim") is None and head_dim is None and hidden % heads:
        raise CheckpointError(f"config.json: hidden_size={hidden} with num_attention_heads={heads} and no head_dim; "
                              "allowed: a multiple of num_attention_heads, or head_dim given")


def _deepseek_v3(cfg: dict, common: dict, layers: int) -> DecoderConfig:
    for key, allowed in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
        value = _get(cfg, key, allowed)  # null: transformers' default
        if value != allowed:
            raise CheckpointError(f"config.json: {key}={value!r} is not supported; allowed: {allowed!r} "
                                  "(DeepSeek-V3's noaux_tc routing with sigmoid scores)")
    rope_dim = _int(cfg, "qk_rope_head_dim")
    q_rank = None if cfg.get("q_lora_rank") is None else _int(cfg, "q_lora_rank")
    mla = MLAConfig(q_lora_rank=q_rank, kv_lora_rank=_int(cfg, "kv_lora_rank"),
                    qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"), qk_rope_head_dim=rope_dim,
                    v_head_dim=_int(cfg, "v_head_dim"), rope_interleave=_bool(cfg, "rope_interleave", True))
    num_experts = _int(cfg, "n_routed_experts") if cfg.get("n_routed_experts") is not None else _num_experts(cfg)
    # Keys a config.json leaves out take transformers' DeepseekV3Config defaults.
    router = RouterSpec(kind="noaux_tc", norm_topk_prob=_bool(cfg, "norm_topk_prob", True),
                        n_group=_int(cfg, "n_group", 8), topk_group=_int(cfg, "topk_group", 4),
                        routed_scaling_factor=_float(cfg, "routed_scaling_factor", 2.5, positive=True))
    first_dense = _int(cfg, "first_k_dense_replace", 3, minimum=0)
    # DeepSeek's own modeling code: MoE where layer >= first_k_dense_replace and layer % moe_layer_freq
    # == 0 (1 in every V3/R1 config; transformers ignores the key and would misread other values).
    freq = _int(cfg, "moe_layer_freq", 1, minimum=1)
    common = common | {"head_dim": rope_dim}
    return DecoderConfig(
        **common, intermediate_size=_int(cfg, "intermediate_size"),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size"), num_experts=num_experts,
        num_experts_per_tok=_int(cfg, "num_experts_per_tok"),
        moe_layers=tuple(i for i in range(first_dense, layers) if i % freq == 0),
        norm_topk_prob=router.norm_topk_prob,
        mla=mla, router=router, n_shared_experts=_int(cfg, "n_shared_experts", 1, minimum=0),
    )


def _llama4(cfg: dict, common: dict, layers: int) -> DecoderConfig:
    """Llama 4 (Scout, Maverick): interleaved MoE layers, iRoPE attention."""
    step = _int(cfg, "interleave_moe_layer_step", 1)
    moe_layers = cfg.get("moe_layers")
    moe_layers = (tuple(range(step - 1, layers, step)) if moe_layers is None
                  else _layer_indices(cfg, "moe_layers", layers))
    # no_rope_layers[i] == 1 means layer i *uses* RoPE (HF's naming); default: every
    # no_rope_layer_interval-th layer is NoPE.
    interval = _int(cfg, "no_rope_layer_interval", 4)
    uses_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if not isinstance(uses_rope, list) or any(flag not in (0, 1) for flag in uses_rope):  # "0" would be truthy
        raise CheckpointError(f"config.json: no_rope_layers={uses_rope!r}; allowed: a list of 1 (RoPE) or 0 (NoPE), "
                              "one per layer")
    if len(uses_rope) != layers:
        raise CheckpointError(f"config.json: no_rope_layers={uses_rope!r} has {len(uses_rope)} entries; allowed: "
                              f"one per layer (num_hidden_layers={layers})")
    nope = tuple(i for i, rope in enumerate(uses_rope) if not rope)
    chunk = cfg.get("attention_chunk_size", _ARCH_DEFAULTS["llama4_text"]["attention_chunk_size"])
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        allowed = ("chunked_attention", "full_attention")
        # a string or a list of lists would iterate or hash badly: checked as a list of names
        if (not isinstance(layer_types, list) or len(layer_types) != layers
                or any(t not in allowed for t in layer_types)):
            raise CheckpointError(f"config.json: layer_types={layer_types!r}; allowed: a list of {layers} entries "
                                  f"(num_hidden_layers), each one of {allowed}")
        chunked = tuple(i for i, t in enumerate(layer_types) if t == "chunked_attention")
    else:
        chunked = tuple(i for i in range(layers) if i not in nope) if chunk is not None else ()
    if chunked and chunk is None:
        raise CheckpointError(f"config.json: attention_chunk_size=None (missing) with chunked_attention layers "
                              f"{list(chunked)} in layer_types; allowed: an int >= 1, or layer_types without "
                              "chunked_attention")
    if _bool(cfg, "attention_bias", False):
        raise CheckpointError("config.json: attention_bias=true is not supported for llama4_text; allowed: false")
    width = _int(cfg, "intermediate_size")
    return DecoderConfig(
        **common, intermediate_size=_int(cfg, "intermediate_size_mlp"), moe_intermediate_size=width,
        num_experts=_num_experts(cfg), num_experts_per_tok=_int(cfg, "num_experts_per_tok"),
        moe_layers=moe_layers, norm_topk_prob=False, router=RouterSpec(kind="llama4", norm_topk_prob=False),
        n_shared_experts=1, router_weight_on_input=True, rope_interleaved=True, nope_layers=nope,
        qk_l2_norm=_bool(cfg, "use_qk_norm", True), chunked_layers=chunked,
        attention_chunk_size=None if chunk is None else _int(cfg, "attention_chunk_size", chunk),
        attn_temperature_tuning=_truthy_flag(cfg, "attn_temperature_tuning", True),
        floor_scale=_float(cfg, "floor_scale", 8192, positive=True), attn_scale=_float(cfg, "attn_scale", 0.1),
    )
