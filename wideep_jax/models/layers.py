"""Decoder building blocks: RMSNorm, RoPE, GQA attention with a KV cache, dense SwiGLU."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wideep_jax.experts import shared_experts
from wideep_jax.models.config import DecoderConfig, RopeConfig


class LayerCache(NamedTuple):
    """One layer's keys and values for ``S`` cached positions."""

    keys: jax.Array  # [B, S, KVH, D]
    values: jax.Array  # [B, S, KVH, D]


class CacheMeta(NamedTuple):
    """What every layer's cache shares: which slots hold tokens, at which positions."""

    positions: jax.Array  # int32 [B, S]
    valid: jax.Array  # bool [B, S]
    length: jax.Array  # int32 [] slots written so far (the next write starts here)


def check_cache_room(meta: CacheMeta, new_tokens: int) -> None:
    """Raises ``ValueError`` when ``new_tokens`` more entries do not fit the cache's
    ``max_len`` (``S``) slots: a write past the end would be clamped onto the last slots,
    overwriting cached keys and values with no error.

    Checked only where ``meta.length`` is concrete (an eager call). Under ``jit`` it is
    traced and cannot be checked: the caller must size the cache (`CausalLM.init_cache`'s
    ``max_len``) for every token it appends, as `generate` does (prompt width +
    ``max_new_tokens``)."""
    if isinstance(meta.length, jax.core.Tracer):
        return
    length, max_len = int(meta.length), meta.positions.shape[1]
    if length + new_tokens > max_len:
        raise ValueError(f"KV cache overflow: cache length {length} + {new_tokens} new tokens = "
                         f"{length + new_tokens} > max_len={max_len}; allowed: at most {max_len - length} "
                         f"new tokens (init_cache with max_len >= {length + new_tokens})")


def _param(key, shape, fan_in, dtype):
    return nnx.Param((jax.random.normal(key, shape, jnp.float32) / fan_in ** 0.5).astype(dtype))


class RMSNorm(nnx.Module):
    """``w * x / rms(x)`` in float32, as Hugging Face's RMSNorm."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...] * rms_normalize(x, self.eps)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x)`` over the last axis, in float32, cast back (RMSNorm without its
    weight; Llama 4's q/k "L2 norm")."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [dim/2], cos/sin scale) as Hugging Face computes them."""
    pos_freqs = rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    if rope.kind == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    if rope.kind == "llama3":
        # Wavelengths past original/low_freq_factor slow down by `factor`, those under
        # original/high_freq_factor stay, and the band between is interpolated.
        inv_freq = 1.0 / pos_freqs
        old_len = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
        # Equal band factors (Llama 4 Scout's 1.0 and 1.0): no band between, and the smooth
        # factor's 0 division (inf/NaN, only where the mask below drops it) must not warn.
        with np.errstate(divide="ignore", invalid="ignore"):
            smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
            smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= old_len / rope.high_freq_factor) & (wavelen <= old_len / rope.low_freq_factor)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # YaRN: interpolate low frequencies by `factor`, keep high ones, ramp in between.
    def correction_dim(rotations):
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))
    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    if rope.mscale and rope.mscale_all_dim:
        scale = _mscale(rope.factor, rope.mscale) / _mscale(rope.factor, rope.mscale_all_dim)
    else:
        scale = _mscale(rope.factor)
    return inv_freq.astype(np.float32), float(scale)


