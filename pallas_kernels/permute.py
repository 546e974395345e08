"""Row gather and pair combine for the MoE expert path, in Pallas (Triton lowering).

Around the expert GEMMs sit two memory-bound row shuffles (see
`wideep_jax.experts`): `permute_rows` copies token rows into slot-sorted order
(``x[row_token]``, [N, H] -> [N*K, H]), and `combine_rows` sums each token's
K sorted rows back into one row (float32 sum). Measured on an H100 at DeepSeek
sizes (K=8, H=7168 bf16, benchmarks/RESULTS.md), this row gather is 1.3-1.7x
XLA's at 1k-16k tokens and is the GPU default of `experts.permute_rows`; XLA's
reduce stays the combine (as fast or faster than this one).

Both run one program per (row block, column block) on whole-array refs (no
BlockSpecs). A program loads its block's row indices as a vector and reads the
source rows with an array indexer, ``ref.at[idx_vector, pl.ds(c0, bc)]``, which
the Triton lowering turns into one pointer tensor ``base + idx[:, None] * H +
cols[None, :]``: contiguous along H, so Triton emits 16-byte accesses when the
column offset and H are multiples of 8 (bf16). The column mask is left out
entirely when H is a multiple of the column block; row masks are constant
along H and do not break vectorization. Indices are clamped into range, so a
bad index reads a wrong row but never out of bounds. ``interpret=True`` runs
Pallas' CPU interpreter (for tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import triton_backend
from pallas_kernels.triton_backend import plgpu_triton

__all__ = ["gather_rows", "combine_rows", "combine_rows_reference"]


def _is_pow2(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


def _check_tiling(block_rows, block_cols, num_warps, num_stages) -> None:
    for name, value in (("block_rows", block_rows), ("block_cols", block_cols)):
        if not _is_pow2(value):
            raise ValueError(f"{name} must be a power of two, got {value!r}")
    if block_rows * block_cols > 1 << 20:
        raise ValueError(f"block_rows * block_cols must be <= 2**20 (Triton's tensor limit), got "
                         f"{block_rows} * {block_cols}")
    if not _is_pow2(num_warps) or num_warps > 32:
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps!r}")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")


def _col_block(h: int, block_cols: int) -> int:
    """The column block, shrunk to the next power of two >= H for narrow rows."""
    return min(block_cols, 1 << max(0, h - 1).bit_length())


def _block(axis: int, size: int, extent: int):
    """(slice, indices [size], in-bounds mask [size] or None if all blocks are full)."""
    start = pl.multiple_of(pl.program_id(axis) * size, size)
    index = start + lax.broadcasted_iota(jnp.int32, (size,), 0)
    return pl.ds(start, size), index, None if extent % size == 0 else index < extent


def _mask2d(row_ok, col_ok, shape):
    """Outer AND of optional row [bm] and column [bc] masks, broadcast to ``shape``."""
    if row_ok is None or col_ok is None:
        return None if row_ok is None and col_ok is None else jnp.broadcast_to(
            row_ok[:, None] if col_ok is None else col_ok[None, :], shape)
    return row_ok[:, None] & col_ok[None, :]


def _load(ref, mask, other=0):
    """A load, masked only where a mask is given (an unmasked one vectorizes best)."""
    return ref[...] if mask is None else plgpu_triton.load(ref, mask=mask, other=other)


def _gather_kernel(index_ref, x_ref, out_ref, *, bm: int, bc: int):
    (r, h), n = out_ref.shape, x_ref.shape[0]
    rows, _, row_ok = _block(0, bm, r)
    cols, col_idx, col_ok = _block(1, bc, h)
    idx = jnp.clip(_load(index_ref.at[rows], row_ok), 0, n - 1)
    mask = _mask2d(row_ok, col_ok, (bm, bc))
    values = _load(x_ref.at[idx[:, None], col_idx[None, :]], mask)
    plgpu_triton.store(out_ref.at[rows, cols], values, mask=mask)


def gather_rows(x: jax.Array, index: jax.Array, *, block_rows: int = 16, block_cols: int = 1024,
                num_warps: int = 4, num_stages: int = 1, interpret: bool = False) -> jax.Array:
    """``out[r] = x[index[r]]``: x [N, H], index int [R] -> [R, H] in x's dtype.

    Indices should lie in [0, N); others are clamped into it (negatives read row
    0, unlike NumPy's wrap-around). Bitwise copies, any dtype. Differentiable in a
    floating x: the gradient scatter-adds into the (clamped) rows that were read.
    """
    triton_backend.require("pallas_kernels.permute.gather_rows")
    _check_tiling(block_rows, block_cols, num_warps, num_stages)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [N, H], got shape {x.shape}")
    if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"index must be a 1-D integer array, got {index.dtype} {index.shape}")
    (n, h), r = x.shape, index.shape[0]
    if n == 0 and r > 0:
        raise ValueError(f"cannot gather {r} rows from x with N=0 rows")
    if r == 0 or h == 0:
        return jnp.zeros((r, h), x.dtype)
    if x.dtype == jnp.bool_:  # Triton has no bool memory type: copy the bytes as uint8
        return gather_rows(x.astype(jnp.uint8), index, block_rows=block_rows, block_cols=block_cols,
                           num_warps=num_warps, num_stages=num_stages, interpret=interpret).astype(jnp.bool_)
    options = dict(bm=block_rows, bc=_col_block(h, block_cols), num_warps=num_warps, num_stages=num_stages,
                   interpret=interpret)
    if not jnp.issubdtype(x.dtype, jnp.inexact):  # integer data: nothing to differentiate
        return _gather_call(index.astype(jnp.int32), x, **options)
    return _gather_diff(tuple(options.items()), x, index.astype(jnp.int32))


# Differentiable in x (a pallas_call has no transpose rule: jax.grad of the bare kernel
# failed with "Too few leaves for PyTreeDef"). The tangent is the same gather in XLA, of
# the same clamped indices, so its transpose (the gradient) is a scatter-add into the
# rows the forward read: a negative index's cotangent goes to row 0, an index >= N's to
# row N-1 (NumPy-style indexing would wrap the one and drop the other).
@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gather_diff(options, x, index):
    return _gather_call(index, x, **dict(options))


@_gather_diff.defjvp
def _gather_diff_jvp(options, primals, tangents):
    x, index = primals
    x_dot = tangents[0]
    return _gather_diff(options, x, index), jnp.take(x_dot, jnp.clip(index, 0, x.shape[0] - 1), axis=0)


# Jitted so that eager calls with new data reuse one program: a bare pallas_call traces
# its kernel afresh each call, and the new kernel jaxpr misses the primitive cache.
@functools.partial(jax.jit, static_argnames=("bm", "bc", "num_warps", "num_stages", "interpret"))
def _gather_call(index, x, *, bm: int, bc: int, num_warps: int, num_stages: int, interpret: bool):
    (r,), h = index.shape, x.shape[1]
    return pl.pallas_call(
        functools.partial(_gather_kernel, bm=bm, bc=bc),
        out_shape=jax.ShapeDtypeStruct((r, h), x.dtype),
        grid=(pl.cdiv(r, bm), pl.cdiv(h, bc)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gather_rows_triton",
    )(index, x)


def _combine_kernel(position_ref, valid_ref, y_ref, out_ref, *, bm: int, bc: int):
    (n, h), (r, top_k) = out_ref.shape, (y_ref.shape[0], position_ref.shape[1])
    rows, row_idx, row_ok = _block(0, bm, n)
    cols, col_idx, col_ok = _block(1, bc, h)
    acc = jnp.zeros((bm, bc), jnp.float32)
    for k in range(top_k):  # unrolled: all K row loads can be in flight at once
        pair = (row_idx, jnp.full((bm,), k, jnp.int32))  # array indexers: interpret mode too
        pos = _load(position_ref.at[pair], row_ok)
        ok = _load(valid_ref.at[pair], row_ok, other=False)
        # Masked loads, not a multiply: rows of invalid pairs (NaN included) never leak in.
        values = plgpu_triton.load(y_ref.at[jnp.clip(pos, 0, r - 1)[:, None], col_idx[None, :]],
                                   mask=_mask2d(ok, col_ok, (bm, bc)), other=0)
        acc = acc + values.astype(jnp.float32)
    plgpu_triton.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype),
                       mask=_mask2d(row_ok, col_ok, (bm, bc)))


def combine_rows(y: jax.Array, position: jax.Array, valid: jax.Array, *, out_dtype=None,
                 block_rows: int = 8, block_cols: int = 1024, num_warps: int = 4,
                 num_stages: int = 1, interpret: bool = False) -> jax.Array:
    """``out[n] = sum_k where(valid[n, k], y[position[n, k]], 0)``, summed in float32.

    y [R, H]; position int [N, K]; valid bool [N, K] -> [N, H] in ``out_dtype``
    (default y's dtype). The K terms are added in order k = 0..K-1 onto 0.0, as
    `combine_rows_reference` (the layer's XLA combine) does. Valid positions should lie in
    [0, R) (others are clamped); invalid ones are never read. Differentiable in a
    floating y (invalid pairs get no gradient).
    """
    triton_backend.require("pallas_kernels.permute.combine_rows")
    _check_tiling(block_rows, block_cols, num_warps, num_stages)
    if y.ndim != 2:
        raise ValueError(f"y must be 2-D [R, H], got shape {y.shape}")
    if position.ndim != 2 or not jnp.issubdtype(position.dtype, jnp.integer):
        raise ValueError(f"position must be a 2-D integer array [N, K], got {position.dtype} "
                         f"{position.shape}")
    if valid.shape != position.shape:
        raise ValueError(f"valid must have position's shape {position.shape}, got {valid.shape}")
    if not (valid.dtype == jnp.bool_ or jnp.issubdtype(valid.dtype, jnp.integer)):
        # A float mask would be cut to bool silently (0.2 -> valid).
        raise ValueError(f"valid must be bool (or 0/1 integers), got {valid.dtype}")
    out_dtype = jnp.dtype(out_dtype or y.dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
    (r, h), (n, top_k) = y.shape, position.shape
    if n == 0 or h == 0 or top_k == 0 or r == 0:
        return jnp.zeros((n, h), out_dtype)  # nothing to read (R == 0: no pair can be valid)
    options = dict(out_dtype=out_dtype, bm=block_rows, bc=_col_block(h, block_cols), num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret)
    position, valid = position.astype(jnp.int32), valid.astype(jnp.bool_)
    if not jnp.issubdtype(y.dtype, jnp.inexact):
        return _combine_call(position, valid, y, **options)
    return _combine_diff(tuple(options.items()), y, position, valid)


# Differentiable in y, as `_gather_diff`: the tangent is the same masked, clamped
# gather-and-sum in XLA, whose transpose scatter-adds each valid pair's cotangent into
# the row the forward read (invalid pairs get none).
@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _combine_diff(options, y, position, valid):
    return _combine_call(position, valid, y, **dict(options))


@_combine_diff.defjvp
def _combine_diff_jvp(options, primals, tangents):
    y, position, valid = primals
    tangent = combine_rows_reference(tangents[0], position, valid, dict(options)["out_dtype"])
    return _combine_diff(options, y, position, valid), tangent


def combine_rows_reference(y: jax.Array, position: jax.Array, valid: jax.Array, out_dtype) -> jax.Array:
    """`combine_rows` in XLA: the K terms added in order onto 0.0 in float32, positions
    clamped into [0, R) as the kernel reads them, invalid pairs selected away (``where``,
    not a multiply: their rows' values, NaN included, cannot leak in)."""
    clamped = jnp.clip(position, 0, max(y.shape[0] - 1, 0))
    total = jnp.zeros((position.shape[0], y.shape[1]), jnp.float32)
    for k in range(position.shape[1]):  # as the kernel: no [N, K, H] intermediate
        total = total + jnp.where(valid[:, k, None], y[clamped[:, k]].astype(jnp.float32), 0.0)
    return total.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "bm", "bc", "num_warps", "num_stages", "interpret"))
def _combine_call(position, valid, y, *, out_dtype, bm: int, bc: int, num_warps: int, num_stages: int,
                  interpret: bool):
    n, h = position.shape[0], y.shape[1]
    return pl.pallas_call(
        functools.partial(_combine_kernel, bm=bm, bc=bc),
        out_shape=jax.ShapeDtypeStruct((n, h), out_dtype),
        grid=(pl.cdiv(n, bm), pl.cdiv(h, bc)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="combine_rows_triton",
    )(position, valid, y)
