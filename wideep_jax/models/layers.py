"""Decoder building blocks: RMSNorm, RoPE, GQA attention with a KV cache, dense SwiGLU."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from wideep_jax.models.config import DecoderConfig


class LayerCache(NamedTuple):
    """One layer's keys and values for ``S`` cached positions."""

    keys: jax.Array  # [B, S, KVH, D]
    values: jax.Array  # [B, S, KVH, D]


class CacheMeta(NamedTuple):
    """What every layer's cache shares: which slots hold tokens, at which positions."""

    positions: jax.Array  # int32 [B, S]
    valid: jax.Array  # bool [B, S]
    length: jax.Array  # int32 [] slots written so far (the next write starts here)


def _param(key, shape, fan_in, dtype):
    return nnx.Param((jax.random.normal(key, shape, jnp.float32) / fan_in ** 0.5).astype(dtype))


class RMSNorm(nnx.Module):
    """``w * x / rms(x)`` in float32, as Hugging Face's RMSNorm."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates ``x [B, T, heads, D]`` by position (half-split layout, as HF's rotate_half)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :].astype(x.dtype)
    half = dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    """Causal grouped-query attention with optional q/k RMSNorm and sliding window."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
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
        q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
        if cache is None:
            keys, values, key_pos, key_valid = k, v, positions, token_valid
        else:
            start = meta.length
            keys = jax.lax.dynamic_update_slice_in_dim(cache.keys, k.astype(cache.keys.dtype), start, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(cache.values, v.astype(cache.values.dtype), start, axis=1)
            cache = LayerCache(keys, values)
            key_pos = jax.lax.dynamic_update_slice_in_dim(meta.positions, positions, start, axis=1)
            key_valid = jax.lax.dynamic_update_slice_in_dim(meta.valid, token_valid, start, axis=1)
        group = nh // nkv
        qg = q.reshape(b, t, nkv, group, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(q.dtype),
                            preferred_element_type=jnp.float32) * d ** -0.5
        allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= positions[:, :, None])
        if cfg.sliding_window is not None:
            allowed &= positions[:, :, None] - key_pos[:, None, :] < cfg.sliding_window
        scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
        # A query with no allowed key (a padding token) gets zeros, not NaN.
        probs = jnp.nan_to_num(jax.nn.softmax(scores, axis=-1)).astype(q.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(q.dtype)).reshape(b, t, nh * d)
        return out @ self.o_proj[...], cache


class DenseMLP(nnx.Module):
    """SwiGLU MLP for the dense (non-MoE) layers."""

    def __init__(self, hidden: int, width: int, dtype, *, rngs: nnx.Rngs):
        k1, k2 = jax.random.split(rngs.params())
        self.gate_up = _param(k1, (hidden, 2 * width), hidden, dtype)
        self.down = _param(k2, (width, hidden), width, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(x @ self.gate_up[...], 2, axis=-1)
        return (jax.nn.silu(gate) * up) @ self.down[...]
