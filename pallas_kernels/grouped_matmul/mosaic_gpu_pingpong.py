"""Ping-pong variant of the Mosaic GPU grouped matmul: one work item per consumer warpgroup.

The cooperative kernel (``mosaic_gpu.py``) has both consumer warpgroups share
each item, so the tensor cores idle while they run its epilogue. Here the two
consumers take a CTA's items in turns (even, odd) and each computes a whole
``tile_m x tile_n`` item: while one converts and stores its accumulator, the
other's MMAs run. One producer warpgroup streams every item's K steps through
one ring of shared-memory stages, so the next item's loads never wait for an
epilogue either. By Nsight Compute on one H200, a cooperative CTA spent 3 %
(gate/up) and 10 % (down) more cycles per item than its MMAs need.

Synchronisation is by hand (no ``emit_pipeline``): ``full[c, s]`` completes
when stage s holds a K step of consumer c's item (one barrier set per consumer,
so each consumer waits on every completion it is given and the barriers' phases
stay in step), ``consumed[s]`` when the owning consumer's wgmma has read it.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul.mosaic_gpu_epilogue import (consume_ring, drain_ring, epilogue_value,
                                                               store_rows, swizzled, work_item)

_CONSUMER_REGISTERS = 232  # what setmaxnreg leaves two consumers beside a 40-register producer
_PRODUCER_REGISTERS = 40


def kernel(
    walk_group, walk_start, walk_live_begin, walk_live_end, walk_col, num_tiles, x_gmem, w_gmem, scale_gmem,
    out_gmem,
    *, config, epilogue: str, n_out: int, row_align: int,
):
    """Kernel body over a grid named ``"sm"`` of CTAs with three warpgroups ``"wg"``
    (``mosaic_gpu.persistent_kernel``); arguments as the cooperative kernel's."""
    dtype, out_dtype = x_gmem.dtype, out_gmem.dtype
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    stages = config.max_concurrent_steps
    n_iters, k_iters = n_out // tile_n, x_gmem.shape[1] // tile_k
    num_acc = 2 if epilogue == "swiglu" else 1
    transforms = swizzled(tile_k, dtype)
    epi_m, epi_n = config.epi_tile_m, config.epi_tile_n
    out_transforms = swizzled(epi_n, out_dtype)

    walk = (walk_group, walk_start, walk_live_begin, walk_live_end, walk_col)

    def item_at(info):
        group, start, live_begin, live_end, j = work_item(info.index[0], walk, num_tiles, n_iters, config)
        return group, pl.multiple_of(start, row_align), live_begin, live_end, j

    def body(x_smem, w_smem, full, consumed, out_smem, part_smem):
        wg = lax.axis_index("wg")
        items = (num_tiles[0] * n_iters,)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

            @plgpu.nd_loop(items, collective_axes="sm")
            def _item(info):
                group, start, _, _, j = item_at(info)
                owner = info.local_index % 2

                @pl.loop(0, k_iters)
                def _step(kk):
                    step = info.local_index * k_iters + kk
                    slot = lax.rem(step, stages)

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(consumed.at[slot])

                    barrier = full.at[owner * stages + slot]
                    cols = pl.ds(pl.multiple_of(kk * tile_k, tile_k), tile_k)
                    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(start, tile_m), cols], x_smem.at[slot], barrier)
                    for a in range(num_acc):
                        w_cols = pl.ds(pl.multiple_of(j * tile_n + a * n_out, tile_n), tile_n)
                        plgpu.copy_gmem_to_smem(w_gmem.at[group, cols, w_cols], w_smem.at[a, slot], barrier)

            cta, num_ctas = lax.axis_index("sm"), lax.axis_size("sm")
            drain_ring(consumed, stages=stages,
                       total_steps=jnp.maximum(items[0] - cta + num_ctas - 1, 0) // num_ctas * k_iters)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")

            @plgpu.nd_loop(items, collective_axes="sm")
            def _item(info):
                @pl.when(info.local_index % 2 == wg)
                def _mine():
                    first_step = info.local_index * k_iters

                    def with_accs(*accs):
                        def mma(_, slot):
                            for a, acc in enumerate(accs):
                                plgpu.wgmma(acc, x_smem.at[slot], w_smem.at[a, slot])

                        consume_ring(full, consumed, full_base=wg * stages, stages=stages, first_step=first_step,
                                     num_steps=k_iters, mma=mma)
                        _, start, live_begin, live_end, j = item_at(info)
                        value = epilogue_value(epilogue, [acc[...] for acc in accs], scale_gmem, start)
                        store_rows(value.astype(out_dtype), None if out_smem is None else out_smem.at[wg],
                                   part_smem.at[wg], out_gmem, row0=start, col0=j * tile_n,
                                   begin=live_begin, end=live_end, epi_m=epi_m, epi_n=epi_n)

                    pl.run_scoped(with_accs, *[plgpu.ACC((tile_m, tile_n), jnp.float32) for _ in range(num_acc)])

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(
        body,
        x_smem=plgpu.SMEM((stages, tile_m, tile_k), dtype, transforms=transforms),
        w_smem=plgpu.SMEM((num_acc, stages, tile_k, tile_n), dtype, transforms=transforms),
        full=plgpu.Barrier(num_arrivals=1 + num_acc, num_barriers=2 * stages),
        consumed=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), out_dtype, transforms=out_transforms)
        if config.swizzled_epilogue else None,
        part_smem=plgpu.SMEM((2, 1 if config.swizzled_epilogue else 2, epi_m, epi_n), out_dtype),
        collective_axes="wg",
    )


def shared_memory_bytes(config, *, epilogue: str, itemsize: int = 2) -> int:
    """Shared memory the kernel allocates for ``config``: the stages and the epilogue buffers."""
    num_acc = 2 if epilogue == "swiglu" else 1
    stage = (config.tile_m * config.tile_k + num_acc * config.tile_k * config.tile_n) * itemsize
    epilogue_tiles = 6 if config.swizzled_epilogue else 4  # per consumer: 2 swizzled + 1 plain, or 2 plain
    return config.max_concurrent_steps * stage + epilogue_tiles * config.epi_tile_m * config.epi_tile_n * itemsize
