"""The grouped-matmul entry points: validate, pick an implementation, add the VJP."""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import ragged_dot, xla
from pallas_kernels.grouped_matmul.config import GroupedMatmulConfig, default_config

# name -> module with `gmm` and `tgmm` (same keyword signature). Pallas kernels
# register here later; "ragged_dot" is a benchmarking peer and never a default.
_IMPLEMENTATIONS: dict[str, types.ModuleType] = {"xla": xla, "ragged_dot": ragged_dot}
IMPLEMENTATIONS: tuple[str, ...] = tuple(_IMPLEMENTATIONS)
DEFAULT_IMPLEMENTATION = "xla"  # on every platform, until the Pallas kernels land


def _resolve(implementation: str | None) -> str:
    name = DEFAULT_IMPLEMENTATION if implementation is None else implementation
    if name not in _IMPLEMENTATIONS:
        raise ValueError(
            f"unknown grouped_matmul implementation {name!r}; "
            f"allowed: {', '.join(IMPLEMENTATIONS)} (or None for the default)"
        )
    return name


def _check_group_sizes(group_sizes: jax.Array, num_groups: int) -> None:
    if group_sizes.shape != (num_groups,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be an integer array of shape ({num_groups},), "
            f"got {group_sizes.dtype}{list(group_sizes.shape)}"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gmm(name: str, config: GroupedMatmulConfig, out_dtype, x, w, group_sizes):
    impl = _IMPLEMENTATIONS[name]
    return impl.gmm(x, w, group_sizes, config=config, preferred_element_type=out_dtype)


def _gmm_fwd(name, config, out_dtype, x, w, group_sizes):
    return _gmm(name, config, out_dtype, x, w, group_sizes), (x, w, group_sizes)


def _gmm_bwd(name, config, out_dtype, residuals, dy):
    x, w, group_sizes = residuals
    impl = _IMPLEMENTATIONS[name]
    # dx uses the same grouping with w^T; padding rows fall outside every group -> 0.
    dx = _gmm(name, config, x.dtype, dy, jnp.swapaxes(w, 1, 2), group_sizes)
    dw = impl.tgmm(
        x, dy, group_sizes, num_groups=w.shape[0], config=config,
        preferred_element_type=w.dtype,
    )
    return dx, dw, None  # group_sizes is integer data: no cotangent


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str | None = None,
    config: GroupedMatmulConfig | None = None,
    preferred_element_type=None,
) -> jax.Array:
    """Rows of x sorted by group, each times its group's weight.

    Args:
      x: [M, K] rows, grouped contiguously: group g owns rows
        [offset_g, offset_g + group_sizes[g]) with offset the exclusive cumsum.
      w: [G, K, N] per-group weights.
      group_sizes: int [G], may hold zeros; sum <= M. Data, not shape: changing it
        never recompiles.
      implementation: backend name (see IMPLEMENTATIONS); None picks the default.
      config: tiling; None uses default_config() (platform-dependent).
      preferred_element_type: output dtype (default x.dtype). Accumulation is f32.

    Returns:
      [M, N]; rows at or past sum(group_sizes) are 0. Differentiable in x and w.
    """
    name = _resolve(implementation)
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x [M, K] and w [G, K, N], got {x.shape} and {w.shape}")
    _check_group_sizes(group_sizes, w.shape[0])
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    return _gmm(name, config or default_config(x.shape[0], w.shape[0]), out_dtype, x, w, group_sizes)


def grouped_matmul_transposed(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    implementation: str | None = None,
    config: GroupedMatmulConfig | None = None,
    preferred_element_type=None,
) -> jax.Array:
    """Per-group x^T @ dy (the weight gradient of `grouped_matmul`).

    Args:
      x: [M, K]; dy: [M, N]; group_sizes: int [G] as in `grouped_matmul`.
      num_groups: number of leading groups to return (default G, must be <= G);
        rows of later groups are skipped.
      implementation, config: as in `grouped_matmul`.
      preferred_element_type: output dtype (default x.dtype). Accumulation is f32.

    Returns:
      dw [num_groups, K, N] with dw[g] = x[rows_g].T @ dy[rows_g]; empty groups 0.
    """
    name = _resolve(implementation)
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"expected x [M, K] and dy [M, N], got {x.shape} and {dy.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D, got shape {group_sizes.shape}")
    total_groups = group_sizes.shape[0]
    _check_group_sizes(group_sizes, total_groups)
    num_groups = total_groups if num_groups is None else num_groups
    if not 0 <= num_groups <= total_groups:
        raise ValueError(f"num_groups must be in [0, {total_groups}], got {num_groups}")
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    return _IMPLEMENTATIONS[name].tgmm(
        x, dy, group_sizes, num_groups=num_groups,
        config=config or default_config(x.shape[0], total_groups), preferred_element_type=out_dtype,
    )
