"""`jax.lax.ragged_dot` as a peer implementation, for benchmarking only.

Never the default: it runs at ~11 TFLOP/s on H200.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped_matmul.config import GroupedMatmulConfig
from pallas_kernels.grouped_matmul.schedule import group_bounds


def clipped_group_sizes(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """int32 [G] sizes read as the other implementations read them (`xla.make_work_items`,
    `schedule.tile_schedule`): negative sizes count as 0 and groups are cut at
    ``num_rows`` (a group reaching past it loses its tail, later groups are empty).

    `lax.ragged_dot` itself has no defined result for a negative size or a sum past M.
    """
    starts, ends = group_bounds(group_sizes, num_rows)
    return ends - starts


def gmm(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    config: GroupedMatmulConfig,
    preferred_element_type: jnp.dtype,
) -> jax.Array:
    del config  # no tiling knobs
    dtype = jnp.result_type(x, w)
    out = lax.ragged_dot(
        x.astype(dtype), w.astype(dtype), clipped_group_sizes(group_sizes, x.shape[0]),
        preferred_element_type=jnp.float32,
    )
    return out.astype(preferred_element_type)


def tgmm(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int,
    config: GroupedMatmulConfig,
    preferred_element_type: jnp.dtype,
) -> jax.Array:
    del config
    dtype = jnp.result_type(x, dy)
    # Ragged contracting dimension: one [K, N] output per group.
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    dw = lax.ragged_dot_general(
        x.astype(dtype), dy.astype(dtype), clipped_group_sizes(group_sizes, x.shape[0]), dims,
        preferred_element_type=jnp.float32,
    )
    return dw[:num_groups].astype(preferred_element_type)
