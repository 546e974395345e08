"""Row-tile schedule shared by the Pallas grouped-matmul kernels.

A tile is ``block_m`` consecutive rows serving one group. The first tile of a
group starts at the group's first row rounded down to a multiple of ``align``
(Mosaic GPU's tiled TMA loads need 8-aligned rows), so a tile may begin with a
few rows of the previous group: it computes them but stores only its live rows
``[start + live_begin, start + live_end)``. Tiles are numbered group by group; only the first
``num_tiles`` are real, so empty groups cost nothing and rows at or past
``sum(group_sizes)`` are never touched. Computed in XLA (a few tiny ops) and
read by the kernel as scalars.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TileSchedule(NamedTuple):
    group: jax.Array  # int32 [T] group of tile t
    start: jax.Array  # int32 [T] first row of tile t (a multiple of align)
    live_begin: jax.Array  # int32 [T] first live row, relative to start
    live_end: jax.Array  # int32 [T] end of the live rows, relative to start (<= block_m)
    num_tiles: jax.Array  # int32 [1] number of real tiles


def max_tiles(num_rows: int, num_groups: int, block_m: int, align: int = 1) -> int:
    """Static bound on the tiles any ``group_sizes`` with sum <= num_rows needs."""
    # A group of s rows spans at most s + align - 1 aligned rows, so it needs at most
    # (s + align - 2) // b + 1 tiles; summed over nnz <= min(G, M) non-empty groups.
    nonempty = min(num_groups, num_rows)
    return max(1, (num_rows + nonempty * (align - 2)) // block_m + nonempty)


def tile_schedule(
    group_sizes: jax.Array, num_rows: int, block_m: int, align: int = 1
) -> TileSchedule:
    """Tiles of ``block_m`` rows for rows grouped by ``group_sizes``.

    Group sizes are clipped so that no tile reaches past ``num_rows`` (an
    over-full ``group_sizes`` can never make a kernel write out of bounds).
    """
    num_groups = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    sizes = ends - starts
    first_row = starts // align * align
    span = jnp.where(sizes > 0, ends - first_row, 0)
    tiles_per_group = (span + block_m - 1) // block_m
    tile_ends = jnp.cumsum(tiles_per_group)
    total = max_tiles(num_rows, num_groups, block_m, align)
    t = jnp.arange(total, dtype=jnp.int32)
    # compare_all: G x T compares in one fusion; the default method is a loop, which
    # XLA's GPU runtime drives from the host, one iteration at a time.
    group = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right", method="compare_all"), num_groups - 1)
    group = group.astype(jnp.int32)
    local = t - (tile_ends[group] - tiles_per_group[group])
    start = first_row[group] + local * block_m
    real = t < tile_ends[-1]
    live_begin = jnp.where(real, jnp.clip(starts[group] - start, 0, block_m), 0)
    live_end = jnp.where(real, jnp.clip(ends[group] - start, 0, block_m), 0)
    as_i32 = lambda a: a.astype(jnp.int32)
    return TileSchedule(as_i32(group), as_i32(start), as_i32(live_begin), as_i32(live_end),
                        as_i32(tile_ends[-1:]))
