"""Portable backend: fixed-capacity ``jax.lax.all_to_all`` (runs on CPU and GPU).

Capacity is the local token count, so nothing is ever dropped; the price is
that every buffer moves ``R * T`` rows whatever the routing. The FFI backends
move only the real rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wideep_jax.comm.base import ReceivedTokens, check_layout
from wideep_jax.dispatch import DispatchPlan


def _all_to_all(x: jax.Array, axis_name: str) -> jax.Array:
    # [R, ...] -> [R, ...]: block r goes to rank r; block s of the result came from rank s.
    return jax.lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0, tiled=True)


class XlaAllToAll:
    """Dispatch/combine with XLA's all_to_all on padded per-rank buffers."""

    name = "xla"

    def dispatch(self, x: jax.Array, plan: DispatchPlan, *, axis_name: str) -> ReceivedTokens:
        check_layout(plan, axis_name)
        num_ranks, capacity, top_k = plan.send_slot.shape
        # Slots and the row count share one int32 collective. Weights travel as
        # floats on their own: a bitcast to int would cut their gradient.
        meta = jnp.concatenate(
            [plan.send_slot.reshape(num_ranks, capacity * top_k), plan.send_count[:, None]], axis=1
        )
        recv_x = _all_to_all(x[plan.send_token], axis_name)
        recv_meta = _all_to_all(meta, axis_name)
        recv_weight = _all_to_all(plan.send_weight, axis_name)
        return ReceivedTokens(
            x=recv_x,
            slot=recv_meta[:, :-1].reshape(num_ranks, capacity, top_k),
            weight=recv_weight,
            count=recv_meta[:, -1],
        )

    def combine(self, partial: jax.Array, plan: DispatchPlan, recv_count: jax.Array, *,
                axis_name: str) -> jax.Array:
        del recv_count  # whole buffers move; the padding rows are never read back
        check_layout(plan, axis_name, partial)
        back = _all_to_all(partial, axis_name)  # back[r] = rank r's partial sums for my rows
        return gather_partials(back, plan.token_row)


def gather_partials(back: jax.Array, token_row: jax.Array) -> jax.Array:
    """Sums, per source token, the partial rows returned by each rank.

    ``back``: [R, C, H]; ``token_row``: int32 [T, R]. Gather-based (no scatter),
    so the sum order is fixed: rank 0 first.
    """
    num_ranks = back.shape[0]
    out = jnp.zeros((token_row.shape[0], back.shape[-1]), jnp.float32)
    for r in range(num_ranks):
        row = token_row[:, r]
        part = back[r][jnp.maximum(row, 0)].astype(jnp.float32)
        out = out + jnp.where((row >= 0)[:, None], part, 0.0)
    return out
