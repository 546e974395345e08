"""Decoder-only MoE models (Qwen3-MoE, Mixtral) whose MoE blocks are `wideep_jax.MoELayer`s.

``from_pretrained(path, moe_config=..., mesh=...)`` loads a Hugging Face checkpoint;
``CausalLM(DecoderConfig(...), ...)`` builds a randomly initialised one.
"""
from wideep_jax.models.config import ARCHITECTURES, DecoderConfig, from_hf_config
from wideep_jax.models.decoder import CausalLM
from wideep_jax.models.loading import from_pretrained

__all__ = ["ARCHITECTURES", "CausalLM", "DecoderConfig", "from_hf_config", "from_pretrained"]
