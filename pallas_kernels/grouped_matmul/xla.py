"""Pure-XLA grouped matmul: a dynamic-trip-count loop over (tile, group) work items.

Work is proportional to the real rows: rows past sum(group_sizes) and groups with
zero rows are never touched. The work-item list follows megablox's group metadata:
each group visits the block_m-row tiles it overlaps, so there are at most
cdiv(M, block_m) + G - 1 items; a `lax.while_loop` runs only the live ones.

Not reverse-differentiable by itself (dynamic while_loop); `api` adds the VJP.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped_matmul.config import GroupedMatmulConfig
from pallas_kernels.grouped_matmul.schedule import clipped_sizes


class WorkItems(NamedTuple):
    """Per-item (group, tile) pairs; only the first `num_items` are live."""

    group_ids: jax.Array  # int32 [max_items]
    tile_ids: jax.Array  # int32 [max_items]
    num_items: jax.Array  # int32 []
    group_starts: jax.Array  # int32 [G], first row of each group
    group_ends: jax.Array  # int32 [G], one past the last row of each group


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_work_items(
    group_sizes: jax.Array, num_rows: int, block_m: int, num_groups: int | None = None
) -> WorkItems:
    """Vectorised work-item list; groups >= num_groups are skipped (for tgmm)."""
    num_all_groups = group_sizes.shape[0]
    num_groups = num_all_groups if num_groups is None else num_groups
    # As `schedule.tile_schedule`: negative sizes count as 0, and groups are clipped
    # at num_rows (an over-full group_sizes never slices out of bounds, and a group
    # cut at num_rows never reaches back into its predecessor's rows). Each size is
    # clipped to [0, num_rows] first, so that the int32 cumsum cannot overflow.
    sizes = clipped_sizes(group_sizes, num_rows)
    cum = jnp.cumsum(sizes)
    ends = jnp.minimum(cum, num_rows)
    starts = jnp.minimum(cum - sizes, num_rows)
    live = (ends > starts) & (jnp.arange(num_all_groups) < num_groups)
    first_tile = starts // block_m
    last_tile = (ends - 1) // block_m
    counts = jnp.where(live, last_tile - first_tile + 1, 0)
    cum_counts = jnp.cumsum(counts)
    max_items = _cdiv(num_rows, block_m) + num_all_groups - 1
    item = jnp.arange(max_items, dtype=jnp.int32)
    # Item i belongs to the first group whose cumulative count exceeds i.
    group_ids = jnp.searchsorted(cum_counts, item, side="right", method="compare_all").astype(jnp.int32)
    group_ids = jnp.minimum(group_ids, num_all_groups - 1)  # dead items: keep in range
    tile_ids = first_tile[group_ids] + item - (cum_counts[group_ids] - counts[group_ids])
    return WorkItems(group_ids, tile_ids.astype(jnp.int32), cum_counts[-1], starts, ends)


def _tile_rows(
    items: WorkItems, i: jax.Array, num_rows: int, block_m: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(group, slice start, row mask) of work item i.

    The last tile's slice is clamped to end at num_rows instead of padding x (no
    copy); rows it shares with the previous tile are masked out by the tile-start
    bound, so no row is counted twice.
    """
    g = items.group_ids[i]
    tile_start = items.tile_ids[i] * block_m
    start = jnp.minimum(tile_start, num_rows - block_m)
    rows = start + jnp.arange(block_m, dtype=jnp.int32)
    lo = jnp.maximum(items.group_starts[g], tile_start)
    mask = (rows >= lo) & (rows < items.group_ends[g])
    return g, start, mask


def gmm(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    config: GroupedMatmulConfig,
    preferred_element_type: jnp.dtype,
) -> jax.Array:
    """out[rows_g] = x[rows_g] @ w[g]; padding rows are 0. Shapes checked by `api`."""
    m, (num_groups, _, n) = x.shape[0], w.shape
    if m == 0 or num_groups == 0:
        return jnp.zeros((m, n), preferred_element_type)
    block_m = min(config.block_m, m)  # one tile covers a small M; no padding needed
    compute_dtype = jnp.result_type(x, w)
    x, w = x.astype(compute_dtype), w.astype(compute_dtype)
    items = make_work_items(group_sizes, m, block_m)

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, out = carry
        g, start, mask = _tile_rows(items, i, m, block_m)
        x_tile = lax.dynamic_slice_in_dim(x, start, block_m, axis=0)
        w_g = lax.dynamic_index_in_dim(w, g, axis=0, keepdims=False)
        y = jnp.dot(x_tile, w_g, preferred_element_type=jnp.float32)
        # Each row belongs to one group, so a select (not an add) writes it exactly
        # once and lets the output itself be the accumulator in its final dtype.
        old = lax.dynamic_slice_in_dim(out, start, block_m, axis=0)
        new = jnp.where(mask[:, None], y.astype(out.dtype), old)
        return i + 1, lax.dynamic_update_slice_in_dim(out, new, start, axis=0)

    out = jnp.zeros((m, n), preferred_element_type)
    _, out = lax.while_loop(lambda c: c[0] < items.num_items, body, (jnp.int32(0), out))
    return out


def tgmm(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int,
    config: GroupedMatmulConfig,
    preferred_element_type: jnp.dtype,
) -> jax.Array:
    """dw[g] = x[rows_g].T @ dy[rows_g] for g < num_groups; empty groups are 0."""
    (m, k), n = x.shape, dy.shape[1]
    if m == 0 or num_groups == 0:
        return jnp.zeros((num_groups, k, n), preferred_element_type)
    block_m = min(config.block_m, m)
    compute_dtype = jnp.result_type(x, dy)
    x, dy = x.astype(compute_dtype), dy.astype(compute_dtype)
    items = make_work_items(group_sizes, m, block_m, num_groups)

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, dw = carry
        g, start, mask = _tile_rows(items, i, m, block_m)
        # Mask both sides: 0 * NaN in a garbage padding row would still poison dw.
        x_tile = jnp.where(mask[:, None], lax.dynamic_slice_in_dim(x, start, block_m), 0)
        dy_tile = jnp.where(mask[:, None], lax.dynamic_slice_in_dim(dy, start, block_m), 0)
        contrib = lax.dot_general(
            x_tile, dy_tile, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        dw_g = lax.dynamic_index_in_dim(dw, g, axis=0, keepdims=True)
        return i + 1, lax.dynamic_update_index_in_dim(dw, dw_g + contrib[None], g, axis=0)

    # A group spans several tiles, so partial sums accumulate in float32.
    dw = jnp.zeros((num_groups, k, n), jnp.float32)
    _, dw = lax.while_loop(lambda c: c[0] < items.num_items, body, (jnp.int32(0), dw))
    return dw.astype(preferred_element_type)
