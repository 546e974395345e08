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


def clipped_sizes(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """int32 [G]: each size clipped to [0, num_rows], as every implementation reads them.

    Clipped before the cast to int32 (a uint32 size past 2**31 would wrap negative) and
    in at least int32 (an int8 ``group_sizes`` cannot hold ``num_rows``: clipped in int8,
    the bound itself wraps). Clipping each size first also keeps an int32 cumsum of sizes
    near int32's max from overflowing.
    """
    if jnp.dtype(group_sizes.dtype).itemsize < 4:
        group_sizes = group_sizes.astype(jnp.int32)
    return jnp.clip(group_sizes, 0, num_rows).astype(jnp.int32)


def group_bounds(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """int32 [G] (starts, ends): group g owns rows [starts[g], ends[g]). Negative sizes
    count as 0 and the groups reaching past ``num_rows`` are cut there."""
    ends = jnp.minimum(jnp.cumsum(clipped_sizes(group_sizes, num_rows)), num_rows)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])[:-1], ends  # G = 0: two empty arrays


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
    starts, ends = group_bounds(group_sizes, num_rows)
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


class ItemWalk(NamedTuple):
    """Work items in launch order: item ``i`` computes column tile ``col[i]`` of the row tile
    at ``start[i]`` (group ``group[i]``, live rows ``[live_begin[i], live_end[i])``)."""

    group: jax.Array  # int32 [T * n_iters]
    start: jax.Array
    live_begin: jax.Array
    live_end: jax.Array
    col: jax.Array


def group_band_walk(schedule: TileSchedule, n_iters: int, max_width: int,
                    mix_widths: bool = False) -> ItemWalk:
    """The items of ``schedule`` (``n_iters`` column tiles per row tile) walked in bands that
    never mix groups: a group's row tiles are cut into the fewest bands of at most
    ``max_width`` tiles (sizes within one of each other), and a band walks its columns
    one by one, row tiles fastest, snaking from one of the group's bands to the next.

    Why: the items that run together then share one weight column tile, read from HBM
    once per band. A fixed-width snake over all tiles lets a band straddle two groups,
    which reads both groups' weights for it; at Zipf sizes, most bands straddle.
    Item ``i`` lies in the band holding row tile ``i // n_iters`` (a band of w tiles
    owns items ``[b0 * n_iters, (b0 + w) * n_iters)``), so the mapping is gathers only.

    ``mix_widths``: the bands are reordered so that every stretch of the walk holds bands of
    every width in proportion, each width's bands in group order. Why: a band of one row
    tile reads a whole weight column tile per item, so a run of small groups is bound by
    HBM while a run of wide bands is bound by the MMAs; with bands mixed, the items that
    run together (one per SM) ask for about the average weight bandwidth.
    """
    if max_width < 1:
        raise ValueError(f"group_band_walk needs max_width >= 1, got {max_width}")
    num_tiles = schedule.group.shape[0]
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    # Tiles past the real ones get keys of their own: bands of one tile, items past the real ones.
    key = jnp.where(t < schedule.num_tiles[0], schedule.group, -1 - t)
    boundary = key[1:] != key[:-1]
    first = jnp.concatenate([jnp.ones((1,), bool), boundary])
    last = jnp.concatenate([boundary, jnp.ones((1,), bool)])
    run_first = jax.lax.cummax(jnp.where(first, t, 0))
    run_last = jax.lax.cummin(jnp.where(last, t, num_tiles), reverse=True)
    local, run = t - run_first, run_last - run_first + 1
    bands = (run + max_width - 1) // max_width
    base, extra = run // bands, run % bands  # `extra` bands of base + 1 tiles, then bands of base
    wide = extra * (base + 1)
    band = jnp.where(local < wide, local // (base + 1), extra + (local - wide) // base)
    width = base + (band < extra).astype(jnp.int32)
    band_first = run_first + jnp.where(band < extra, band * (base + 1), wide + (band - extra) * base)

    if mix_widths:
        # A band's key: where it falls, as a fraction, among the real bands of its width;
        # bands past the real tiles last. Ranks and slots by T x T compares (a few fusions;
        # T is a few hundred), not a sort and a scatter.
        real = t < schedule.num_tiles[0]
        head = (t == band_first) & real
        same_width = head[None, :] & (width[None, :] == width[:, None])  # [h, u]
        rank = jnp.sum(same_width & (t[None, :] < t[:, None]), axis=1)
        count = jnp.sum(same_width, axis=1)
        key = jnp.where(head, (2 * rank + 1) / jnp.maximum(2 * count, 1), jnp.where(real, 0.0, 2.0))
        # A head's slot: the tiles of the bands before it (by key, then by position).
        before = head[None, :] & ((key[None, :] < key[:, None])
                                  | ((key[None, :] == key[:, None]) & (t[None, :] < t[:, None])))
        head_slot = jnp.sum(jnp.where(before, width[None, :], 0), axis=1)
        slot = jnp.where(real, head_slot[band_first] + t - band_first, t)  # tile -> slot
        order = jnp.sum(jnp.where(slot[None, :] == t[:, None], t[None, :], 0), axis=1)  # slot -> tile
    else:
        order = slot = t

    i = jnp.arange(num_tiles * n_iters, dtype=jnp.int32)
    s = order[i // n_iters]
    first_tile, w, backwards = band_first[s], width[s], band[s] % 2 == 1
    r = i - slot[first_tile] * n_iters
    tile = first_tile + r % w
    col = jnp.where(backwards, n_iters - 1 - r // w, r // w)
    return ItemWalk(schedule.group[tile], schedule.start[tile], schedule.live_begin[tile],
                    schedule.live_end[tile], col.astype(jnp.int32))
