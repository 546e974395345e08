"""Weight gradient of the grouped matmul for Hopper in Pallas Mosaic GPU.

``dw[g] = x[rows_g]^T @ dy[rows_g]``: the contraction runs over each group's
rows, so its length is data (the pipeline's step count is read per item). One
CTA per SM loops over (group, K tile, N tile) work items, group by group so a
group's rows stay in L2 while its tiles are computed. Each item runs a TMA
pipeline over the group's rows (one producer warpgroup, two consumer
warpgroups side by side along N issuing wgmma with x transposed in shared
memory), then stores its tile. The group's first and last row blocks may hold
rows of its neighbours or padding (NaN allowed): those rows are zeroed in
shared memory (a select, not a multiply) before the MMAs. Empty groups give
zeros.

This is the cooperative form; ``consumers="pingpong"`` runs
``mosaic_gpu_tgmm_pingpong`` (loads stream across items, one consumer's epilogue
overlaps the other's MMAs), the default where its tiles divide dw: sustained on
one H200 at the prefill shapes it runs 1.06-1.13x torch's grouped mm and
1.07-1.28x JAX's ``transposed_ragged_dot_mgpu`` (RESULTS.md, wgrad). CPU: Mosaic
GPU's interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul import mosaic_gpu_tgmm_pingpong
from pallas_kernels.grouped_matmul.mosaic_gpu import _ROW_ALIGN, _SMEM_BYTES, persistent_kernel
from pallas_kernels.grouped_matmul.mosaic_gpu_epilogue import swizzled
from pallas_kernels.grouped_matmul.mosaic_gpu_tgmm_pingpong import mask_rows, store_slabs
from pallas_kernels.grouped_matmul.schedule import group_bounds

_INTERPRET_CTAS = 3
# One consumer's output staging buffer in shared memory; ping-pong keeps more stages instead.
_OUT_STAGE_BYTES = {"cooperative": 32 * 1024, "pingpong": 16 * 1024}


def _store_rows(config: "MosaicTgmmConfig", out_dtype) -> int:
    """Rows of the output tile staged per store: all of tile_k when they fit the
    consumer's staging buffer, else the largest multiple of 64 that does (at least 64)."""
    fit = _OUT_STAGE_BYTES[config.consumers] // (config.tile_n * jnp.dtype(out_dtype).itemsize) // 64 * 64
    rows = min(config.tile_k, max(fit, 64))
    while config.tile_k % rows:
        rows -= 64
    return rows


