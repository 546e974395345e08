"""Dispatch plan: which rank and slot each token goes to, deduplicated per rank.

A token is sent to a rank at most once, however many of its top-k experts
live there; the row carries all of its (local slot, weight) pairs for that
rank (``-1`` / ``0`` for pairs that live elsewhere). Built on the source rank,
inside ``shard_map``, from static shapes only.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from wideep_jax._checks import is_int, is_mask_dtype


class DispatchPlan(NamedTuple):
    """Send-side layout shared by every communication backend.

    Buffer row ``i < send_count[r]`` of destination ``r`` holds local token
    ``send_token[r, i]``; rows past the count are padding (token 0, slots -1).
    """

    send_token: jax.Array  # int32 [R, C]
    send_count: jax.Array  # int32 [R]
    send_slot: jax.Array  # int32 [R, C, K]: local slot at the destination, -1 = not there
    send_weight: jax.Array  # float32 [R, C, K]: routing weight, 0 where send_slot == -1
    token_row: jax.Array  # int32 [T, R]: row of token t in destination r's buffer, -1 = not sent

    @property
    def num_ranks(self) -> int:
        return self.send_token.shape[0]

    @property
    def capacity(self) -> int:
        return self.send_token.shape[1]


def check_pairs(slots: jax.Array, weights: jax.Array, valid: jax.Array, *,
                names: tuple[str, str] = ("slots", "weights"), rows: str = "tokens") -> jax.Array:
    """Refuses a (slot, weight) pair table ``[N, K]`` and row mask ``[N]`` of other shapes,
    non-integer slots and a mask neither bool nor integer, naming the argument (``names``:
    how the caller calls the first two; ``rows``: what a row is); returns ``valid`` as bool
    (an int mask: nonzero is valid; a bitwise ``&`` with 2 would drop the row).

    Mismatched shapes would broadcast (one weight for every pair) or read clamped
    out-of-range rows, silently.
    """
    slot_name, weight_name = names
    if not jnp.issubdtype(slots.dtype, jnp.integer):
        # Float slots would be cut to integers (or fail as an unrelated indexing error).
        raise ValueError(f"{slot_name} has dtype {slots.dtype}; allowed: an integer dtype (slot ids)")
    if not is_mask_dtype(valid.dtype):
        raise ValueError(f"valid has dtype {valid.dtype}; allowed: bool (or 0/1 integers)")
    if slots.ndim != 2:
        raise ValueError(f"{slot_name} has shape {tuple(slots.shape)}; allowed: [{rows}, top_k]")
    if weights.shape != slots.shape:
        owner = f"{slot_name}'" if slot_name.endswith("s") else f"{slot_name}'s"
        raise ValueError(f"{weight_name} has shape {tuple(weights.shape)}; "
                         f"allowed: {owner} shape {tuple(slots.shape)}")
    if valid.shape != slots.shape[:1]:
        raise ValueError(f"valid has shape {tuple(valid.shape)}; allowed: [{slots.shape[0]}]")
    return valid.astype(bool)


def make_dispatch_plan(
    slots: jax.Array,
    weights: jax.Array,
    valid: jax.Array,
    *,
    num_ranks: int,
    slots_per_rank: int,
    capacity: int | None = None,
) -> DispatchPlan:
    """Builds the per-destination send buffers' layout.

    Args:
      slots: int32 [T, K] global slot of each routed pair; a pair outside
        [0, num_ranks * slots_per_rank) goes nowhere (not checked under jit; the MoE layer
        never produces one).
      weights: float [T, K] routing weights.
      valid: bool [T] real tokens; padding tokens go nowhere.
      num_ranks: EP group size R.
      slots_per_rank: S // R (an int).
      capacity: rows per destination buffer. ``None`` = T, which holds every
        token whatever the routing; a smaller value must come with a proof
        that no rank receives more (it is checked to be >= T here because no
        routing-independent bound below T exists).

    Returns:
      The plan; no pair with a slot in range is dropped.
    """
    # Mismatched shapes would broadcast (one weight for all pairs) and a size < 1 would
    # send every token nowhere: both silently, so they are refused here.
    valid = check_pairs(slots, weights, valid)
    num_tokens = slots.shape[0]
    # A float slots_per_rank (S / R written with `/`) would split the slots at fractional
    # boundaries: 30 / 8 = 3.75 sends slot 29 to rank 7 as its local slot 2, silently.
    for name, value in (("num_ranks", num_ranks), ("slots_per_rank", slots_per_rank)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r}; allowed: an int >= 1")
    if capacity is None:
        capacity = num_tokens
    if not is_int(capacity):
        raise ValueError(f"capacity={capacity!r}; allowed: an int >= the local token count "
                         f"{num_tokens}, or None")
    if capacity < num_tokens:
        raise ValueError(
            f"capacity={capacity} is below the local token count {num_tokens}: "
            "with adversarial routing every token can go to one rank, so tokens "
            "would be dropped; allowed: capacity >= tokens per rank"
        )
    dest = (slots // slots_per_rank).astype(jnp.int32)
    local_slot = (slots % slots_per_rank).astype(jnp.int32)
    ranks = jnp.arange(num_ranks, dtype=jnp.int32)
    goes_to = (dest[:, :, None] == ranks[None, None, :]).any(axis=1) & valid[:, None]  # [T, R]
    row = jnp.cumsum(goes_to, axis=0, dtype=jnp.int32) - 1
    token_row = jnp.where(goes_to, row, -1)
    send_count = goes_to.sum(axis=0, dtype=jnp.int32)
    # Invert token_row; rows that are not sent scatter out of bounds and drop.
    scatter_row = jnp.where(goes_to, row, capacity)
    tokens = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], goes_to.shape)
    send_token = (
        jnp.zeros((num_ranks, capacity), jnp.int32)
        .at[jnp.broadcast_to(ranks, goes_to.shape), scatter_row]
        .set(tokens, mode="drop", unique_indices=True)
    )
    live = jnp.arange(capacity, dtype=jnp.int32)[None, :] < send_count[:, None]  # [R, C]
    here = (dest[send_token] == ranks[:, None, None]) & live[:, :, None]  # [R, C, K]
    send_slot = jnp.where(here, local_slot[send_token], -1)
    send_weight = jnp.where(here, weights[send_token].astype(jnp.float32), 0.0)
    return DispatchPlan(send_token, send_count, send_slot, send_weight, token_row)
