"""Ping-pong variant of the Mosaic GPU weight-gradient kernel: one work item per consumer.

In the cooperative dW kernel (``mosaic_gpu_tgmm.py``) both consumers share each
``tile_k x 2*tile_n`` item and every item restarts ``emit_pipeline``: the
producer only loads the next item's first rows once the last step is consumed,
each step waits for its own MMAs, and the tensor cores idle through the
epilogue. That costs much here, because an item's contraction is one group's
rows (512 at the prefill shapes: 8 steps) while its output tile is large.

Here the two consumers take a CTA's items in turns (even, odd), each computing a
whole ``tile_k x tile_n`` item; one producer streams every item's row steps
through one ring of shared-memory stages, so loads run ahead across items and
one consumer's epilogue overlaps the other's MMAs. A step's count of rows is
data (the group's size), so the ring position is carried through the item loop.

Synchronisation by hand, as in ``mosaic_gpu_pingpong.py``: ``full[c, s]``
completes when stage s holds a step of consumer c's item, ``consumed[s]`` when
its consumer's wgmma has read it. A block that holds rows outside its group
(neighbours' rows or NaN padding) is zeroed in shared memory by its consumer
(a select, not a multiply) before the MMA.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul.mosaic_gpu_epilogue import consume_ring, drain_ring, swizzled

_CONSUMER_REGISTERS = 232  # what setmaxnreg leaves two consumers beside a 40-register producer
_PRODUCER_REGISTERS = 40


def mask_rows(ref, row0, begin, end) -> None:
    """Zeroes the rows of a [rows, cols] shared-memory block (gmem rows row0 + i) outside [begin, end)."""
    row = row0 + plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, ref.shape, 0), plgpu.Layout.WGMMA)
    ref[...] = jnp.where((row >= begin) & (row < end), ref[...], jnp.zeros((), ref.dtype))


def store_slabs(acc, staging, out_gmem, *, group, row0, col0) -> None:
    """Stores an accumulator [tile_k, tile_n] to ``out_gmem[group, row0:, col0:]`` in row
    slabs through one consumer's shared-memory buffer ``staging`` [slab rows, tile_n]
    (a float32 dw tile does not fit beside the pipeline whole)."""
    slab_rows, tile_n = staging.shape
    for slab in range(acc.shape[0] // slab_rows):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this buffer's previous store
        staging[...] = acc[pl.ds(slab * slab_rows, slab_rows), :].astype(staging.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(staging, out_gmem.at[group, pl.ds(row0 + slab * slab_rows, slab_rows),
                                                     pl.ds(col0, tile_n)])


def shared_memory_bytes(config, store_rows: int, out_itemsize: int, itemsize: int = 2) -> int:
    """Shared memory of the ping-pong kernel: the stages and one output slab per consumer."""
    stage = config.block_rows * (config.tile_k + config.tile_n) * itemsize
    return config.max_concurrent_steps * stage + 2 * store_rows * config.tile_n * out_itemsize


def kernel(group_start, group_end, x_gmem, dy_gmem, out_gmem, *, config, num_groups: int, row_align: int,
           store_rows: int):
    """Kernel body over a grid named ``"sm"`` of CTAs with three warpgroups ``"wg"``
    (``mosaic_gpu.persistent_kernel``); arguments as the cooperative dW kernel's."""
    dtype, out_dtype = x_gmem.dtype, out_gmem.dtype
    k, n = x_gmem.shape[1], dy_gmem.shape[1]
    tile_k, tile_n, rows = config.tile_k, config.tile_n, config.block_rows
    stages = config.max_concurrent_steps
    k_tiles, n_tiles = k // tile_k, n // tile_n
    per_group = k_tiles * n_tiles
    transforms = swizzled(64, dtype)
    items = (num_groups * per_group,)

    def item_at(index):
        """Group, K and N tile, group bounds, first (aligned) row and row steps of an item."""
        g = lax.div(index, jnp.int32(per_group))
        kt, nt = plgpu.planar_snake(lax.rem(index, jnp.int32(per_group)), (k_tiles, n_tiles), 1,
                                    config.grid_tile_width)
        begin, end = group_start[g], group_end[g]
        first = pl.multiple_of(begin // row_align * row_align, row_align)
        # An empty group still runs one step, all of it masked: its tile comes out zero.
        steps = jnp.maximum((end - first + rows - 1) // rows, 1)
        return g, kt, nt, begin, end, first, steps

    def body(x_smem, dy_smem, full, consumed, out_smem):
        wg = lax.axis_index("wg")

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

            @plgpu.nd_loop(items, collective_axes="sm", init_carry=jnp.int32(0))
            def issued(info, carry):
                _, kt, nt, _, _, first, steps = item_at(info.index[0])
                owner = info.local_index % 2

                @pl.loop(0, steps)
                def _step(s):
                    step = carry + s
                    slot = lax.rem(step, stages)

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(consumed.at[slot])

                    barrier = full.at[owner * stages + slot]
                    row0 = pl.multiple_of(first + s * rows, row_align)
                    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(row0, rows), pl.ds(kt * tile_k, tile_k)],
                                            x_smem.at[slot], barrier)
                    plgpu.copy_gmem_to_smem(dy_gmem.at[pl.ds(row0, rows), pl.ds(nt * tile_n, tile_n)],
                                            dy_smem.at[slot], barrier)

                return carry + steps

            drain_ring(consumed, stages=stages, total_steps=issued)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")

            @plgpu.nd_loop(items, collective_axes="sm", init_carry=jnp.int32(0))
            def _item(info, carry):
                g, kt, nt, begin, end, first, steps = item_at(info.index[0])

                @pl.when(info.local_index % 2 == wg)
                def _mine():
                    def with_acc(acc):
                        def mma(s, slot):
                            row0 = first + s * rows

                            @pl.when((row0 < begin) | (row0 + rows > end))
                            def _():
                                mask_rows(x_smem.at[slot], row0, begin, end)
                                mask_rows(dy_smem.at[slot], row0, begin, end)
                                plgpu.commit_smem()

                            plgpu.wgmma(acc, x_smem.at[slot].transpose((1, 0)), dy_smem.at[slot])

                        consume_ring(full, consumed, full_base=wg * stages, stages=stages, first_step=carry,
                                     num_steps=steps, mma=mma)
                        store_slabs(acc, out_smem.at[wg], out_gmem, group=g, row0=kt * tile_k, col0=nt * tile_n)

                    pl.run_scoped(with_acc, plgpu.ACC((tile_k, tile_n), jnp.float32))

                return carry + steps

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(
        body,
        x_smem=plgpu.SMEM((stages, rows, tile_k), dtype, transforms=transforms),
        dy_smem=plgpu.SMEM((stages, rows, tile_n), dtype, transforms=transforms),
        full=plgpu.Barrier(num_arrivals=2, num_barriers=2 * stages),
        consumed=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        out_smem=plgpu.SMEM((2, store_rows, tile_n), out_dtype, transforms=swizzled(tile_n, out_dtype)),
        collective_axes="wg",
    )