@dataclasses.dataclass(frozen=True)
class MosaicTgmmConfig:
    """Tiling of the Mosaic GPU transposed grouped matmul (static, hashable).

    Attributes:
      tile_k, tile_n: one consumer warpgroup's output tile (rows of dw[g] along
        K, columns along N). Cooperative: the two consumers sit side by side
        along N, so a work item is ``tile_k x 2*tile_n``; ping-pong: each
        consumer computes whole ``tile_k x tile_n`` items, in turns.
      block_rows: rows of x and dy per pipeline step (the contraction step).
      max_concurrent_steps: pipeline stages in shared memory.
      grid_tile_width: planar-snake band width over a group's (K, N) tiles.
      max_ctas: persistent CTAs to launch (None: one per SM).
      consumers: "cooperative" (``emit_pipeline`` per item) or "pingpong"
        (``mosaic_gpu_tgmm_pingpong``: loads stream across items, one
        consumer's epilogue overlaps the other's MMAs).
    """

    tile_k: int = 128
    tile_n: int = 128
    block_rows: int = 64
    max_concurrent_steps: int = 3
    grid_tile_width: int = 4
    max_ctas: int | None = None
    consumers: Literal["cooperative", "pingpong"] = "cooperative"

    def __post_init__(self) -> None:
        for name in ("tile_k", "tile_n", "block_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 64:
                raise ValueError(f"MosaicTgmmConfig.{name} must be a positive multiple of 64, got {value!r}")
        if self.max_concurrent_steps < 2 or self.grid_tile_width < 1:
            raise ValueError("MosaicTgmmConfig needs max_concurrent_steps >= 2 and grid_tile_width >= 1, got "
                             f"{self.max_concurrent_steps}, {self.grid_tile_width}")
        if self.consumers not in ("cooperative", "pingpong"):
            raise ValueError(f"MosaicTgmmConfig.consumers must be 'cooperative' or 'pingpong', got {self.consumers!r}")
        if self.consumers == "pingpong" and self.tile_k * self.tile_n > 128 * 128:
            raise ValueError(f"MosaicTgmmConfig(consumers='pingpong'): one warpgroup holds the whole {self.tile_k}x"
                             f"{self.tile_n} accumulator; at most 128x128 elements (128 registers a thread) fit")

    @property
    def item_n(self) -> int:
        """Columns of dw one work item computes."""
        return self.tile_n * (2 if self.consumers == "cooperative" else 1)


def default_config(k: int, n: int) -> MosaicTgmmConfig | None:
    """Tiles for dw of shape [K, N]: ping-pong 128x128 items with 5 stages where they
    divide it (sustained on one H200 it beat the cooperative 128 x 2*128 tiles by up to
    19 %; 5 stages also fit a float32 dw), else cooperative 64 x 2*64; None when K is
    not a multiple of 64 or N of 128."""
    for config in (MosaicTgmmConfig(consumers="pingpong", max_concurrent_steps=5),
                   MosaicTgmmConfig(tile_k=64, tile_n=64, max_concurrent_steps=4)):
        if k % config.tile_k == 0 and n % config.item_n == 0:
            return config
    return None


def _kernel(group_start, group_end, x_gmem, dy_gmem, out_gmem, *, config: MosaicTgmmConfig, num_groups: int):
    dtype = x_gmem.dtype
    m, k = x_gmem.shape
    n = dy_gmem.shape[1]
    tile_k, tile_n, rows = config.tile_k, config.tile_n, config.block_rows
    cta_n = 2 * tile_n
    k_tiles, n_tiles = k // tile_k, n // cta_n
    transforms = swizzled(64, dtype)
    # The output tile goes out through shared memory in row slabs of at most
    # _OUT_STAGE_BYTES per consumer, so a float32 dw fits beside the pipeline.
    store_rows = _store_rows(config, out_gmem.dtype)
    out_transforms = swizzled(tile_n, out_gmem.dtype)

    def pipeline(body, compute_context, steps):
        x_spec = plgpu.BlockSpec((rows, tile_k), lambda r: (r, 0), transforms=transforms)
        dy_spec = plgpu.BlockSpec((rows, cta_n), lambda r: (r, 0), transforms=transforms)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=40, in_specs=[x_spec, dy_spec], wg_axis="wg",
            num_compute_wgs=2, max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # the allocations depend only on the specs
    allocations = pipeline(ignore, ignore, config.max_concurrent_steps).get_allocations(
        x_gmem.at[:, pl.ds(0, tile_k)], dy_gmem.at[:, pl.ds(0, cta_n)])

    @functools.partial(pl.run_scoped, allocs=allocations,
                       out_smem=plgpu.SMEM((2, store_rows, tile_n), out_gmem.dtype, transforms=out_transforms),
                       collective_axes="wg")
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_groups * k_tiles * n_tiles,), collective_axes="sm")
        def _item(info):
            g = lax.div(info.index[0], jnp.int32(k_tiles * n_tiles))
            kt, nt = plgpu.planar_snake(lax.rem(info.index[0], jnp.int32(k_tiles * n_tiles)),
                                        (k_tiles, n_tiles), 1, config.grid_tile_width)
            begin, end = group_start[g], group_end[g]
            first = pl.multiple_of(begin // _ROW_ALIGN * _ROW_ALIGN, _ROW_ALIGN)
            # An empty group still runs one step, all of it masked: its tile comes out zero.
            steps = jnp.maximum((end - first + rows - 1) // rows, 1)

            def mma(idx, x_smem, dy_smem, acc):
                row0 = first + idx[0] * rows
                dy_mine = dy_smem.at[:, pl.ds(pl.multiple_of(wg * tile_n, tile_n), tile_n)]

                @pl.when((row0 < begin) | (row0 + rows > end))  # a block reaching past the group's rows
                def _():
                    # Both consumers write x's masked rows: the same values, so no race.
                    mask_rows(x_smem, row0, begin, end)
                    mask_rows(dy_mine, row0, begin, end)
                    plgpu.commit_smem()

                plgpu.wgmma(acc, x_smem.transpose((1, 0)), dy_mine)
                plgpu.wgmma_wait(0)
                return acc

            def compute_context(run_pipeline):
                def with_acc(acc_ref):
                    run_pipeline(acc_ref)
                    store_slabs(acc_ref, out_smem.at[wg], out_gmem, group=g, row0=kt * tile_k,
                                col0=nt * cta_n + wg * tile_n)

                pl.run_scoped(with_acc, plgpu.ACC((tile_k, tile_n), jnp.float32))

            x_rows = x_gmem.at[pl.ds(first, m), pl.ds(kt * tile_k, tile_k)]
            dy_rows = dy_gmem.at[pl.ds(first, m), pl.ds(nt * cta_n, cta_n)]
            pipeline(mma, compute_context, steps)(x_rows, dy_rows, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    config: MosaicTgmmConfig | None = None,
    out_dtype=None,
    interpret: bool = False,
) -> jax.Array:
    """dw[g] = x[rows_g]^T @ dy[rows_g] for the first ``num_groups`` groups: [num_groups, K, N].

    ``config`` None takes `default_config`.

    Rows at or past ``sum(group_sizes)`` are never used (NaN there is harmless);
    empty groups give zeros. ``interpret`` runs Mosaic GPU's CPU interpreter.
    """
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"expected x [M, K] and dy [M, N], got {x.shape} and {dy.shape}")
    (m, k), n = x.shape, dy.shape[1]
    config = config or default_config(k, n)
    if config is None:
        raise ValueError(f"K={k} and N={n}: the mosaic_gpu transposed grouped matmul's tiles need K a multiple of 64 "
                         "and N of 128 (the Triton one takes other widths)")
    num_groups = group_sizes.shape[0] if num_groups is None else num_groups
    if k % config.tile_k or n % config.item_n:
        item_n = "2*tile_n" if config.consumers == "cooperative" else "tile_n"
        raise ValueError(f"K={k} and N={n} must be multiples of tile_k={config.tile_k} and {item_n}="
                         f"{config.item_n} for the mosaic_gpu transposed grouped matmul")
    if x.dtype != dy.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"mosaic_gpu transposed grouped matmul needs x and dy both bf16 or f16, got "
                         f"{x.dtype}, {dy.dtype}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    store_rows = _store_rows(config, out_dtype)
    if config.consumers == "pingpong":
        need = mosaic_gpu_tgmm_pingpong.shared_memory_bytes(config, store_rows, out_dtype.itemsize)
        if need > _SMEM_BYTES:
            raise ValueError(f"{config} needs {need} bytes of shared memory, more than the {_SMEM_BYTES} a Hopper "
                             "CTA has: fewer max_concurrent_steps, block_rows or smaller tiles")
    if m == 0 or num_groups == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    # Group bounds, clipped to the rows that exist (an over-full group_sizes reads nothing past M),
    # each size clipped before the cumsum (sizes near int32's max would wrap it to negative bounds).
    starts, ends = (b[:num_groups] for b in group_bounds(group_sizes, m))
    # Tiled TMA needs a row count that is a multiple of 8; only then a copy (the
    # added rows belong to no group, so they are masked like padding).
    rows = -(-m // _ROW_ALIGN) * _ROW_ALIGN
    if rows != m:
        x, dy = (jnp.pad(a, ((0, rows - m), (0, 0))) for a in (x, dy))
    if config.consumers == "pingpong":
        body = functools.partial(mosaic_gpu_tgmm_pingpong.kernel, config=config, num_groups=num_groups,
                                 row_align=_ROW_ALIGN, store_rows=store_rows)
    else:
        body = functools.partial(_kernel, config=config, num_groups=num_groups)
    kernel = persistent_kernel(body,
                               jax.ShapeDtypeStruct((num_groups, k, n), out_dtype), max_ctas=config.max_ctas,
                               interpret=interpret, interpret_ctas=_INTERPRET_CTAS)
    return kernel(starts, ends, x, dy)
