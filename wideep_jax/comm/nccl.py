"""NCCL backend: grouped ``ncclSend``/``ncclRecv`` of only the real rows.

Works within one process and across processes (communicators are created per
device; the unique ids travel through ``jax.distributed``'s key-value store).
Each call exchanges the row counts on the device, then waits once on the host
for them to size the sends; a wait past ``WIDEEP_COMM_TIMEOUT_S`` aborts the
communicator and fails the call instead of hanging. Kernels: ``ffi/csrc/nccl_alltoall.cu``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wideep_jax.comm import ffi_lib
from wideep_jax.comm.ffi_backend import FfiAllToAll
from wideep_jax.comm.ffi_primitive import ordered_ffi_call
from wideep_jax.comm.xla import gather_partials


class NcclAllToAll(FfiAllToAll):
    """Dispatch/combine with NCCL point-to-point calls from an XLA custom call."""

    name = "nccl"

    def __init__(self, mesh, axis: str):
        super().__init__(mesh, axis)
        if any(d.platform != "gpu" for g in self.groups for d in g):
            raise ValueError("alltoall_backend='nccl' needs GPU devices; allowed on CPU: 'xla'")

    def _comm(self) -> int:
        return ffi_lib.nccl_communicators(self.groups)

    def _dispatch(self, x, plan):
        num_ranks, capacity, top_k = plan.send_slot.shape
        send_x = x[plan.send_token]  # [R, C, H]; rows past the counts are never sent
        weight_bits = jax.lax.bitcast_convert_type(plan.send_weight.astype(jnp.float32), jnp.int32)
        send_meta = jnp.concatenate([plan.send_slot, weight_bits], axis=-1)
        out_types = (
            jax.ShapeDtypeStruct(send_x.shape, x.dtype),
            jax.ShapeDtypeStruct(send_meta.shape, jnp.int32),
            jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
        )
        recv_x, recv_meta, recv_count = ordered_ffi_call(
            "wideep_nccl_dispatch", out_types, send_x, send_meta, plan.send_count, comm=np.int64(self._comm()),
            timeout_ms=np.int64(ffi_lib.timeout_ms()))
        # Rows past the counts were not written; give their pairs no slot.
        live = (jnp.arange(capacity)[None, :] < recv_count[:, None])[..., None]
        slot = jnp.where(live, recv_meta[..., :top_k], -1)
        weight = jnp.where(live, jax.lax.bitcast_convert_type(recv_meta[..., top_k:], jnp.float32), 0.0)
        return recv_x, slot, weight, recv_count

    def _combine(self, partial_sums, plan, recv_count):
        (back,) = ordered_ffi_call(
            "wideep_nccl_combine", (jax.ShapeDtypeStruct(partial_sums.shape, partial_sums.dtype),),
            partial_sums, recv_count, plan.send_count, comm=np.int64(self._comm()),
            timeout_ms=np.int64(ffi_lib.timeout_ms()))
        return gather_partials(back, plan.token_row)
