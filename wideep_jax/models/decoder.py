"""A decoder-only MoE language model in Flax NNX whose MoE blocks are `MoELayer`s."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wideep_jax.config import MoEConfig
from wideep_jax.layer import MoELayer
from wideep_jax.moe import constrain
from wideep_jax.models.config import DecoderConfig
from wideep_jax.models.layers import (Attention, CacheMeta, DenseMLP, LatentAttention, LayerCache, RMSNorm,
                                      check_cache_room)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP (MoE or dense) with residuals."""

    def __init__(self, cfg: DecoderConfig, index: int, moe_config: MoEConfig | None, mesh: Mesh | None,
                 *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.attn = LatentAttention(cfg, rngs=rngs) if cfg.mla is not None else Attention(cfg, index=index, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        if index in cfg.moe_layers:
            self.mlp = MoELayer(cfg.moe_spec(), moe_config, mesh=mesh, layer_idx=index, rngs=rngs)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.dtype, rngs=rngs)

    def __call__(self, x, positions, token_valid, cache, meta, batch_spec: P):
        attn, cache = self.attn(self.input_norm(x), positions, token_valid, cache, meta)
        x = x + attn
        h = self.post_attn_norm(x)
        b, t, hidden = h.shape
        if isinstance(self.mlp, MoELayer):
            y, stats = self.mlp(h.reshape(b * t, hidden), token_mask=token_valid.reshape(b * t))
            if self.mlp.mesh is not None:
                # Batch-major tokens come back sharded over EP when their count divides: that
                # is the attention's batch split (no data moves) when the batch divides too;
                # else they are gathered before the reshape, which on an Explicit mesh cannot
                # turn a token split that cuts through sequences into [b, t] (b=2, t=6, EP 4).
                y = constrain(y, self.mlp.mesh, batch_spec)
            y = y.reshape(b, t, hidden)
            if self.mlp.mesh is not None:
                y = constrain(y, self.mlp.mesh, batch_spec)
        else:
            y, stats = self.mlp(h), None
        return x + y, cache, stats


class CausalLM(nnx.Module):
    """``logits = model(input_ids)`` for ``input_ids [batch, seq]``.

    With a cache (see `init_cache`), ``model(ids, cache=cache)`` appends the new
    tokens' keys and values and returns ``(logits, cache, stats)``: prefill and
    decode are the same call with a different ``seq``.
    """

    def __init__(self, cfg: DecoderConfig, moe_config: MoEConfig | None = None, *, mesh: Mesh | None = None,
                 rngs: nnx.Rngs):
        self.cfg, self.mesh = cfg, mesh
        if moe_config is not None:
            # A placement file for another model (or with a layer left out) fails before any layer is built.
            moe_config = moe_config.check_layers(cfg.moe_layers, num_layers=cfg.num_hidden_layers)
        axis = (moe_config or MoEConfig()).ep_axis
        # Attention is data parallel over the EP axis (TensorRT-LLM's attention DP):
        # each device holds the KV cache of its share of the sequences.
        self.dp_axis = axis if mesh is not None and axis in mesh.axis_names else None
        key = rngs.params()
        self.embed = nnx.Param(jax.random.normal(key, (cfg.vocab_size, cfg.hidden_size), jnp.float32)
                               .astype(cfg.dtype))
        self.layers = nnx.List([DecoderLayer(cfg, i, moe_config, mesh, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(
            (jax.random.normal(jax.random.fold_in(key, 1), (cfg.hidden_size, cfg.vocab_size), jnp.float32)
             / cfg.hidden_size ** 0.5).astype(cfg.dtype))
        if mesh is not None:
            # Everything but the MoE layers (which place their own slots) is replicated.
            replicated = NamedSharding(mesh, P())
            dense = [self.norm, *(m for layer in self.layers for m in (layer.input_norm, layer.attn,
                                                                         layer.post_attn_norm, layer.mlp)
                                  if not isinstance(m, MoELayer))]
            variables = [self.embed] + ([self.lm_head] if self.lm_head is not None else [])
            variables += [v for m in dense for _, v in nnx.iter_graph(m) if isinstance(v, nnx.Variable)]
            for var in variables:
                var.set_value(jax.device_put(var.get_value(), replicated))

    def init_cache(self, batch: int, max_len: int) -> tuple[list[LayerCache], CacheMeta]:
        """An empty cache of ``max_len`` positions for ``batch`` sequences.

        Every call appends its ``T`` tokens (padding included), so ``max_len`` must cover
        all the tokens a sequence of calls appends: an eager call past it raises
        ``ValueError``; under ``jit`` (a traced length) it cannot be checked, and the
        write would be clamped onto the last slots, corrupting the cache."""
        cfg = self.cfg
        if cfg.mla is not None:  # the latent and the shared rotary key, not per-head K and V
            shapes = (batch, max_len, cfg.mla.kv_lora_rank), (batch, max_len, cfg.mla.qk_rope_head_dim)
        else:
            shapes = ((batch, max_len, cfg.num_key_value_heads, cfg.head_dim),) * 2
        layers = [LayerCache(*(jnp.zeros(shape, cfg.dtype) for shape in shapes))
                  for _ in range(cfg.num_hidden_layers)]
        meta = CacheMeta(jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch, max_len), bool),
                         jnp.zeros((), jnp.int32))
        if self.mesh is None:
            return layers, meta
        split = NamedSharding(self.mesh, self._batch_spec(batch))
        rep = NamedSharding(self.mesh, P())
        return (jax.device_put(layers, split),
                CacheMeta(*jax.device_put((meta.positions, meta.valid), split), jax.device_put(meta.length, rep)))

    def _batch_spec(self, batch: int) -> P:
        """Batch-dim split of the attention's arrays: over the EP axis when it divides."""
        if self.dp_axis is None or batch % self.mesh.shape[self.dp_axis]:
            return P()
        return P(self.dp_axis)

    def __call__(self, input_ids, *, positions=None, token_valid=None, cache=None, logits_to_keep: int = 0):
        """Logits [B, T, V] (float32); with ``cache``: ``(logits, cache, stats)``.

        Args:
          input_ids: int [B, T].
          positions: int [B, T] (default: the cache length + 0..T-1).
          token_valid: bool [B, T]; False marks padding (e.g. left-padded prompts).
          cache: ``(layer caches, CacheMeta)`` from `init_cache` or a previous call, with room
            for ``T`` more tokens: past its ``max_len`` an eager call raises ``ValueError``;
            under ``jit`` (a traced length) it is not checked and the cache would be
            corrupted, so size it for every token appended (`generate` does).
          logits_to_keep: 0 for every position's logits; k for the last k positions'
            only ([B, k, V]): a prefill that samples one token needs 1, and skips the
            vocabulary projection of the other T - 1 positions.
        """
        b, t = input_ids.shape
        if not isinstance(logits_to_keep, int) or not 0 <= logits_to_keep <= t:
            raise ValueError(f"logits_to_keep={logits_to_keep!r}: allowed: an int in [0, T={t}] "
                             "(0 keeps every position)")
        _check_token_ids(input_ids, self.cfg.vocab_size)
        layer_caches, meta = (None, None) if cache is None else cache
        if meta is not None:
            check_cache_room(meta, t)
        start = 0 if meta is None else meta.length
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if token_valid is None:
            token_valid = jnp.ones((b, t), bool)
        spec = self._batch_spec(b)
        if self.mesh is None:
            x = self.embed[...][input_ids]
        else:
            input_ids, positions, token_valid = (constrain(a, self.mesh, spec)
                                                 for a in (input_ids, positions, token_valid))
            x = _lookup(self.embed[...], input_ids, self.mesh, spec)
        new_caches, stats = [], []
        for i, layer in enumerate(self.layers):
            x, layer_cache, layer_stats = layer(x, positions, token_valid,
                                                None if layer_caches is None else layer_caches[i], meta, spec)
            new_caches.append(layer_cache)
            if layer_stats is not None:
                stats.append(layer_stats)
        x = self.norm(x[:, t - logits_to_keep:] if logits_to_keep else x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.dot(x, head, preferred_element_type=jnp.float32)
        if cache is None:
            return logits
        upd = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, start, axis=1)
        meta = CacheMeta(upd(meta.positions, positions.astype(jnp.int32)), upd(meta.valid, token_valid),
                         meta.length + t)
        return logits, (new_caches, meta), stats


def _check_token_ids(input_ids, vocab_size: int) -> None:
    """Concrete ids outside ``[0, vocab_size)`` are an error (the embedding gather would
    clamp them to another token silently); traced ids (under ``jit``) are not checked."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    if isinstance(input_ids, jax.Array) and not input_ids.is_fully_addressable:
        return  # shards on other processes: not readable here
    ids = np.asarray(input_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids: dtype {ids.dtype}; allowed: integer token ids in [0, {vocab_size})")
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise ValueError(f"input_ids{list(where)}={int(ids[where])}: token id outside the vocabulary "
                         f"({len(bad)} such ids); allowed: 0 <= id < vocab_size={vocab_size}")


def _lookup(table: jax.Array, ids: jax.Array, mesh: Mesh, batch_spec: P) -> jax.Array:
    """``table[ids]`` split over the batch like ``ids``. On an Explicit mesh the gather's
    output sharding must be given: ids that came back from a previous step (a decode
    loop's tokens) are batch-sharded, and JAX will not guess."""
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return table.at[ids].get(out_sharding=NamedSharding(mesh, P(*batch_spec, None, None)))
    return constrain(table[ids], mesh, batch_spec)
