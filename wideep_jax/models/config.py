"""Decoder dimensions read from a Hugging Face ``config.json`` (one dataclass for all)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from wideep_jax.routing import RouterSpec
from wideep_jax.spec import MoESpec

ARCHITECTURES = ("qwen3_moe", "mixtral")
"""``model_type`` values `from_hf_config` reads."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only MoE transformer (Qwen3-MoE, Mixtral).

    Attributes mirror the Hugging Face names; ``moe_layers`` lists the layers whose
    MLP is the MoE block (the others use a dense SwiGLU of ``intermediate_size``).
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

    def moe_spec(self) -> MoESpec:
        """The MoE layer shape of this model."""
        return MoESpec(
            hidden_size=self.hidden_size, intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts, top_k=self.num_experts_per_tok,
            router=RouterSpec(kind="softmax", norm_topk_prob=self.norm_topk_prob),
            dtype=self.dtype, param_dtype=self.dtype,
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


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json: rope type {kind!r} is not supported; allowed: 'default'")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


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
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)), rope_theta=_rope_theta(cfg),
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
    # mixtral: every layer is MoE, softmax top-k renormalised, optional sliding window.
    window = _get(cfg, "sliding_window", None)
    width = int(_get(cfg, "intermediate_size"))
    return DecoderConfig(
        **common, intermediate_size=width, moe_intermediate_size=width,
        num_experts=_num_experts(cfg), num_experts_per_tok=int(_get(cfg, "num_experts_per_tok")),
        moe_layers=tuple(range(layers)), norm_topk_prob=True, qk_norm=False,
        sliding_window=None if window is None else int(window),
    )
