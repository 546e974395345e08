"""Grouped matmul for Hopper in Pallas Mosaic GPU: persistent, warp-specialized.

One CTA per SM loops over (row tile, column tile) work items of a
`schedule.TileSchedule`: only real tiles of non-empty groups are visited, so
empty experts' weights are never read (decode is bound by the weight bytes
actually used). Each item runs a TMA pipeline over K with one producer
warpgroup and two consumer warpgroups issuing wgmma, then an epilogue that
stores only the tile's live rows (a power-of-two ladder of TMA stores).

Epilogues: plain, SwiGLU (gate and up columns of ``w`` side by side, two
accumulators, ``silu(gate) * up`` stored), and a per-row scale (the routing
weight) for the down projection. CPU: Mosaic GPU's interpret mode runs the
same kernel (slow; for tests).
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

from pallas_kernels.grouped_matmul import mosaic_gpu_pingpong
from pallas_kernels.grouped_matmul.mosaic_gpu_epilogue import epilogue_value, store_rows, swizzled, work_item
from pallas_kernels.grouped_matmul.schedule import TileSchedule, group_band_walk, tile_schedule

Epilogue = Literal["none", "swiglu", "row_scale"]
_INTERPRET_CTAS = 4  # simulated CTAs on CPU: enough to exercise the persistent loop
_SMEM_BYTES = 227 * 1024  # dynamic shared memory one Hopper CTA may take
_ROW_ALIGN = 8  # tiled TMA loads of x need row offsets that are multiples of 8


@dataclasses.dataclass(frozen=True)
class MosaicGpuConfig:
    """Tiling of the Mosaic GPU grouped matmul (static, hashable).

    Attributes:
      tile_m, tile_n: one consumer warpgroup's accumulator tile.
      tile_k: K step of the TMA pipeline.
      max_concurrent_steps: pipeline stages in shared memory.
      wg_split: how the two consumer warpgroups split the CTA tile: "n" gives a
        ``tile_m x 2*tile_n`` CTA tile, "m" a ``2*tile_m x tile_n`` one.
      walk: the order of work items. "snake": a planar snake over all row and
        column tiles (``grid_minor``, ``grid_tile_width``). "group_bands": each
        group's row tiles cut into bands of at most ``grid_tile_width`` tiles that
        never hold two groups, row tiles fastest (``schedule.group_band_walk``); the
        item order is then computed in XLA before the kernel. "mixed_bands": the same
        bands, reordered so that every stretch of the walk mixes bands of all widths
        (narrow bands are bound by weight reads, wide ones by the MMAs).
      grid_minor: "n" walks column tiles fastest (reuses the rows' tile), "m"
        walks row tiles fastest (reuses a weight column tile).
      grid_tile_width: planar-snake band width along ``grid_minor``.
      epi_tile_m, epi_tile_n: epilogue store tile.
      delay_release: k steps a consumer keeps a stage (and a wgmma) in flight
        before releasing it to the producer (0 or 1).
      chain_items: let the producer stream the next work item's K steps while
        the consumers finish the current one (no pipeline drain between items).
        Needs ``delay_release == 0`` and K / tile_k divisible by
        ``max_concurrent_steps``.
      max_ctas: persistent CTAs to launch (None: one per SM).
      swizzled_epilogue: store whole epilogue tiles through swizzled shared
        memory (no bank conflicts) and only partial ones through the plain
        buffer that row-granular TMA stores need; costs one more buffer.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    max_concurrent_steps: int = 4
    wg_split: Literal["m", "n"] = "n"
    grid_minor: Literal["m", "n"] = "n"
    grid_tile_width: int = 8
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    delay_release: int = 0
    chain_items: bool = False
    max_ctas: int | None = None
    swizzled_epilogue: bool = False
    consumers: Literal["cooperative", "pingpong"] = "cooperative"
    walk: Literal["snake", "group_bands", "mixed_bands"] = "snake"

    def __post_init__(self) -> None:
        for name in ("tile_m", "tile_n", "tile_k", "epi_tile_m", "epi_tile_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ValueError(f"MosaicGpuConfig.{name} must be a positive multiple of 8, got {value!r}")
        if self.tile_m % 64:
            raise ValueError(f"MosaicGpuConfig.tile_m must be a multiple of 64 (wgmma), got {self.tile_m}")
        if self.tile_m % self.epi_tile_m or self.tile_n % self.epi_tile_n:
            raise ValueError(
                f"epilogue tile ({self.epi_tile_m}, {self.epi_tile_n}) must divide "
                f"the warpgroup tile ({self.tile_m}, {self.tile_n})"
            )
        if self.wg_split not in ("m", "n") or self.grid_minor not in ("m", "n"):
            raise ValueError(
                f"wg_split and grid_minor must be 'm' or 'n', got {self.wg_split!r}, {self.grid_minor!r}"
            )
        if self.max_concurrent_steps < 2 or self.grid_tile_width < 1 or self.delay_release not in (0, 1):
            raise ValueError(
                "MosaicGpuConfig needs max_concurrent_steps >= 2, grid_tile_width >= 1 and "
                f"delay_release 0 or 1, got {self.max_concurrent_steps}, {self.grid_tile_width}, "
                f"{self.delay_release}"
            )
        if self.chain_items and self.delay_release:
            raise ValueError("MosaicGpuConfig.chain_items needs delay_release=0")
        if self.walk not in ("snake", "group_bands", "mixed_bands"):
            raise ValueError("MosaicGpuConfig.walk must be 'snake', 'group_bands' or 'mixed_bands', "
                             f"got {self.walk!r}")
        if self.walk != "snake" and self.grid_minor != "m":
            raise ValueError(f"MosaicGpuConfig(walk={self.walk!r}) walks row tiles fastest: it needs "
                             f"grid_minor='m', got {self.grid_minor!r}")
        if self.consumers not in ("cooperative", "pingpong"):
            raise ValueError(f"MosaicGpuConfig.consumers must be 'cooperative' or 'pingpong', got {self.consumers!r}")
        if self.consumers == "pingpong":
            if self.wg_split != "n" or self.delay_release or self.chain_items:
                raise ValueError(
                    "MosaicGpuConfig(consumers='pingpong') takes no wg_split, delay_release or chain_items "
                    f"(each consumer computes whole items and the producer always streams on), got "
                    f"wg_split={self.wg_split!r}, delay_release={self.delay_release}, chain_items={self.chain_items}"
                )
            if self.tile_m * self.tile_n > 128 * 128:
                raise ValueError(
                    f"MosaicGpuConfig(consumers='pingpong'): one warpgroup holds the whole {self.tile_m}x"
                    f"{self.tile_n} accumulator; at most 128x128 elements (128 registers a thread) fit"
                )

    @property
    def cta_tile_m(self) -> int:
        return self.tile_m * (2 if self.wg_split == "m" and self.consumers == "cooperative" else 1)

    @property
    def cta_tile_n(self) -> int:
        return self.tile_n * (2 if self.wg_split == "n" and self.consumers == "cooperative" else 1)


def default_config(
    num_rows: int, num_groups: int, *, k: int = 7168, n_out: int = 4096, epilogue: Epilogue = "none"
) -> MosaicGpuConfig:
    """Tiles measured best on one H200 (benchmarks/RESULTS.md), shrunk to fit small K, N.

    Chosen by sustained timing (``bench_grouped_matmul --sustain``, ad4decd): the
    H200 holds its 700 W cap by lowering clocks, so a kernel that draws more power
    per FLOP runs slower when the card stays busy, as it does while serving. Timed
    in short bursts in turns, the ping-pong consumers looked 1-7 % faster (not at Zipf gate/up); run
    back to back they clocked 1268 MHz against the cooperative kernel's 1440 at
    gate/up and lost 11 %.

    Prefill (>= 128 rows per group): gate/up (long K) cooperative 128x256 CTA
    tiles, 3 stages, whole epilogue tiles stored through swizzled shared memory
    (1.04x torch sustained); SwiGLU two 64x128 warpgroup tiles split along M,
    chained items (6-8 % faster than ping-pong sustained); down (short K) cooperative
    128x256 CTA tiles, chained items. For down the ping-pong consumers (128x128
    items, 6 stages) were level at uniform sizes but lost at Zipf sizes: 4 % on an
    H200, 6.5 % plain and 11 % with the routing weight on an H100 (77880cf), whose
    lower HBM bandwidth suffers more from their smaller weight tiles when skewed
    groups share them little. All three prefill defaults walk mixed bands (bands of
    row tiles that never hold two groups, ``schedule.group_band_walk``, ordered so
    that narrow bands, bound by weight reads, run beside wide ones, bound by the MMAs):
    on an H100 at Zipf sizes 7 % faster than the snake at gate/up, 11 % at SwiGLU,
    level with group bands in group order at down (which beat the snake by 4-8 %);
    level at uniform sizes (f0d6814). Decode: cooperative 64-row
    tiles; long K (gate/up) streams best with 64x512 CTA tiles and 2 stages
    (0.95-0.97 of copy bandwidth), short K (down) with 64x256 tiles, 4 stages and
    chained items (0.89-0.91), SwiGLU with 64x128; ping-pong measured the same there.
    Every default walks row tiles fastest in bands of 4: in decode it is level with
    walking columns at DeepSeek-V3's shapes and up to 4 % faster where a group spans
    many row tiles (Llama 4 Maverick's 4096-token Zipf prefill, all 128 experts
    on one GPU), whose weight column tiles are then read once for the band.

    Tiles shrink to fit K and N; an N that is an odd multiple of 64 gets one 64-column
    warpgroup tile split along M, since 32-column ones would need epilogue rows of
    64 bytes, which fault (see `_check`).
    """
    walk = dict(grid_minor="m", grid_tile_width=4)
    prefill = num_rows // max(1, num_groups) >= 128
    if prefill and epilogue == "swiglu":
        config, chain = MosaicGpuConfig(tile_m=64, tile_n=128, wg_split="m", walk="mixed_bands", **walk), True
    elif prefill and k < 4096:
        config, chain = MosaicGpuConfig(walk="mixed_bands", **walk), True
    elif prefill:
        config, chain = MosaicGpuConfig(max_concurrent_steps=3, swizzled_epilogue=True, walk="mixed_bands",
                                        **walk), False
    elif epilogue == "swiglu":
        config, chain = MosaicGpuConfig(tile_m=64, tile_n=64, max_concurrent_steps=4, **walk), False
    elif k >= 4096:
        config, chain = MosaicGpuConfig(tile_m=64, tile_n=256, max_concurrent_steps=2, **walk), False
    else:
        config, chain = MosaicGpuConfig(tile_m=64, tile_n=128, max_concurrent_steps=4, **walk), True
    tile_n, tile_k = config.tile_n, config.tile_k
    while n_out % (tile_n * (config.cta_tile_n // config.tile_n)) and tile_n > 16:
        tile_n //= 2
    while k % tile_k and tile_k > 16:
        tile_k //= 2
    if tile_n < 64 and config.wg_split == "n":
        # An odd multiple of 64 columns: two 32-column warpgroup tiles would need epilogue
        # rows under 128 bytes, which fault; one 64-column tile split along M instead.
        config, tile_n = dataclasses.replace(config, tile_m=64, wg_split="m"), 64
    # Chaining streams the next item's K steps during this item's epilogue; it
    # needs whole rounds of pipeline stages.
    chain = chain and (k // tile_k) % config.max_concurrent_steps == 0
    return dataclasses.replace(config, tile_n=tile_n, tile_k=tile_k, chain_items=chain,
                               epi_tile_n=min(config.epi_tile_n, tile_n))


def _num_sms() -> int:
    device = jax.devices()[0]
    return getattr(device, "core_count", None) or 132 if device.platform == "gpu" else 132


def persistent_kernel(body, out_type, *, max_ctas: int | None, interpret: bool,
                      interpret_ctas: int = _INTERPRET_CTAS):
    """A Mosaic GPU kernel of one CTA per SM (at most ``max_ctas``), each with three
    warpgroups (two consumers and a producer) named ``"wg"`` over a grid named ``"sm"``.
    ``interpret`` runs Mosaic GPU's CPU interpreter on ``interpret_ctas`` simulated CTAs."""
    num_ctas = interpret_ctas if interpret else _num_sms()
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(min(num_ctas, max_ctas or num_ctas),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )


def _kernel(
    walk_group, walk_start, walk_live_begin, walk_live_end, walk_col, num_tiles, x_gmem, w_gmem, scale_gmem,
    out_gmem, *, config: MosaicGpuConfig, epilogue: Epilogue, n_out: int,
):
    dtype = x_gmem.dtype
    out_dtype = out_gmem.dtype
    k = x_gmem.shape[1]
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    cta_m, cta_n = config.cta_tile_m, config.cta_tile_n
    n_iters = n_out // cta_n
    k_iters = k // tile_k
    num_acc = 2 if epilogue == "swiglu" else 1
    transforms = swizzled(tile_k, dtype)
    epi_m, epi_n = config.epi_tile_m, config.epi_tile_n
    out_transforms = swizzled(epi_n, out_dtype)

    def pipeline(body, compute_context, state=None):
        x_spec = plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk), transforms=transforms,
                                 memory_space=plgpu.SMEM, delay_release=config.delay_release)
        w_spec = plgpu.BlockSpec((tile_k, cta_n), lambda kk: (kk, 0), transforms=transforms,
                                 memory_space=plgpu.SMEM, delay_release=config.delay_release)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=[x_spec] + [w_spec] * num_acc,
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context, pipeline_state=state,
        )

    ignore = lambda *_, **__: None  # the allocations depend only on the specs
    w_example = w_gmem.at[0, :, pl.ds(0, cta_n)]

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem, *[w_example] * num_acc),
        out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), out_dtype, transforms=out_transforms)
        if config.swizzled_epilogue else None,
        part_smem=plgpu.SMEM((2, 1 if config.swizzled_epilogue else 2, epi_m, epi_n), out_dtype),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem, part_smem):
        wg = lax.axis_index("wg")
        real_tiles = num_tiles[0]

        @plgpu.nd_loop((real_tiles * n_iters,), collective_axes="sm")
        def _item(info):
            group, start, live_begin, live_end, j = work_item(
                info.index[0], (walk_group, walk_start, walk_live_begin, walk_live_end, walk_col), num_tiles,
                n_iters, config)
            start = pl.multiple_of(start, _ROW_ALIGN)
            if config.wg_split == "m":
                wg_row0 = wg * tile_m
                wg_m, wg_n = pl.ds(pl.multiple_of(wg_row0, tile_m), tile_m), slice(None)
                wg_col0 = j * cta_n
            else:
                wg_row0 = 0
                wg_m, wg_n = slice(None), pl.ds(pl.multiple_of(wg * tile_n, tile_n), tile_n)
                wg_col0 = j * cta_n + wg * tile_n
            wg_begin = jnp.clip(live_begin - wg_row0, 0, tile_m)
            wg_end = jnp.clip(live_end - wg_row0, 0, tile_m)

            def compute_context(run_pipeline):
                acc_types = [plgpu.ACC((tile_m, tile_n), jnp.float32) for _ in range(num_acc)]

                def with_accs(*acc_refs):
                    run_pipeline(tuple(acc_refs))
                    value = epilogue_value(epilogue, [a[...] for a in acc_refs], scale_gmem, start + wg_row0)
                    store_rows(value.astype(out_dtype), None if out_smem is None else out_smem.at[wg],
                                part_smem.at[wg], out_gmem,
                                row0=start + wg_row0, col0=wg_col0, begin=wg_begin, end=wg_end,
                                epi_m=epi_m, epi_n=epi_n)

                pl.run_scoped(with_accs, *acc_types)

            def mma(_, x_smem, *rest):
                *w_smems, accs = rest
                for acc, w_smem in zip(accs, w_smems):
                    plgpu.wgmma(acc, x_smem.at[wg_m], w_smem.at[:, wg_n])
                plgpu.wgmma_wait(config.delay_release)
                return accs

            x_rows = x_gmem.at[pl.ds(start, cta_m), :]
            w_cols = [w_gmem.at[group, :, pl.ds(j * cta_n + a * n_out, cta_n)] for a in range(num_acc)]
            state = None
            if config.chain_items:
                steady = jnp.where(info.local_index == info.num_local_steps - 1,
                                   jnp.int32(plgpu.PipelinePipeline.STOP),
                                   jnp.int32(plgpu.PipelinePipeline.STEADY))
                # A CTA's only item must START (the prologue), not STOP.
                state = jnp.where(info.local_index == 0, jnp.int32(plgpu.PipelinePipeline.START), steady)
            pipeline(mma, compute_context, state)(x_rows, *w_cols, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# Bytes an epilogue tile row must span: narrower rows (epi_tile_n=32 or 16 of bf16) faulted
# with CUDA_ERROR_MISALIGNED_ADDRESS on an H100, swizzled epilogue or not (6b745ea).
_MIN_EPILOGUE_ROW_BYTES = 128


def _check(x, w, config: MosaicGpuConfig, n_out: int, epilogue: Epilogue, out_dtype) -> None:
    k = x.shape[1]
    row_bytes = config.epi_tile_n * jnp.dtype(out_dtype).itemsize
    if row_bytes < _MIN_EPILOGUE_ROW_BYTES:
        raise ValueError(
            f"MosaicGpuConfig.epi_tile_n={config.epi_tile_n} gives epilogue rows of {row_bytes} bytes of "
            f"{jnp.dtype(out_dtype).name}; allowed: at least {_MIN_EPILOGUE_ROW_BYTES} bytes (epi_tile_n >= "
            f"{_MIN_EPILOGUE_ROW_BYTES // jnp.dtype(out_dtype).itemsize}): narrower rows fault on the GPU"
        )
    if k % config.tile_k:
        raise ValueError(f"K={k} must be a multiple of tile_k={config.tile_k} for the mosaic_gpu grouped matmul")
    if n_out % config.cta_tile_n:
        raise ValueError(
            f"N={n_out} must be a multiple of the CTA tile's {config.cta_tile_n} columns "
            f"for the mosaic_gpu grouped matmul (config {config})"
        )
    if config.chain_items and (k // config.tile_k) % config.max_concurrent_steps:
        raise ValueError(
            f"chain_items needs K / tile_k = {k // config.tile_k} divisible by "
            f"max_concurrent_steps={config.max_concurrent_steps}"
        )
    if config.consumers == "pingpong":
        need = mosaic_gpu_pingpong.shared_memory_bytes(config, epilogue=epilogue)
        if need > _SMEM_BYTES:
            raise ValueError(
                f"MosaicGpuConfig(consumers='pingpong') {config} needs {need} bytes of shared memory, "
                f"more than the {_SMEM_BYTES} a Hopper CTA has: fewer max_concurrent_steps or smaller tiles"
            )
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"mosaic_gpu grouped matmul needs x and w both bf16 or f16, got {x.dtype}, {w.dtype}")


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    config: MosaicGpuConfig | None = None,
    epilogue: Epilogue = "none",
    row_scale: jax.Array | None = None,
    out_dtype=None,
    schedule: TileSchedule | None = None,
    interpret: bool = False,
) -> jax.Array:
    """[M, N] grouped matmul; with ``epilogue="swiglu"`` w is [G, K, 2N] (gate | up).

    Rows at or past ``sum(group_sizes)`` are not written (unspecified values).
    ``interpret`` runs Mosaic GPU's CPU interpreter on a few simulated CTAs.
    """
    m = x.shape[0]
    n_out = w.shape[2] // (2 if epilogue == "swiglu" else 1)
    config = config or default_config(m, w.shape[0], k=x.shape[1], n_out=n_out, epilogue=epilogue)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    _check(x, w, config, n_out, epilogue, out_dtype)
    if m == 0 or w.shape[0] == 0:  # no rows, or no groups: every row is padding
        return jnp.zeros((m, n_out), out_dtype)
    cta_m = config.cta_tile_m
    if schedule is None:
        schedule = tile_schedule(group_sizes, m, cta_m, _ROW_ALIGN)
    # Tiled TMA needs a row count that is a multiple of 8, and a tile's box must fit
    # in x's shape (it may still reach past the last live row). Only then: a copy.
    rows = max(-(-m // _ROW_ALIGN) * _ROW_ALIGN, cta_m)
    x_in = jnp.pad(x, ((0, rows - m), (0, 0))) if rows != m else x
    if epilogue == "row_scale":
        if row_scale is None or row_scale.shape != (m,):
            raise ValueError(f"epilogue='row_scale' needs row_scale of shape ({m},)")
        scale = jnp.pad(row_scale.astype(jnp.float32), (0, rows - m + cta_m))
    else:
        scale = jnp.zeros((8,), jnp.float32)
    if config.consumers == "pingpong":
        body = functools.partial(mosaic_gpu_pingpong.kernel, config=config, epilogue=epilogue, n_out=n_out,
                                 row_align=_ROW_ALIGN)
    else:
        body = functools.partial(_kernel, config=config, epilogue=epilogue, n_out=n_out)
    kernel = persistent_kernel(body,
                               jax.ShapeDtypeStruct((rows, n_out), out_dtype), max_ctas=config.max_ctas,
                               interpret=interpret)
    if config.walk != "snake":
        walk = tuple(group_band_walk(schedule, n_out // config.cta_tile_n, config.grid_tile_width,
                                     mix_widths=config.walk == "mixed_bands"))
    else:
        walk = (*schedule[:4], jnp.zeros((1,), jnp.int32))
    out = kernel(*walk, schedule.num_tiles, x_in, w, scale)
    return out if rows == m else out[:m]
