"""Models review: sampling at top_p=1, llama3 RoPE with equal band factors, transformers'
per-architecture defaults for absent config.json keys, Llama 4's float32 rotation."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wideep_jax.models import layers as layers_mod
from wideep_jax.models.config import CheckpointError, RopeConfig, from_hf_config
from wideep_jax.models.generate import sample
from wideep_jax.models.layers import Attention, rope_frequencies

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _config(arch: str) -> dict:
    return json.loads((FIXTURES / f"{arch}_tiny" / "config.json").read_text())


def test_top_p_one_filters_nothing(monkeypatch):
    """top_p=1 is no nucleus filter (transformers adds none): every token stays a candidate.
    Over a large vocabulary the float32 cumulative mass reaches 1 before the tail, and the
    comparison alone dropped thousands of tail tokens."""
    seen = []
    real = jax.random.categorical

    def spy(key, logits, axis=-1, **kw):
        seen.append(np.asarray(logits))
        return real(key, logits, axis=axis, **kw)

    monkeypatch.setattr(jax.random, "categorical", spy)
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 151936)) * 3, jnp.float32)
    sample(logits, jax.random.key(0), temperature=1.0, top_p=1.0)
    assert np.isfinite(seen[-1]).all(), (~np.isfinite(seen[-1])).sum(axis=-1)
    # top_p < 1 still filters (and keeps the most likely token).
    sample(logits, jax.random.key(0), temperature=1.0, top_p=0.5)
    kept = np.isfinite(seen[-1])
    assert kept[:, 0].all() and (kept.sum(axis=-1) < logits.shape[-1] // 2).all()


def _llama3_reference(theta, dim, factor, old, low, high):
    """transformers' _compute_llama3_parameters, element by element in Python floats."""
    out = []
    for i in range(0, dim, 2):
        inv = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / inv
        if wavelen < old / high:
            out.append(inv)
        elif wavelen > old / low:
            out.append(inv / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * inv / factor + smooth * inv)
    return np.array(out)


@pytest.mark.parametrize("low, high", [(1.0, 1.0), (1.0, 4.0)])
def test_llama3_rope_equal_band_factors(low, high):
    """Llama 4 Scout's rope_scaling has low_freq_factor == high_freq_factor == 1.0: no band
    between, so the smooth factor divides by 0 where it is not used. That must not warn
    (it warned on every trace; an error under -W error) and the frequencies are HF's."""
    rope = RopeConfig(theta=500000.0, kind="llama3", factor=16.0, original_max_position_embeddings=8192,
                      low_freq_factor=low, high_freq_factor=high)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv_freq, scale = rope_frequencies(rope, 128)
    assert scale == 1.0
    np.testing.assert_allclose(inv_freq, _llama3_reference(500000.0, 128, 16.0, 8192, low, high), rtol=1e-6)


def _strip(cfg: dict, *keys: str) -> dict:
    return {k: v for k, v in cfg.items() if k not in keys}


