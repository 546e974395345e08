"""Dense jnp references: simple, obviously right, O(M * G) work. For tests only."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.schedule import clipped_sizes


def _group_one_hot(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[M, G] float32 one-hot of each row's group; rows past sum(group_sizes) are all-zero.

    Negative sizes count as 0, as in the implementations (each size is clipped to
    [0, M] first: the int32 cumsum of sizes near int32's max would overflow)."""
    ends = jnp.cumsum(clipped_sizes(group_sizes, num_rows))
    # Row r belongs to the first group whose end is > r; rows past the total get G.
    row_group = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")
    return jax.nn.one_hot(row_group, group_sizes.shape[0], dtype=jnp.float32)


def grouped_matmul_reference(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None
) -> jax.Array:
    """out[r] = x[r] @ w[group(r)] in float32; rows past sum(group_sizes) are 0."""
    out_dtype = preferred_element_type or x.dtype
    one_hot = _group_one_hot(group_sizes, x.shape[0])
    out = jnp.einsum(
        "mg,mk,gkn->mn", one_hot, x.astype(jnp.float32), w.astype(jnp.float32)
    )
    return out.astype(out_dtype)


def grouped_matmul_transposed_reference(
    x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None
) -> jax.Array:
    """dw[g] = x[rows_g].T @ dy[rows_g] in float32, shape [G, K, N]."""
    out_dtype = preferred_element_type or x.dtype
    one_hot = _group_one_hot(group_sizes, x.shape[0])
    dw = jnp.einsum(
        "mg,mk,mn->gkn", one_hot, x.astype(jnp.float32), dy.astype(jnp.float32)
    )
    return dw.astype(out_dtype)
