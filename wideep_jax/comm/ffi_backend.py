"""What the FFI backends (NCCL, NVLink) share: set-up from the mesh and gradients.

Dispatch and combine are each other's transposes: the cotangent of a
dispatched row goes back to its source token exactly like a partial sum does
(summed over the ranks the token went to), and the cotangent of a partial sum
reaches an expert rank exactly like a token row does. So each backend only
implements the two forward custom calls; ``custom_vjp`` here reuses them for
the backward pass.

The custom calls go through `ffi_primitive.ordered_ffi_call`: XLA keeps them
in order (a side-effecting custom call), JAX sees no effect (fast dispatch).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from wideep_jax.comm.base import ReceivedTokens, check_layout
from wideep_jax.comm.ffi_lib import ep_groups
from wideep_jax.dispatch import DispatchPlan


class FfiAllToAll:
    """Base of the custom-call backends; subclasses implement ``_dispatch`` and ``_combine``."""

    name = "ffi"

    def __init__(self, mesh: Mesh, axis: str):
        if mesh is None:
            raise ValueError(f"alltoall_backend={self.name!r} needs the device mesh")
        self.groups = ep_groups(mesh, axis)
        self.num_ranks = len(self.groups[0])
        self.axis = axis

    def _check(self, plan: DispatchPlan, axis_name: str, partial_sums: jax.Array | None = None) -> None:
        # The custom calls talk to the groups of the axis given at construction, whatever
        # axis_name says: another axis (of the same size) would exchange along the wrong one.
        if axis_name != self.axis:
            raise ValueError(f"axis_name={axis_name!r}, but this {self.name} backend was built for the mesh "
                             f"axis {self.axis!r}; allowed: {self.axis!r}")
        check_layout(plan, axis_name, partial_sums)

    def dispatch(self, x: jax.Array, plan: DispatchPlan, *, axis_name: str) -> ReceivedTokens:
        """Sends each local token ``x[T, H]`` once to every rank in ``plan``; only real rows move."""
        self._check(plan, axis_name)  # the EP group is fixed by the mesh given at construction
        return ReceivedTokens(*_dispatch(self, x, plan))

    def combine(self, partial_sums: jax.Array, plan: DispatchPlan, recv_count: jax.Array, *,
                axis_name: str) -> jax.Array:
        """Returns ``[T, H]`` float32: per token, the sum of its partial rows from every rank."""
        self._check(plan, axis_name, partial_sums)
        return _combine(self, partial_sums, plan, recv_count)

    # Forward custom calls, one per backend.
    def _dispatch(self, x, plan):  # -> (recv_x, recv_slot, recv_weight, recv_count)
        raise NotImplementedError

    def _combine(self, partial_sums, plan, recv_count):  # -> [T, H] float32
        raise NotImplementedError


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == bool:
        return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch(backend, x, plan):
    return backend._dispatch(x, plan)


def _dispatch_fwd(backend, x, plan):
    out = backend._dispatch(x, plan)
    return out, (plan, out[3])


def _dispatch_bwd(backend, residuals, cotangents):
    plan, recv_count = residuals
    d_x, _, d_weight, _ = cotangents  # d_x has x's dtype (recv_x's)
    dx = backend._combine(d_x, plan, recv_count).astype(d_x.dtype)
    # The second combine waits for the first: independent, XLA could run the two as parallel
    # branches (a command buffer in concurrent mode), and two all-to-all kernels spinning on
    # each other's peers at once can hang.
    dx, d_weight = jax.lax.optimization_barrier((dx, d_weight))
    # Each (token, k) pair lives on one rank, so summing the weight cotangents
    # over ranks and reading them back where the pair was sent is exact.
    d_pair = backend._combine(d_weight.astype(jnp.float32), plan, recv_count)  # [T, K]
    d_send_weight = jnp.where(plan.send_slot >= 0, d_pair[plan.send_token], 0.0)
    d_plan = jax.tree.map(_zero_cotangent, plan)._replace(send_weight=d_send_weight)
    return dx, d_plan


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine(backend, partial_sums, plan, recv_count):
    return backend._combine(partial_sums, plan, recv_count)


def _combine_fwd(backend, partial_sums, plan, recv_count):
    # A zero-size array carries the dtype (residuals must be arrays).
    return backend._combine(partial_sums, plan, recv_count), (plan, recv_count, partial_sums[:0, :0, :0])


def _combine_bwd(backend, residuals, d_y):
    plan, recv_count, like = residuals
    dtype = like.dtype
    d_partial = backend._dispatch(d_y.astype(dtype), plan)[0]
    # Rows past each source's count were never sent; their cotangent is zero.
    capacity = d_partial.shape[1]
    live = jnp.arange(capacity)[None, :, None] < recv_count[:, None, None]
    d_partial = jnp.where(live, d_partial, jnp.zeros((), dtype))
    return d_partial, jax.tree.map(_zero_cotangent, plan), _zero_cotangent(recv_count)


_combine.defvjp(_combine_fwd, _combine_bwd)
