"""`jax.lax.ragged_dot` as a peer implementation, for benchmarking only.

Never the default: it runs at ~11 TFLOP/s on H200.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped_matmul.config import GroupedMatmulConfig


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
        x.astype(dtype), w.astype(dtype), group_sizes.astype(jnp.int32),
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
        x.astype(dtype), dy.astype(dtype), group_sizes.astype(jnp.int32), dims,
        preferred_element_type=jnp.float32,
    )
    return dw[:num_groups].astype(preferred_element_type)
