"""Grouped matmul in Pallas through the Triton lowering: any CUDA GPU.

The portable sibling of `mosaic_gpu` (which needs Hopper): one program per
(row tile, column block) of a `schedule.TileSchedule`, a K loop of ``dot``
into an f32 accumulator that Triton software-pipelines, and a fused epilogue.
Tiles start at arbitrary rows (``align=1``: Triton's masked pointer loads need
no alignment), so a tile reads and writes only its live rows through masks;
programs past the schedule's real tiles exit at once, so empty groups' weights
are never read and rows at or past ``sum(group_sizes)`` are never touched.

Epilogues: plain, SwiGLU (gate and up columns of ``w`` side by side, two
accumulators, ``silu(gate) * up`` stored), and a per-row scale (the routing
weight) for the down projection. `tgmm` is the transposed kernel (the weight
gradient): one program per (group, K block, N block) looping over the group's
row tiles. CPU: Pallas' interpret mode runs the same kernels (slow; for tests).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import triton_backend
from pallas_kernels.triton_backend import plgpu_triton
from pallas_kernels.grouped_matmul.schedule import TileSchedule, group_bounds, tile_schedule

Epilogue = Literal["none", "swiglu", "row_scale"]


def _is_pow2(value) -> bool:
    return isinstance(value, int) and value > 0 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tiling of the Triton grouped matmul (static, hashable).

    Attributes:
      block_m: rows per tile (a power of two >= 16: tl.dot's minimum).
      block_n: output columns per program (power of two >= 16).
      block_k: K step of the loop (power of two >= 16).
      num_warps: warps per program (1 to 32, a power of two).
      num_stages: Triton's software-pipelining depth of the K loop (>= 1).
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not _is_pow2(value) or value < 16:
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, got {value!r}")
        if not _is_pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"TritonConfig.num_warps must be a power of two in [1, 32], got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"TritonConfig.num_stages must be an int >= 1, got {self.num_stages!r}")


def default_config(
    num_rows: int, num_groups: int, *, k: int = 7168, n_out: int = 4096, epilogue: Epilogue = "none"
) -> TritonConfig:
    """A common Triton matmul tiling per regime (not yet tuned here), shrunk to fit K and N.

    Prefill (>= 128 rows per group): 128-row tiles, 8 warps. Decode: 16-row tiles
    (few rows per group waste little) and a deeper pipeline for the weight stream.
    SwiGLU keeps two accumulators, so its column block is halved to keep registers
    and shared memory per stage as for one. All stay within ~96 KiB of shared
    memory, so they also fit consumer GPUs (sm86/sm89: 99 KiB per block).
    """
    if num_rows // max(1, num_groups) >= 128:
        config = TritonConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    elif num_rows // max(1, num_groups) >= 32:
        config = TritonConfig()
    else:
        config = TritonConfig(block_m=16, block_n=128, block_k=64, num_warps=4, num_stages=4)
    block_n = config.block_n // (2 if epilogue == "swiglu" else 1)
    block_k = config.block_k
    while n_out % block_n and block_n > 16:
        block_n //= 2
    while k % block_k and block_k > 16:
        block_k //= 2
    return dataclasses.replace(config, block_n=block_n, block_k=block_k)


def _kernel(group_ref, start_ref, begin_ref, end_ref, num_tiles_ref, x_ref, w_ref, *rest,
            config: TritonConfig, epilogue: Epilogue, n_out: int):
    scale_ref, out_ref = rest if epilogue == "row_scale" else (None, rest[0])
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    k_steps = x_ref.shape[1] // bk
    num_acc = 2 if epilogue == "swiglu" else 1
    t, j = pl.program_id(0), pl.program_id(1)

    # Grid is sized for the worst case; programs past the real tiles do nothing.
    @pl.when(t < num_tiles_ref[0])
    def _():
        group, start = group_ref[t], start_ref[t]
        row = lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        live = (row >= begin_ref[t]) & (row < end_ref[t])  # [bm, 1]
        rows = pl.ds(start, bm)  # may reach past M: masked rows are never accessed
        x_mask = jnp.broadcast_to(live, (bm, bk))
        # SwiGLU's up columns sit n_out columns right of the gate columns.
        cols = [pl.ds(pl.multiple_of(j * bn + a * n_out, bn), bn) for a in range(num_acc)]

        def step(kk, accs):
            ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
            x = plgpu_triton.load(x_ref.at[rows, ks], mask=x_mask, other=0)
            return tuple(acc + plgpu_triton.dot(x, w_ref[group, ks, c]) for acc, c in zip(accs, cols))

        accs = lax.fori_loop(0, k_steps, step, tuple(jnp.zeros((bm, bn), jnp.float32) for _ in cols))
        if epilogue == "swiglu":
            gate, up = accs
            value = gate / (1.0 + jnp.exp(-gate)) * up
        elif epilogue == "row_scale":
            scale = plgpu_triton.load(scale_ref.at[rows], mask=live[:, 0], other=0)
            value = accs[0] * scale[:, None]
        else:
            value = accs[0]
        plgpu_triton.store(out_ref.at[rows, pl.ds(pl.multiple_of(j * bn, bn), bn)],
                           value.astype(out_ref.dtype), mask=jnp.broadcast_to(live, (bm, bn)))


def _check(x, w, config: TritonConfig, n_out: int) -> None:
    k = x.shape[1]
    if k % config.block_k:
        raise ValueError(f"K={k} must be a multiple of block_k={config.block_k} for the triton grouped matmul")
    if n_out % config.block_n:
        raise ValueError(f"N={n_out} must be a multiple of block_n={config.block_n} for the triton grouped matmul")
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"triton grouped matmul needs x and w both bf16 or f16, got {x.dtype}, {w.dtype}")


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    config: TritonConfig | None = None,
    epilogue: Epilogue = "none",
    row_scale: jax.Array | None = None,
    out_dtype=None,
    schedule: TileSchedule | None = None,
    interpret: bool = False,
) -> jax.Array:
    """[M, N] grouped matmul; with ``epilogue="swiglu"`` w is [G, K, 2N] (gate | up).

    Rows at or past ``sum(group_sizes)`` are not written (unspecified values).
    ``schedule``: ``tile_schedule(group_sizes, M, block_m, align)``, any align.
    ``interpret`` runs Pallas' CPU interpreter.
    """
    triton_backend.require("the triton grouped matmul")
    if epilogue not in ("none", "swiglu", "row_scale"):
        raise ValueError(f"epilogue must be 'none', 'swiglu' or 'row_scale', got {epilogue!r}")
    if x.ndim != 2 or w.ndim != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"expected x [M, K] and w [G, K, N], got {x.shape} and {w.shape}")
    m = x.shape[0]
    if epilogue == "swiglu" and w.shape[2] % 2:
        raise ValueError(f"epilogue='swiglu' needs w's last dim even (gate | up), got {w.shape[2]}")
    n_out = w.shape[2] // (2 if epilogue == "swiglu" else 1)
    config = config or default_config(m, w.shape[0], k=x.shape[1], n_out=n_out, epilogue=epilogue)
    _check(x, w, config, n_out)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if m == 0 or w.shape[0] == 0:  # no rows, or no groups: every row is padding
        return jnp.zeros((m, n_out), out_dtype)
    if schedule is None:
        schedule = tile_schedule(group_sizes, m, config.block_m)
    operands = [*schedule, x, w]
    if epilogue == "row_scale":
        if row_scale is None or row_scale.shape != (m,):
            raise ValueError(f"epilogue='row_scale' needs row_scale of shape ({m},), got "
                             f"{None if row_scale is None else row_scale.shape}")
        operands.append(row_scale.astype(jnp.float32))
    # No in/out specs: every operand is one whole-array ref (a pointer in Triton);
    # the kernel slices its own rows, which a blocked index map cannot express. A
    # tile's rows may reach past M (even when M < block_m): masked, never accessed;
    # interpret mode pads such slices itself.
    return pl.pallas_call(
        functools.partial(_kernel, config=config, epilogue=epilogue, n_out=n_out),
        out_shape=jax.ShapeDtypeStruct((m, n_out), out_dtype),
        grid=(schedule.group.shape[0], n_out // config.block_n),
        compiler_params=plgpu_triton.CompilerParams(num_warps=config.num_warps,
                                                    num_stages=config.num_stages),
        interpret=interpret,
        name=f"grouped_matmul_triton_{epilogue}",
    )(*operands)


def _tgmm_kernel(offset_ref, size_ref, x_ref, dy_ref, out_ref, *, config: TritonConfig):
    # One program per (group, K block, N block): dw[g] block = sum over the group's
    # row tiles of x_tile^T @ dy_tile. Empty groups run no tile and store zeros.
    bm, bk, bn = config.block_m, config.block_k, config.block_n
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, size = offset_ref[g], size_ref[g]
    ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
    ns = pl.ds(pl.multiple_of(j * bn, bn), bn)

    def step(t, acc):
        first = start + t * bm
        live = lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < size - t * bm  # [bm, 1]
        x = plgpu_triton.load(x_ref.at[pl.ds(first, bm), ks], mask=jnp.broadcast_to(live, (bm, bk)), other=0)
        dy = plgpu_triton.load(dy_ref.at[pl.ds(first, bm), ns], mask=jnp.broadcast_to(live, (bm, bn)), other=0)
        return acc + plgpu_triton.dot(x, dy, trans_a=True)

    acc = lax.fori_loop(0, (size + bm - 1) // bm, step, jnp.zeros((bk, bn), jnp.float32))
    plgpu_triton.store(out_ref.at[g, ks, ns], acc.astype(out_ref.dtype))


def default_tgmm_config(num_rows: int, num_groups: int, *, k: int = 7168, n: int = 4096) -> TritonConfig:
    """Tiles of the transposed kernel: ``block_k`` x ``block_n`` outputs per program,
    ``block_m`` rows per step (not yet tuned on a GPU), shrunk to fit K and N."""
    rows_per_group = num_rows // max(1, num_groups)
    config = TritonConfig(block_m=64 if rows_per_group >= 64 else 32, block_n=128, block_k=128,
                          num_warps=8, num_stages=3)
    block_k, block_n = config.block_k, config.block_n
    while k % block_k and block_k > 16:
        block_k //= 2
    while n % block_n and block_n > 16:
        block_n //= 2
    return dataclasses.replace(config, block_k=block_k, block_n=block_n)


def tgmm(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    config: TritonConfig | None = None,
    out_dtype=None,
    interpret: bool = False,
) -> jax.Array:
    """dw[g] = x[rows_g]^T @ dy[rows_g] for the first ``num_groups`` groups: [num_groups, K, N].

    The weight gradient of :func:`grouped_matmul`; rows at or past
    ``sum(group_sizes)`` are never read, empty groups give zeros.
    """
    triton_backend.require("the triton transposed grouped matmul")
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"expected x [M, K] and dy [M, N], got {x.shape} and {dy.shape}")
    (m, k), n = x.shape, dy.shape[1]
    num_groups = group_sizes.shape[0] if num_groups is None else num_groups
    config = config or default_tgmm_config(m, group_sizes.shape[0], k=k, n=n)
    if k % config.block_k or n % config.block_n:
        raise ValueError(f"K={k} and N={n} must be multiples of block_k={config.block_k} and "
                         f"block_n={config.block_n} for the triton transposed grouped matmul")
    if x.dtype != dy.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"triton transposed grouped matmul needs x and dy both bf16 or f16, got "
                         f"{x.dtype}, {dy.dtype}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if m == 0 or num_groups == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    # Groups clipped to the rows that exist, as the forward's schedule reads them: a
    # negative size counts as 0 (it would shift every later group's rows) and an
    # over-full group_sizes reads nothing past M (the kernel masks by size only).
    offsets, ends = group_bounds(group_sizes, m)
    sizes = ends - offsets
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, config=config),
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(num_groups, k // config.block_k, n // config.block_n),
        compiler_params=plgpu_triton.CompilerParams(num_warps=config.num_warps,
                                                    num_stages=config.num_stages),
        interpret=interpret,
        name="grouped_matmul_transposed_triton",
    )(offsets, sizes, x, dy)
