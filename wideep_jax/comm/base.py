"""The communication-backend interface for expert-parallel dispatch/combine.

Every backend (portable XLA all_to_all; NCCL and one-sided NVLink FFI custom
calls) takes the same :class:`~wideep_jax.dispatch.DispatchPlan`
and returns the same :class:`ReceivedTokens`, so a config key switches them.
Both methods run inside ``shard_map`` over the EP axis.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from wideep_jax.dispatch import DispatchPlan


class ReceivedTokens(NamedTuple):
    """What one rank receives: ``R`` source buffers of ``C`` rows each.

    Rows ``i >= count[src]`` are padding and may hold garbage (ragged
    backends do not write them); consumers must mask by ``count``.
    """

    x: jax.Array  # [R, C, H] token activations
    slot: jax.Array  # int32 [R, C, K] local slot per pair, -1 = pair lives elsewhere
    weight: jax.Array  # float32 [R, C, K] routing weight per pair
    count: jax.Array  # int32 [R] valid rows per source rank

    def valid_rows(self) -> jax.Array:
        """bool [R, C]: rows that carry a real token."""
        capacity = self.x.shape[1]
        return jnp.arange(capacity)[None, :] < self.count[:, None]


def check_layout(plan: DispatchPlan, axis_name: str, partial: jax.Array | None = None) -> None:
    """Refuses a plan made for another EP size than ``axis_name``'s (or partial sums laid out
    unlike the plan's buffers). A multiple of the axis size would be split over the ranks
    block by block: each rank gets another rank's rows and slots, silently."""
    size = jax.lax.axis_size(axis_name)
    if plan.num_ranks != size:
        raise ValueError(f"the dispatch plan has num_ranks={plan.num_ranks}, the EP axis {axis_name!r} has "
                         f"{size} devices; allowed: make_dispatch_plan(..., num_ranks={size})")
    if partial is not None and (partial.ndim != 3 or partial.shape[:2] != (plan.num_ranks, plan.capacity)):
        raise ValueError(f"partial sums have shape {tuple(partial.shape)}; allowed: [num_ranks={plan.num_ranks}, "
                         f"capacity={plan.capacity}, hidden] (the received buffers' layout)")


class AllToAllBackend(Protocol):
    """Moves tokens to the ranks that hold their slots and partial sums back."""

    name: str

    def dispatch(self, x: jax.Array, plan: DispatchPlan, *, axis_name: str) -> ReceivedTokens:
        """Sends each local token ``x[T, H]`` once to every rank in ``plan``."""
        ...

    def combine(self, partial: jax.Array, plan: DispatchPlan, recv_count: jax.Array, *,
                axis_name: str) -> jax.Array:
        """Returns ``[T, H]`` float32: per token, the sum of the partial sums
        ``partial[R, C, H]`` (indexed like the received buffers) of every rank
        it was sent to. ``recv_count`` is :attr:`ReceivedTokens.count` of the
        dispatch (the rows of each source that are real)."""
        ...
