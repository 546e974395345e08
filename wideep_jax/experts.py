"""Expert compute on received rows: expand, sort by slot, grouped SwiGLU, reduce.

Input is a set of token rows, each with up to ``K`` (local slot, weight) pairs
(``slot == -1``: no pair). Each pair becomes one row, rows are sorted by slot,
the two grouped GEMMs run on the sorted rows, and each token's rows are summed
back with their weights into one partial sum per token.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul


class ExpertOutput(NamedTuple):
    partial: jax.Array  # [N, H] weighted sum over the token's local pairs
    group_sizes: jax.Array  # int32 [S_local] rows computed per local slot


def swiglu(gate_up: jax.Array, dtype) -> jax.Array:
    """SiLU(gate) * up on ``[..., 2I]`` laid out as gate | up, in float32."""
    gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(dtype)


def routed_experts(
    x: jax.Array,
    slot: jax.Array,
    weight: jax.Array,
    valid: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    gmm_implementation: str | None = None,
) -> ExpertOutput:
    """Runs the routed SwiGLU experts for ``N`` token rows.

    Args:
      x: [N, H] token rows.
      slot: int32 [N, K] local slot per pair, -1 = none.
      weight: float32 [N, K] routing weight per pair.
      valid: bool [N] rows that carry a token (others are ignored whatever
        their slots hold).
      w_gate_up: [S, H, 2I] gate and up projections side by side.
      w_down: [S, I, H].
      gmm_implementation: grouped-matmul implementation name (None = default).

    Returns:
      Per-row partial sums (x.dtype) and rows per slot.
    """
    num_rows, top_k = slot.shape
    num_slots = w_gate_up.shape[0]
    # One row per (token, k) pair: every pair may be live (a caller's routing may
    # even repeat an expert), so nothing can be cut off whatever the routing.
    num_pairs = num_rows * top_k
    pair_valid = valid[:, None] & (slot >= 0)
    key = jnp.where(pair_valid, slot, num_slots).reshape(-1)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.zeros((num_slots + 1,), jnp.int32).at[key].add(1)[:num_slots]
    row_token = order // top_k
    row_weight = weight.reshape(-1)[order].astype(jnp.float32)
    row_live = key[order] < num_slots

    rows = x[row_token]
    hidden = grouped_matmul(rows, w_gate_up, group_sizes, implementation=gmm_implementation)
    act = swiglu(hidden, x.dtype)
    out = grouped_matmul(act, w_down, group_sizes, implementation=gmm_implementation,
                         preferred_element_type=jnp.float32)
    # where, not multiply: padding rows of a kernel may hold anything, NaN included.
    out = jnp.where(row_live[:, None], out * row_weight[:, None], 0.0)

    # Sorted position of every (token, k) pair (the inverse of `order`): gather-based reduce.
    position = jnp.zeros((num_pairs,), jnp.int32).at[order].set(
        jnp.arange(num_pairs, dtype=jnp.int32), unique_indices=True).reshape(num_rows, top_k)
    partial = jnp.zeros((num_rows, x.shape[-1]), jnp.float32)
    for k in range(top_k):
        partial = partial + jnp.where(pair_valid[:, k, None], out[position[:, k]], 0.0)
    return ExpertOutput(partial.astype(x.dtype), group_sizes)


def shared_experts(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dense SwiGLU MLP applied to every token (DeepSeek's shared experts)."""
    hidden = jnp.dot(x, w_gate_up.astype(x.dtype), preferred_element_type=jnp.float32)
    act = swiglu(hidden, x.dtype)
    return jnp.dot(act, w_down.astype(x.dtype), preferred_element_type=jnp.float32)
