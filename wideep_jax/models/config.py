"""Decoder dimensions read from a Hugging Face ``config.json`` (one dataclass for all)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from wideep_jax.routing import RouterSpec
from wideep_jax.spec import MoESpec

ARCHITECTURES = ("qwen3_moe", "mixtral", "deepseek_v3")
"""``model_type`` values `from_hf_config` reads."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``default`` or ``yarn`` (DeepSeek-V3's long-context scaling)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0


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
    ``router`` is the MoE routing (softmax top-k, or ``noaux_tc`` with
    ``n_shared_experts`` shared experts).
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
        )


def _get(cfg: dict, key: str, default=dataclasses.MISSING):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is dataclasses.MISSING:
        raise ValueError(f"config.json: missing key {key!r} (model_type={cfg.get('model_type')!r})")
    return default


def _num_experts(cfg: dict) -> int:
    # Hub configs say num_experts (Qwen) or num_local_experts (Mixtral); transformers 5
    # writes num_local_experts for both.
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    return int(_get(cfg, key))


def _rope(cfg: dict) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind != "yarn":
        raise ValueError(f"config.json: rope type {kind!r} is not supported; allowed: 'default', 'yarn'")
    if params.get("attention_factor") is not None or params.get("truncate", True) is not True:
        raise ValueError("config.json: yarn with attention_factor or truncate=false is not supported")
    return RopeConfig(theta=theta, kind="yarn", factor=float(params["factor"]),
                      original_max_position_embeddings=int(params["original_max_position_embeddings"]),
                      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                      mscale=float(params.get("mscale") or 0), mscale_all_dim=float(params.get("mscale_all_dim") or 0))


def from_hf_config(cfg: dict, *, dtype=jnp.float32) -> DecoderConfig:
    """Reads a Hugging Face config dict; unknown architectures raise naming them."""
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type={model_type!r} is not supported; allowed: {ARCHITECTURES}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={cfg['hidden_act']!r}; allowed: 'silu'")
    layers = int(_get(cfg, "num_hidden_layers"))
    heads = int(_get(cfg, "num_attention_heads"))
    hidden = int(_get(cfg, "hidden_size"))
    common = dict(
        model_type=model_type, vocab_size=int(_get(cfg, "vocab_size")), hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=int(_get(cfg, "num_key_value_heads", heads)),
        head_dim=int(_get(cfg, "head_dim", hidden // heads)),
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)), rope_theta=_rope(cfg).theta, rope=_rope(cfg),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)), dtype=dtype,
    )
    if model_type == "qwen3_moe":
        step = int(_get(cfg, "decoder_sparse_step", 1))
        dense_only = set(_get(cfg, "mlp_only_layers", []))
        num_experts = _num_experts(cfg)
        moe_layers = tuple(i for i in range(layers)
                           if i not in dense_only and num_experts > 0 and (i + 1) % step == 0)
        window = _get(cfg, "sliding_window", None) if _get(cfg, "use_sliding_window", False) else None
        return DecoderConfig(
            **common, intermediate_size=int(_get(cfg, "intermediate_size")),
            moe_intermediate_size=int(_get(cfg, "moe_intermediate_size")), num_experts=num_experts,
            num_experts_per_tok=int(_get(cfg, "num_experts_per_tok")), moe_layers=moe_layers,
            norm_topk_prob=bool(_get(cfg, "norm_topk_prob", True)), qk_norm=True,
            sliding_window=None if window is None else int(window),
        )
    if model_type == "deepseek_v3":
        return _deepseek_v3(cfg, common, layers)
    # mixtral: every layer is MoE, softmax top-k renormalised, optional sliding window.
    window = _get(cfg, "sliding_window", None)
    width = int(_get(cfg, "intermediate_size"))
    return DecoderConfig(
        **common, intermediate_size=width, moe_intermediate_size=width,
        num_experts=_num_experts(cfg), num_experts_per_tok=int(_get(cfg, "num_experts_per_tok")),
        moe_layers=tuple(range(layers)), norm_topk_prob=True, qk_norm=False,
        sliding_window=None if window is None else int(window),
    )


def _deepseek_v3(cfg: dict, common: dict, layers: int) -> DecoderConfig:
    if cfg.get("topk_method", "noaux_tc") != "noaux_tc" or cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"config.json: topk_method={cfg.get('topk_method')!r}, scoring_func="
                         f"{cfg.get('scoring_func')!r}; allowed: 'noaux_tc' with 'sigmoid'")
    rope_dim = int(_get(cfg, "qk_rope_head_dim"))
    mla = MLAConfig(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=int(_get(cfg, "kv_lora_rank")),
                    qk_nope_head_dim=int(_get(cfg, "qk_nope_head_dim")), qk_rope_head_dim=rope_dim,
                    v_head_dim=int(_get(cfg, "v_head_dim")), rope_interleave=bool(_get(cfg, "rope_interleave", True)))
    num_experts = int(cfg["n_routed_experts"]) if cfg.get("n_routed_experts") is not None else _num_experts(cfg)
    router = RouterSpec(kind="noaux_tc", norm_topk_prob=bool(_get(cfg, "norm_topk_prob", True)),
                        n_group=int(_get(cfg, "n_group", 1)), topk_group=int(_get(cfg, "topk_group", 1)),
                        routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 1.0)))
    first_dense = int(_get(cfg, "first_k_dense_replace", 0))
    common = common | {"head_dim": rope_dim}
    return DecoderConfig(
        **common, intermediate_size=int(_get(cfg, "intermediate_size")),
        moe_intermediate_size=int(_get(cfg, "moe_intermediate_size")), num_experts=num_experts,
        num_experts_per_tok=int(_get(cfg, "num_experts_per_tok")),
        moe_layers=tuple(range(first_dense, layers)), norm_topk_prob=router.norm_topk_prob,
        mla=mla, router=router, n_shared_experts=int(_get(cfg, "n_shared_experts", 0)),
    )
