"""Helpers shared by the Mosaic GPU grouped-matmul kernels (cooperative, ping-pong and dW):
shared-memory tile layouts, the work-item walk, the epilogue, and the ping-pong kernels'
ring of stages."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_LOG2E = math.log2(math.e)


def swizzled(cols: int, dtype) -> tuple:
    """Shared-memory transforms of a tile whose rows hold ``cols`` elements of ``dtype``:
    8-row tiles as wide as the largest swizzle that fits a row, swizzled (no bank
    conflicts for wgmma and TMA)."""
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def work_item(index, walk, num_tiles, n_iters: int, config):
    """(group, first row, live begin, live end, column tile) of the ``index``-th work item.

    ``walk`` holds per-item arrays (group, start, live_begin, live_end, col) of
    ``schedule.group_band_walk`` when ``config.walk`` is not ``"snake"``; otherwise the
    tile schedule's per-tile arrays (and an unused col), walked as a planar snake over
    ``num_tiles[0]`` row tiles and ``n_iters`` column tiles in bands of
    ``config.grid_tile_width``."""
    group, start, live_begin, live_end, col = walk
    if config.walk != "snake":
        return group[index], start[index], live_begin[index], live_end[index], col[index]
    minor = 0 if config.grid_minor == "m" else 1
    t, j = plgpu.planar_snake(index, (num_tiles[0], n_iters), minor, config.grid_tile_width)
    return group[t], start[t], live_begin[t], live_end[t], j


def silu_times(gate: jax.Array, up: jax.Array) -> jax.Array:
    return gate / (1.0 + jnp.exp2(gate * -_LOG2E)) * up


def epilogue_value(epilogue: str, accs: list, scale_gmem, row0) -> jax.Array:
    """The f32 tile an item stores: ``silu(gate) * up`` of its two accumulators
    ("swiglu"), its accumulator times rows ``row0 + i`` of ``scale_gmem``
    ("row_scale"), or its accumulator ("none")."""
    if epilogue == "swiglu":
        return silu_times(accs[0], accs[1])
    if epilogue == "row_scale":
        scale = plgpu.load(scale_gmem.at[pl.ds(row0, accs[0].shape[0])],
                           layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
        return accs[0] * lax.broadcast_in_dim(scale, accs[0].shape, [0])
    return accs[0]


def store_rows(value, full_smem, part_smem, out_gmem, *, row0, col0, begin, end, epi_m, epi_n):
    """Stores rows [begin, end) of ``value`` [tile_m, tile_n] to out rows row0 + i, cols col0 + j.

    ``part_smem`` [slots, epi_m, epi_n] is unswizzled: a TMA box may start at any
    row of it. ``full_smem`` [2, epi_m, epi_n] (swizzled) or None takes whole tiles.
    """
    tile_m, tile_n = value.shape
    part_slots = part_smem.shape[0]
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous item's stores
    for mi in range(tile_m // epi_m):
        first = jnp.clip(begin - mi * epi_m, 0, epi_m)
        live_here = jnp.clip(end - mi * epi_m, 0, epi_m) - first
        whole = (first == 0) & (live_here == epi_m)
        tiles = [(ni, value[mi * epi_m:(mi + 1) * epi_m, ni * epi_n:(ni + 1) * epi_n],
                  out_gmem.at[pl.ds(row0 + mi * epi_m, epi_m), pl.ds(col0 + ni * epi_n, epi_n)])
                 for ni in range(tile_n // epi_n)]

        if full_smem is not None:
            @pl.when(whole)
            def _():
                for ni, tile, dst in tiles:
                    slot = (mi * len(tiles) + ni) % 2
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                    full_smem[slot] = tile
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(full_smem.at[slot], dst)

        @pl.when((live_here > 0) & (~whole if full_smem is not None else True))
        def _():
            for ni, tile, dst in tiles:
                slot = (mi * len(tiles) + ni) % part_slots
                plgpu.wait_smem_to_gmem(part_slots - 1, wait_read_only=True)
                part_smem[slot] = tile
                plgpu.commit_smem()
                # TMA boxes are static: store live rows as a ladder of power-of-two boxes.
                done = first
                size = epi_m
                while size >= 1:
                    @pl.when((live_here & size) != 0)
                    def _(size=size, done=done):
                        plgpu.copy_smem_to_gmem(part_smem.at[slot, pl.ds(done, size)],
                                                dst.at[pl.ds(done, size)])
                    done = done + (live_here & size)
                    size //= 2


def consume_ring(full, consumed, *, full_base, stages: int, first_step, num_steps, mma) -> None:
    """One consumer's pass over ``num_steps`` stages of a shared-memory ring, from ring
    position ``first_step``: waits for each stage (``full.at[full_base + slot]``), calls
    ``mma(kk, slot)`` to issue its wgmma, keeps one wgmma group in flight and hands
    each stage back (``consumed.at[slot]``) once the MMAs that read it are done."""
    @pl.loop(0, num_steps)
    def _step(kk):
        step = first_step + kk
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(full.at[full_base + slot])
        mma(kk, slot)
        # One wgmma group stays in flight; the one before it is done, so its stage
        # goes back to the producer.
        plgpu.wgmma_wait(1)

        @pl.when(kk > 0)
        def _():
            plgpu.barrier_arrive(consumed.at[lax.rem(step - 1, stages)])

    plgpu.wgmma_wait(0)
    plgpu.barrier_arrive(consumed.at[lax.rem(first_step + num_steps - 1, stages)])


def drain_ring(consumed, *, stages: int, total_steps) -> None:
    """The producer's waits for the last ``stages`` releases of ``total_steps`` ring
    steps: every barrier phase is then seen by each thread that waits on it (Mosaic
    GPU's interpreter checks this)."""
    @pl.loop(jnp.maximum(total_steps - stages, 0), total_steps)
    def _drain(step):
        plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])
