"""One-sided NVLink backend: peer stores into symmetric workspaces (one process).

A quarter of each kernel's CTAs push rows over NVLink into the destination ranks'
workspaces, raising a flag per row piece; the others stream them out as
they land. Dispatch pushes each token once per destination rank and copies
arrived rows into its outputs; combine pushes partial rows back the same way
and reduces them per token in rank order, so its sums equal the portable
path's bit for bit. Row counts stay on the device (no host sync), so the
custom calls may live in a CUDA graph.
A rank that waits longer than ``WIDEEP_COMM_TIMEOUT_S`` for a peer aborts the
kernel with a message instead of hanging. Kernels: ``ffi/csrc/nvlink_alltoall.cu``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wideep_jax.comm import ffi_lib
from wideep_jax.comm.ffi_backend import FfiAllToAll
from wideep_jax.comm.ffi_primitive import ordered_ffi_call


MAX_PIECES = 16  # flags per row: kMaxPieces in ffi/csrc/nvlink_alltoall.cu
MIN_PIECE = 512  # bytes: kMinPiece there


def _align16(n: int) -> int:
    return -(-n // 16) * 16


def _half_bytes(num_ranks: int, capacity: int, payload: int, row_bytes: int) -> int:
    """Bytes per workspace half: rows in the first 7/8, one flag per row piece in the last 1/8."""
    pieces = min(MAX_PIECES, max(1, payload // MIN_PIECE)) if payload % 16 == 0 else 1
    rows = num_ranks * capacity
    need = max(-(-rows * row_bytes * 8 // 7), rows * pieces * 8 * 8)
    return -(-need // 64) * 64


class NvlinkAllToAll(FfiAllToAll):
    """Dispatch/combine with the one-sided NVLink kernels."""

    name = "nvlink"

    def __init__(self, mesh, axis: str, *, max_ctas: int | None = None, send_ctas: int | None = None):
        """``max_ctas``: CTAs per call (default: one per SM; fewer leave SMs to
        overlapping work at some bandwidth). ``send_ctas``: how many of them push
        rows while the rest stream them out (default: a quarter)."""
        super().__init__(mesh, axis)
        for key, value in (("max_ctas", max_ctas), ("send_ctas", send_ctas)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key}={value!r}; allowed: a positive int or None (the default)")
        self.max_ctas = 0 if max_ctas is None else int(max_ctas)
        self.send_ctas = 0 if send_ctas is None else int(send_ctas)
        self.workspaces: set[int] = set()  # ids this backend's calls use (for profiling)
        if not ffi_lib.peer_access(self.groups):
            raise ValueError(
                "alltoall_backend='nvlink' needs every EP group in this process on GPUs with peer "
                "access to each other; allowed otherwise: 'nccl' or 'xla'"
            )

    def _dispatch(self, x, plan):
        num_ranks, capacity, top_k = plan.send_slot.shape
        hidden = x.shape[1]
        payload = hidden * x.dtype.itemsize
        row = _align16(payload) + _align16(2 * top_k * 4)
        workspace = ffi_lib.nvlink_workspace(self.groups, _half_bytes(num_ranks, capacity, payload, row))
        self.workspaces.add(workspace)
        out_types = (
            jax.ShapeDtypeStruct((num_ranks, capacity, hidden), x.dtype),
            jax.ShapeDtypeStruct((num_ranks, capacity, top_k), jnp.int32),
            jax.ShapeDtypeStruct((num_ranks, capacity, top_k), jnp.float32),
            jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
        )
        return ordered_ffi_call(
            "wideep_nvlink_dispatch", out_types,
            x, plan.send_token, plan.send_count, plan.send_slot, plan.send_weight.astype(jnp.float32),
            workspace=np.int64(workspace), timeout_ms=np.int64(ffi_lib.timeout_ms()),
            max_ctas=np.int64(self.max_ctas), send_ctas=np.int64(self.send_ctas),
        )

    def _combine(self, partial_sums, plan, recv_count):
        num_ranks, capacity, hidden = partial_sums.shape
        if partial_sums.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
            raise ValueError(f"nvlink combine: partial sums are {partial_sums.dtype}; allowed: "
                             "bfloat16, float16, float32")
        payload = hidden * partial_sums.dtype.itemsize
        workspace = ffi_lib.nvlink_workspace(self.groups,
                                             _half_bytes(num_ranks, capacity, payload, _align16(payload)))
        self.workspaces.add(workspace)
        num_tokens = plan.token_row.shape[0]
        out_type = jax.ShapeDtypeStruct((num_tokens, hidden), jnp.float32)
        (out,) = ordered_ffi_call(
            "wideep_nvlink_combine", (out_type,),
            partial_sums, recv_count, plan.token_row,
            workspace=np.int64(workspace), timeout_ms=np.int64(ffi_lib.timeout_ms()),
            max_ctas=np.int64(self.max_ctas), send_ctas=np.int64(self.send_ctas),
        )
        return out