def test_absent_keys_take_each_architectures_transformers_default():
    """MixtralConfig / Llama4TextConfig / Qwen3MoeConfig defaults for keys a config.json
    leaves out (they differ between the architectures); an explicit null takes the
    generic fallback, as in transformers."""
    mixtral = _strip(_config("mixtral"), "rms_norm_eps", "rope_parameters", "num_key_value_heads")
    mixtral |= {"num_attention_heads": 8}
    cfg = from_hf_config(mixtral)
    assert (cfg.rms_norm_eps, cfg.rope_config.theta, cfg.num_key_value_heads) == (1e-5, 1e6, 8)
    assert from_hf_config(mixtral | {"num_key_value_heads": None}).num_key_value_heads == 8  # = heads
    with pytest.raises(CheckpointError, match=r"num_key_value_heads=8 \(absent: transformers' default"):
        from_hf_config(mixtral | {"num_attention_heads": 4})

    text = _config("llama4_text")
    llama = _strip(text, "rms_norm_eps", "num_key_value_heads", "head_dim", "attention_chunk_size")
    llama["rope_parameters"] = _strip(text["rope_parameters"], "rope_theta")
    llama["num_attention_heads"] = 8  # a multiple of the default 8 kv heads
    cfg = from_hf_config(llama)
    assert (cfg.rms_norm_eps, cfg.rope_config.theta, cfg.num_key_value_heads, cfg.head_dim,
            cfg.attention_chunk_size) == (1e-5, 500000.0, 8, 128, 8192)
    assert cfg.chunked_layers == (0, 1, 2)
    # The multimodal config's text_config: the same defaults.
    assert from_hf_config({"model_type": "llama4", "text_config": llama}) == cfg
    nulls = from_hf_config(llama | {"num_key_value_heads": None, "head_dim": None})
    assert (nulls.num_key_value_heads, nulls.head_dim) == (8, 48 // 8)

    qwen = _strip(_config("qwen3_moe"), "num_key_value_heads", "sliding_window")
    cfg = from_hf_config(qwen | {"use_sliding_window": True})
    assert (cfg.num_key_value_heads, cfg.sliding_window, cfg.rms_norm_eps) == (4, 4096, 1e-6)
    assert from_hf_config(qwen | {"use_sliding_window": True, "sliding_window": None}).sliding_window is None
    deepseek = from_hf_config(_strip(_config("deepseek_v3"), "rms_norm_eps"))
    assert deepseek.rms_norm_eps == 1e-6


def test_llama4_rope_rotates_in_float32_like_transformers(monkeypatch):
    """HF Llama 4 rotates q and k as complex64 products of ``x.float()`` and rounds once to
    the model dtype; in bfloat16 the rotation in bfloat16 (cos/sin rounded, each product
    rounded) differed from it by several ulps."""
    text = _config("llama4_text") | {"use_qk_norm": True}
    cfg = from_hf_config(text, dtype=jnp.bfloat16)
    attn = Attention(cfg, index=0, rngs=nnx.Rngs(0))  # a RoPE layer, q/k L2-normed after RoPE
    captured = []
    real = layers_mod.rms_normalize

    def spy(x, eps):
        captured.append(np.asarray(x.astype(jnp.float32)))
        return real(x, eps)

    monkeypatch.setattr(layers_mod, "rms_normalize", spy)
    b, t = 2, 9
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size), jnp.float32).astype(jnp.bfloat16) * 4
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) * 37, (b, t))
    attn(x, positions, jnp.ones((b, t), bool), None, None)
    q_rot, k_rot = captured[:2]

    inv_freq, _ = rope_frequencies(cfg.rope_config, cfg.head_dim)
    angles = np.asarray(positions, np.float32)[..., None] * inv_freq  # [B, T, D/2]
    freqs = (np.cos(angles) + 1j * np.sin(angles)).astype(np.complex64)[:, :, None, :]

    def reference(proj, heads):
        y = np.asarray((x @ proj[...]).reshape(b, t, heads, cfg.head_dim).astype(jnp.float32))
        z = (y[..., 0::2] + 1j * y[..., 1::2]).astype(np.complex64) * freqs
        # Ours is written back half-split (q and k alike: q.k unchanged).
        half = np.concatenate([z.real, z.imag], axis=-1).astype(np.float32)
        return np.asarray(jnp.asarray(half).astype(jnp.bfloat16).astype(jnp.float32))

    np.testing.assert_array_equal(q_rot, reference(attn.q_proj, cfg.num_attention_heads))
    np.testing.assert_array_equal(k_rot, reference(attn.k_proj, cfg.num_key_value_heads))


def test_deepseek_moe_layer_freq_selects_the_moe_layers():
    """DeepSeek's moe_layer_freq (MoE where layer >= first_k_dense_replace and layer % freq == 0,
    as its own modeling code) was ignored: every layer from first_k_dense_replace on was MoE."""
    base = json.loads((FIXTURES / "deepseek_v3_tiny" / "config.json").read_text())
    cfg = base | {"num_hidden_layers": 7, "first_k_dense_replace": 1, "moe_layer_freq": 2}
    assert from_hf_config(cfg).moe_layers == (2, 4, 6)
    assert from_hf_config(base | {"num_hidden_layers": 4, "first_k_dense_replace": 1}).moe_layers == (1, 2, 3)
    with pytest.raises(CheckpointError, match=r"moe_layer_freq=0; allowed: an int >= 1"):
        from_hf_config(base | {"moe_layer_freq": 0})
