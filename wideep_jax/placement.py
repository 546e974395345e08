"""Slot placement: which expert each slot holds, and which replica a token uses.

A placement is data (``slot_to_expert: int32[num_slots]``), never a static
argument, so changing it never recompiles. Rank ``r`` of an EP group of size
``R`` owns the contiguous slots ``[r * S / R, (r + 1) * S / R)``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from wideep_jax._checks import is_int


class ReplicaTable(NamedTuple):
    """Expert -> replica slots, derived on device from ``slot_to_expert``.

    Replica ``j`` of expert ``e`` is ``sorted_slots[first[e] + j]`` for
    ``0 <= j < count[e]``; no padded ``[E, max_replicas]`` table is needed.
    """

    sorted_slots: jax.Array  # int32 [S]: slots ordered by the expert they hold
    first: jax.Array  # int32 [E]: index in sorted_slots of the expert's first replica
    count: jax.Array  # int32 [E]: replicas per expert
    slot_to_expert: jax.Array  # int32 [S]: the placement itself


def replica_table(slot_to_expert: jax.Array, num_experts: int) -> ReplicaTable:
    """Builds the replica table of a placement (``slot_to_expert``: int32 [S]).

    A slot whose entry lies outside ``[0, num_experts)`` holds no expert: it is in no
    expert's replicas (under jit such a table cannot be refused). A negative entry
    would otherwise wrap around (``count[-1]``: expert E-1) and sort first, moving
    every expert onto the slots of its neighbour, silently.
    """
    slot_to_expert = slot_to_expert.astype(jnp.int32)
    held = _held(slot_to_expert, num_experts)
    sorted_slots = jnp.argsort(held, stable=True).astype(jnp.int32)
    count = jnp.zeros((num_experts,), jnp.int32).at[held].add(1, mode="drop")
    first = (jnp.cumsum(count) - count).astype(jnp.int32)
    return ReplicaTable(sorted_slots, first, count, slot_to_expert)


def _held(slot_to_expert: jax.Array, num_experts: int) -> jax.Array:
    """The expert each slot holds, ``num_experts`` (one past the last) for an entry outside
    ``[0, num_experts)``: it sorts after every expert and scatters nowhere."""
    in_range = (slot_to_expert >= 0) & (slot_to_expert < num_experts)
    return jnp.where(in_range, slot_to_expert, num_experts)


def choose_slots(
    expert_ids: jax.Array,
    valid: jax.Array,
    table: ReplicaTable,
    *,
    rank_offset: jax.Array | int = 0,
    local_rank: jax.Array | int | None = None,
    num_ranks: int = 1,
) -> jax.Array:
    """Maps each routed (token, k) pair to one replica slot of its expert.

    Deterministic round-robin, as TensorRT-LLM does: the pairs that chose
    expert ``e`` (in token-major order) take its replicas in turn, starting at
    replica ``rank_offset % count[e]``, so sources on different ranks start on
    different replicas. Pairs of invalid tokens get slot 0 (they are never sent).

    A pair of a valid token whose expert id lies outside ``[0, num_experts)``, or whose
    expert holds no slot, gets slot -1: no slot, which ``make_dispatch_plan`` and
    ``routed_experts`` skip, so it is neither computed nor counted (under jit such ids
    cannot be refused; a real slot would run another expert's weights). It takes no
    replica's turn.

    With ``local_rank`` set (``replica_selection: local_first``), a pair whose
    expert has a replica on ``local_rank`` (of ``num_ranks``) uses that replica
    instead: it never leaves the rank, at the cost of balance between replicas.

    Args:
      expert_ids: int32 [T, K] routed experts.
      valid: bool [T] real (non-padding) tokens.
      table: the placement's replica table.
      rank_offset: the source rank (traced is fine).
      local_rank: the source rank for ``local_first`` selection; None = round-robin only.
      num_ranks: EP ranks the slots are split over (for ``local_rank``).

    Returns:
      int32 [T, K] global slot ids (-1: no slot, see above).
    """
    # A [1] mask would broadcast over every token, a [T, K] one over the pairs: refused.
    if expert_ids.ndim != 2:
        raise ValueError(f"expert_ids has shape {tuple(expert_ids.shape)}; allowed: [tokens, top_k]")
    if valid.shape != expert_ids.shape[:1]:
        raise ValueError(f"valid has shape {tuple(valid.shape)}; allowed: [{expert_ids.shape[0]}] "
                         "(one per token of expert_ids)")
    num_tokens, top_k = expert_ids.shape
    num_experts = table.count.shape[0]
    # A pair routes only with an id in range: a negative one would otherwise sort first
    # and index the table from its end, one >= E would take padding's slot 0.
    routed = valid[:, None] & (expert_ids >= 0) & (expert_ids < num_experts)
    flat = jnp.where(routed, expert_ids, num_experts).reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    sorted_ids = flat[order]
    # Each sorted pair's group starts at the last index where the id changed (a running
    # max, not jnp.searchsorted, whose loop XLA runs from the host on GPU).
    index = jnp.arange(flat.shape[0], dtype=jnp.int32)
    is_first = jnp.concatenate([jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])
    group_start = jax.lax.cummax(jnp.where(is_first, index, 0))
    position_sorted = index - group_start
    position = jnp.zeros_like(flat).at[order].set(position_sorted, unique_indices=True)
    ids = jnp.minimum(flat, num_experts - 1)
    count = jnp.maximum(table.count[ids], 1)
    replica = (position + rank_offset) % count
    slots = table.sorted_slots[table.first[ids] + replica]
    if local_rank is not None:
        local = local_replica(table, local_rank, num_ranks)[ids]
        slots = jnp.where(local >= 0, local, slots)
    # An expert without a slot (count 0) would read its neighbour's first replica.
    has_slot = routed & (table.count[ids] > 0).reshape(num_tokens, top_k)
    return jnp.where(has_slot, slots.reshape(num_tokens, top_k), jnp.where(valid[:, None], -1, 0))


def local_replica(table: ReplicaTable, rank: jax.Array | int, num_ranks: int) -> jax.Array:
    """int32 [E]: for each expert, its lowest replica slot on ``rank``, or -1 if none.

    ``num_ranks`` must divide the slots, and a concrete ``rank`` lie in ``[0, num_ranks)``:
    otherwise no slot (or the wrong ones) would count as local, silently.
    """
    num_slots = table.sorted_slots.shape[0]
    if not is_int(num_ranks) or num_ranks < 1 or num_slots % num_ranks:
        raise ValueError(f"num_ranks={num_ranks!r}; allowed: an int >= 1 that divides the "
                         f"{num_slots} slots")
    if not isinstance(rank, jax.core.Tracer) and not 0 <= int(rank) < num_ranks:
        raise ValueError(f"local_rank={rank!r}; allowed: [0, num_ranks={num_ranks})")
    per_rank = num_slots // num_ranks
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    on_rank = slots // per_rank == rank
    big = jnp.int32(num_slots)
    held = _held(table.slot_to_expert, table.count.shape[0])  # a negative entry would wrap
    best = jnp.full((table.count.shape[0],), big, jnp.int32).at[held].min(
        jnp.where(on_rank, slots, big), mode="drop")
    return jnp.where(best < big, best, -1)