def softmax_scale(rope: RopeConfig, head_dim: int) -> float:
    """``head_dim**-0.5``, times YaRN's ``mscale_all_dim`` correction squared (DeepSeek)."""
    scale = head_dim ** -0.5
    if rope.kind == "yarn" and rope.mscale_all_dim:
        scale *= _mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def rotary(x: jax.Array, positions: jax.Array, rope: RopeConfig, *, interleaved: bool = False,
           float32: bool = False) -> jax.Array:
    """Rotates ``x [B, T, heads, D]`` by position.

    Half-split pairs (x_i, x_{i+D/2}) as HF's rotate_half, or with ``interleaved``
    adjacent pairs (x_2i, x_2i+1) written back half-split (DeepSeek's layout).
    ``float32``: rotate in float32 and round once to ``x``'s dtype (Llama 4's complex
    product on ``x.float()``); else in ``x``'s dtype with cos/sin cast to it, as HF's
    rotate_half models (Qwen3, Mixtral, DeepSeek-V3) do.
    """
    dim, dtype = x.shape[-1], x.dtype
    inv_freq, scale = rope_frequencies(rope, dim)
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, D/2]
    if float32:
        x = x.astype(jnp.float32)
    cos = (jnp.cos(angles) * scale)[:, :, None, :].astype(x.dtype)
    sin = (jnp.sin(angles) * scale)[:, :, None, :].astype(x.dtype)
    if interleaved:
        first, second = x[..., 0::2], x[..., 1::2]
    else:
        first, second = x[..., : dim // 2], x[..., dim // 2:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(dtype)


class Attention(nnx.Module):
    """Causal grouped-query attention with optional q/k RMSNorm and sliding window, and
    Llama 4's per-layer variants (no RoPE with query temperature, or RoPE with q/k L2
    norm and chunked attention)."""

    def __init__(self, cfg: DecoderConfig, *, index: int = 0, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.use_rope = index not in cfg.nope_layers
        self.chunk = cfg.attention_chunk_size if index in cfg.chunked_layers else None
        keys = jax.random.split(rngs.params(), 4)
        self.q_proj = _param(keys[0], (h, cfg.num_attention_heads * d), h, cfg.dtype)
        self.k_proj = _param(keys[1], (h, cfg.num_key_value_heads * d), h, cfg.dtype)
        self.v_proj = _param(keys[2], (h, cfg.num_key_value_heads * d), h, cfg.dtype)
        self.o_proj = _param(keys[3], (cfg.num_attention_heads * d, h), cfg.num_attention_heads * d, cfg.dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, positions, token_valid, cache: LayerCache | None, meta: CacheMeta | None):
        """x [B, T, H]; returns (out [B, T, H], updated cache or None)."""
        cfg = self.cfg
        b, t, _ = x.shape
        d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = (x @ self.q_proj[...]).reshape(b, t, nh, d)
        k = (x @ self.k_proj[...]).reshape(b, t, nkv, d)
        v = (x @ self.v_proj[...]).reshape(b, t, nkv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            # Interleaved pairs come back half-split; q and k alike, so q.k is unchanged.
            # Llama 4 (interleaved pairs) rotates in float32 as HF's complex product does.
            q = rotary(q, positions, cfg.rope_config, interleaved=cfg.rope_interleaved, float32=cfg.rope_interleaved)
            k = rotary(k, positions, cfg.rope_config, interleaved=cfg.rope_interleaved, float32=cfg.rope_interleaved)
            if cfg.qk_l2_norm:
                q, k = rms_normalize(q, cfg.rms_norm_eps), rms_normalize(k, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            # Longer contexts sharpen the NoPE layers' attention (Llama 4).
            scale = jnp.log1p(jnp.floor((positions.astype(jnp.float32) + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0
            q = (q.astype(jnp.float32) * scale[:, :, None, None]).astype(q.dtype)
        (keys, values), key_pos, key_valid, cache = _append(cache, meta, (k, v), positions, token_valid)
        out = _attend(q, keys, values, positions, key_pos, key_valid, d ** -0.5, cfg.sliding_window,
                      chunk=self.chunk)
        return out.reshape(b, t, nh * d) @ self.o_proj[...], cache


def _append(cache, meta, new, positions, token_valid):
    """Writes this call's entries at the cache's end; returns everything attention may read.
    Past the cache's ``max_len``: ``ValueError`` where the length is concrete (see
    `check_cache_room`; under ``jit`` the write would be clamped, corrupting the cache)."""
    if cache is None:
        return new, positions, token_valid, None
    check_cache_room(meta, positions.shape[1])
    put = lambda old, value: jax.lax.dynamic_update_slice_in_dim(old, value.astype(old.dtype), meta.length, axis=1)
    cache = LayerCache(*(put(old, value) for old, value in zip(cache, new)))
    return tuple(cache), put(meta.positions, positions), put(meta.valid, token_valid), cache


def _attend(q, k, v, positions, key_pos, key_valid, scale: float, window: int | None, *, chunk: int | None = None):
    """Causal softmax attention. q [B,T,H,Dk], k [B,S,KVH,Dk], v [B,S,KVH,Dv] -> [B,T,H,Dv].

    ``window``: keys at most window - 1 positions back; ``chunk``: keys in the query's
    chunk of ``chunk`` positions only."""
    b, t, nh, dk = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, t, nkv, nh // nkv, dk)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= positions[:, :, None])
    if window is not None:
        allowed &= positions[:, :, None] - key_pos[:, None, :] < window
    if chunk is not None:
        allowed &= positions[:, :, None] // chunk == key_pos[:, None, :] // chunk
    scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
    # A query with no allowed key (a padding token) gets zeros, not NaN.
    probs = jnp.nan_to_num(jax.nn.softmax(scores, axis=-1)).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))
    return out.reshape(b, t, nh, v.shape[-1])


class LatentAttention(nnx.Module):
    """DeepSeek's multi-head latent attention. The cache holds the normalised KV latent
    and the shared rotary key (``LayerCache(keys=latent [B,S,R], values=k_rot [B,S,Dr])``);
    keys and values are expanded from it per call."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        m, h, nh = cfg.mla, cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        keys = jax.random.split(rngs.params(), 5)
        if m.q_lora_rank is None:
            self.q_proj = _param(keys[0], (h, nh * qk), h, cfg.dtype)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = _param(keys[0], (h, m.q_lora_rank), h, cfg.dtype)
            self.q_a_norm = RMSNorm(m.q_lora_rank, 1e-6, cfg.dtype)
            self.q_b_proj = _param(keys[1], (m.q_lora_rank, nh * qk), m.q_lora_rank, cfg.dtype)
        self.kv_a_proj = _param(keys[2], (h, m.kv_lora_rank + m.qk_rope_head_dim), h, cfg.dtype)
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, 1e-6, cfg.dtype)
        self.kv_b_proj = _param(keys[3], (m.kv_lora_rank, nh * (m.qk_nope_head_dim + m.v_head_dim)),
                                m.kv_lora_rank, cfg.dtype)
        self.o_proj = _param(keys[4], (nh * m.v_head_dim, h), nh * m.v_head_dim, cfg.dtype)

    def __call__(self, x, positions, token_valid, cache: LayerCache | None, meta: CacheMeta | None):
        cfg, m = self.cfg, self.cfg.mla
        b, t, _ = x.shape
        nh = cfg.num_attention_heads
        q = x @ self.q_proj[...] if self.q_proj is not None else \
            self.q_a_norm(x @ self.q_a_proj[...]) @ self.q_b_proj[...]
        q = q.reshape(b, t, nh, m.qk_nope_head_dim + m.qk_rope_head_dim)
        q_nope, q_rot = q[..., :m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        compressed = x @ self.kv_a_proj[...]
        latent = self.kv_a_norm(compressed[..., :m.kv_lora_rank])
        k_rot = compressed[..., m.kv_lora_rank:][:, :, None, :]
        rope = cfg.rope_config
        q_rot = rotary(q_rot, positions, rope, interleaved=m.rope_interleave)
        k_rot = rotary(k_rot, positions, rope, interleaved=m.rope_interleave)[:, :, 0]
        (latent, k_rot), key_pos, key_valid, cache = _append(cache, meta, (latent, k_rot), positions, token_valid)
        s = latent.shape[1]
        kv = (latent.astype(x.dtype) @ self.kv_b_proj[...]).reshape(b, s, nh, m.qk_nope_head_dim + m.v_head_dim)
        k = jnp.concatenate([kv[..., :m.qk_nope_head_dim],
                             jnp.broadcast_to(k_rot[:, :, None, :].astype(x.dtype), (b, s, nh, m.qk_rope_head_dim))],
                            axis=-1)
        scale = softmax_scale(rope, m.qk_nope_head_dim + m.qk_rope_head_dim)
        out = _attend(jnp.concatenate([q_nope, q_rot], -1), k, kv[..., m.qk_nope_head_dim:], positions,
                      key_pos, key_valid, scale, cfg.sliding_window)
        return out.reshape(b, t, nh * m.v_head_dim) @ self.o_proj[...], cache


class DenseMLP(nnx.Module):
    """SwiGLU MLP for the dense (non-MoE) layers."""

    def __init__(self, hidden: int, width: int, dtype, *, rngs: nnx.Rngs):
        k1, k2 = jax.random.split(rngs.params())
        self.gate_up = _param(k1, (hidden, 2 * width), hidden, dtype)
        self.down = _param(k2, (width, hidden), width, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # The same dense SwiGLU as the MoE layer's shared experts (float32 accumulation).
        return shared_experts(x, self.gate_up[...], self.down[...]).astype(x.dtype)
