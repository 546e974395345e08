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


def interleaved_items(schedule: TileSchedule, n_iters: int, width: int) -> jax.Array:
    """Work items (row tile ``t``, column tile ``j``) packed as ``t * n_iters + j``, in an order
    that spreads the weight-bound items evenly among the compute-bound ones.

    The kernels walk items as a planar snake over row tiles in bands of ``width``: the items
    of a band and column share one weight column tile (read once, through L2) when the
    band's row tiles serve one group. With skewed group sizes, bands of small groups share
    little, and walking them in turn makes stretches of the launch that stream weights while
    the tensor cores wait (a band of four one-tile groups reads four times the weight bytes
    per FLOP). Here each item of a band whose own group holds at least 3/4 of the band's
    row tiles counts as compute-bound ("rich"), the rest as weight-bound; both lists keep
    the snake's order and are merged so that every stretch of the launch gets its share of
    each. The first ``num_tiles * n_iters`` entries are the real items (a permutation of
    them); the rest are never read.
    """
    total = schedule.group.shape[0]
    real = schedule.num_tiles[0]
    s = jnp.arange(total * n_iters, dtype=jnp.int32)
    band_items = width * n_iters
    full_bands = real // width
    last_width = jnp.maximum(real - full_bands * width, 1)
    in_full = s < full_bands * band_items
    band = jnp.where(in_full, s // band_items, full_bands)
    within = jnp.where(in_full, s % band_items, s - full_bands * band_items)
    band_width = jnp.where(in_full, width, last_width)
    col = within // band_width
    col = jnp.where(band % 2 == 0, col, n_iters - 1 - col)  # the snake: odd bands walk columns back
    t = band * width + within % band_width
    valid = s < real * n_iters
    t = jnp.where(valid, t, 0)
    group = schedule.group[t]
    share = sum(jnp.where((r < band_width) & (band * width + r < real),
                          schedule.group[jnp.minimum(band * width + r, total - 1)] == group, False)
                for r in range(width)).astype(jnp.int32)
    rich = valid & (4 * share >= 3 * band_width)
    poor = valid & ~rich
    rank_rich = jnp.cumsum(rich.astype(jnp.int32)) - 1
    rank_poor = jnp.cumsum(poor.astype(jnp.int32)) - 1
    n_rich = jnp.maximum(rank_rich[-1] + 1, 1).astype(jnp.float32)
    n_poor = jnp.maximum(rank_poor[-1] + 1, 1).astype(jnp.float32)
    key = jnp.where(rich, (rank_rich + 0.5) / n_rich, (rank_poor + 0.5) / n_poor)
    key = jnp.where(valid, key, 2.0)  # past the real items: last, never read
    order = jnp.argsort(key, stable=True)
    return (t * n_iters + col)[order].astype(jnp.int32)
