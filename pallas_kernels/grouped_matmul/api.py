"""The grouped-matmul entry points: validate, pick an implementation, add the VJP.

Implementations (one module each, same keyword interface):
  * ``mosaic_gpu``: Pallas Mosaic GPU kernel for Hopper (wgmma, TMA, persistent,
    warp-specialized); SwiGLU and row-scale epilogues fused. Default on sm90.
  * ``triton``: Pallas kernel through the Triton lowering, any CUDA GPU; epilogues
    fused. Default on other GPUs.
  * ``xla``: a loop of XLA dots over row tiles; epilogues in XLA. Default on CPU.
  * ``ragged_dot``: ``jax.lax.ragged_dot``, a benchmarking peer, never a default.

The Pallas kernels run in their interpret modes off GPU (slow; for tests).
"""
from __future__ import annotations

import functools
import operator
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import triton_backend
from pallas_kernels.grouped_matmul import mosaic_gpu, mosaic_gpu_tgmm, ragged_dot, triton, xla
from pallas_kernels.grouped_matmul.config import GroupedMatmulConfig, default_config
from pallas_kernels.grouped_matmul.schedule import clipped_sizes

Epilogue = Literal["none", "swiglu", "row_scale"]
IMPLEMENTATIONS: tuple[str, ...] = ("mosaic_gpu", "triton", "xla", "ragged_dot")
# name -> config class it takes
_CONFIG_TYPES = {
    "mosaic_gpu": mosaic_gpu.MosaicGpuConfig,
    "triton": triton.TritonConfig,
    "xla": GroupedMatmulConfig,
    "ragged_dot": GroupedMatmulConfig,
}
_LOOP_MODULES = {"xla": xla, "ragged_dot": ragged_dot}
# Tests set this to lower the Pallas kernels for CUDA on a CPU-only machine.
_LOWER_FOR_GPU = False


def default_implementation(dtype=jnp.bfloat16, k: int = 7168, n_out: int = 4096) -> str:
    """The implementation used when none is named, for operands of ``dtype`` and a
    contraction ``k`` / output width ``n_out``.

    16-bit operands on GPU: ``mosaic_gpu`` on Hopper (sm90) when K and N are
    multiples of 64 (its swizzled tiles), else ``triton`` when they are multiples
    of 16; ``triton`` on other CUDA GPUs. Everything else (CPU, float32 operands,
    which the tensor-core kernels do not take, or odd widths) uses ``xla``, as do
    the ``triton`` cases on a jax without Pallas' (deprecated) Triton backend.
    """
    device = jax.devices()[0]
    if device.platform != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "xla"
    capability = str(getattr(device, "compute_capability", ""))
    if capability.split(".")[0] == "9" and k % 64 == 0 and n_out % 64 == 0:
        return "mosaic_gpu"
    return "triton" if k % 16 == 0 and n_out % 16 == 0 and triton_backend.available() else "xla"


def _resolve(implementation: str | None, dtype=jnp.bfloat16, k: int = 7168, n_out: int = 4096) -> str:
    name = default_implementation(dtype, k, n_out) if implementation is None else implementation
    if not isinstance(name, str) or name not in _CONFIG_TYPES:
        raise ValueError(
            f"unknown grouped_matmul implementation {name!r}; "
            f"allowed: {', '.join(IMPLEMENTATIONS)} (or None for the default)"
        )
    return name


def _resolve_config(name: str, config, num_rows: int, num_groups: int, k: int, n_out: int,
                    epilogue: Epilogue = "none"):
    expected = _CONFIG_TYPES[name]
    if config is None:
        if name == "mosaic_gpu":
            return mosaic_gpu.default_config(num_rows, num_groups, k=k, n_out=n_out, epilogue=epilogue)
        if name == "triton":
            return triton.default_config(num_rows, num_groups, k=k, n_out=n_out, epilogue=epilogue)
        return default_config(num_rows, num_groups)
    if not isinstance(config, expected):
        raise ValueError(
            f"config {config!r} does not fit implementation {name!r}: it takes a {expected.__name__}"
        )
    return config


def _check_array(name: str, value) -> None:
    """``value`` is an array (jax or NumPy), not a list or a scalar."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "ndim")):
        raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray), got {type(value).__name__}")


def _check_operands(a_name: str, a, b_name: str, b) -> None:
    """The two matmul operands: floating, and of one dtype. The GPU kernels take one
    16-bit operand dtype (float32 accumulation); the XLA paths also take float32. Mixed
    dtypes are refused rather than promoted: a float32 x against bfloat16 weights would
    otherwise run in float32 on the XLA path (and off the GPU kernels) without a word."""
    for name, value in ((a_name, a), (b_name, b)):
        _check_array(name, value)
    for name, value in ((a_name, a), (b_name, b)):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype (bfloat16, float16, float32), got {value.dtype}")
    if a.dtype != b.dtype:
        raise TypeError(
            f"{a_name} and {b_name} must have the same dtype, got {a_name} {a.dtype} and {b_name} {b.dtype}; "
            f"cast one first (e.g. {b_name}.astype({a_name}.dtype)): operands are not promoted"
        )


def _check_group_sizes(group_sizes: jax.Array, num_groups: int) -> None:
    _check_array("group_sizes", group_sizes)
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"group_sizes must have an integer dtype (e.g. int32), got {group_sizes.dtype}")
    if group_sizes.shape != (num_groups,):
        raise ValueError(
            f"group_sizes must be an integer array of shape ({num_groups},) (one size per group of w), "
            f"got {group_sizes.dtype}{list(group_sizes.shape)}"
        )


def _out_dtype(preferred_element_type, default) -> jnp.dtype:
    """``preferred_element_type`` as a floating dtype (``default`` for None)."""
    if preferred_element_type is None:
        return jnp.dtype(default)
    try:
        dtype = jnp.dtype(preferred_element_type)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"preferred_element_type must be a floating dtype (bfloat16, float16, float32) or None, "
            f"got {repr(preferred_element_type) if dtype is None else dtype.name}"
        )
    return dtype


def _live_rows(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """bool [M]: rows inside some group (the rest are padding)."""
    # Each size clipped to [0, M] first: the sum of near-int32-max sizes would overflow.
    total = jnp.minimum(jnp.sum(clipped_sizes(group_sizes, num_rows)), num_rows)
    return jnp.arange(num_rows) < total


def _swiglu(h: jax.Array) -> jax.Array:
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _forward(name, config, epilogue, out_dtype, x, w, group_sizes, row_scale):
    """The implementation's output; padding rows hold unspecified values."""
    if name in _LOOP_MODULES:
        h = _LOOP_MODULES[name].gmm(x, w, group_sizes, config=config,
                                    preferred_element_type=jnp.float32)
        if epilogue == "swiglu":
            h = _swiglu(h)
        elif epilogue == "row_scale":
            h = h * row_scale[:, None]
        return h.astype(out_dtype)
    module = mosaic_gpu if name == "mosaic_gpu" else triton
    return module.grouped_matmul(
        x, w, group_sizes, config=config, epilogue=epilogue, row_scale=row_scale,
        out_dtype=out_dtype, interpret=jax.default_backend() != "gpu" and not _LOWER_FOR_GPU,
    )


def _tgmm(name, config, x, dy, group_sizes, num_groups, out_dtype):
    """dw through ``name``'s transposed kernel. ``config``: for mosaic_gpu a
    MosaicTgmmConfig or None, for triton a TritonConfig of the transposed kernel or
    None (defaults: their own tiles, which differ from the forward's); else the
    loop modules' config."""
    interpret = jax.default_backend() != "gpu" and not _LOWER_FOR_GPU
    if name == "mosaic_gpu" and config is None:
        config = mosaic_gpu_tgmm.default_config(x.shape[1], dy.shape[1])
    if isinstance(config, mosaic_gpu_tgmm.MosaicTgmmConfig):
        return mosaic_gpu_tgmm.tgmm(x.astype(dy.dtype), dy, group_sizes, num_groups=num_groups, config=config,
                                    out_dtype=out_dtype, interpret=interpret)
    if name == "mosaic_gpu" and not triton_backend.available():
        raise NotImplementedError(
            f"mosaic_gpu's weight gradient of K={x.shape[1]}, N={dy.shape[1]} needs K a multiple of 64 and N of "
            f"128 (the Mosaic transposed kernel's tiles), or Pallas' Triton backend, which jax {jax.__version__} "
            "does not have; use implementation 'xla' for these shapes")
    if name in ("triton", "mosaic_gpu"):
        # Triton's transposed kernel; also mosaic_gpu's dW when N is not a multiple
        # of 128 (the Mosaic kernel's narrowest CTA tile).
        return triton.tgmm(x.astype(dy.dtype), dy, group_sizes, num_groups=num_groups, out_dtype=out_dtype,
                           config=config if name == "triton" else None, interpret=interpret)
    module = _LOOP_MODULES.get(name, xla)
    if module is xla and not isinstance(config, GroupedMatmulConfig):
        config = default_config(x.shape[0], group_sizes.shape[0])
    return module.tgmm(x, dy, group_sizes, num_groups=num_groups, config=config,
                       preferred_element_type=out_dtype)


# The config classes grouped_matmul_transposed takes for the Pallas kernels
# (their transposed kernels' own tilings; the forward's do not fit x^T @ dy).
_TGMM_CONFIG_TYPES = {"mosaic_gpu": mosaic_gpu_tgmm.MosaicTgmmConfig, "triton": triton.TritonConfig}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _gmm(name, config, epilogue, out_dtype, x, w, group_sizes, row_scale):
    return _forward(name, config, epilogue, out_dtype, x, w, group_sizes, row_scale)


def _gmm_fwd(name, config, epilogue, out_dtype, x, w, group_sizes, row_scale):
    out = _gmm(name, config, epilogue, out_dtype, x, w, group_sizes, row_scale)
    return out, (x, w, group_sizes, row_scale)


def _gmm_bwd(name, config, epilogue, out_dtype, residuals, dy):
    x, w, group_sizes, row_scale = residuals
    live = _live_rows(group_sizes, x.shape[0])[:, None]
    # Padding rows of the output are unspecified, so their cotangents carry nothing.
    dy = jnp.where(live, dy.astype(jnp.float32), 0.0)
    d_scale = None
    if epilogue != "none":
        # Recompute the pre-epilogue product (cheaper to store nothing but inputs). The
        # Pallas kernels write it in x's dtype: a float32 output tile would not fit
        # their shared memory next to the pipeline stages.
        h_dtype = jnp.float32 if name in _LOOP_MODULES else x.dtype
        h = _forward(name, config, "none", h_dtype, x, w, group_sizes, None).astype(jnp.float32)
        h = jnp.where(live, h, 0.0)
        if epilogue == "swiglu":
            gate, up = jnp.split(h, 2, axis=-1)
            sig = jax.nn.sigmoid(gate)
            silu = gate * sig
            dy = jnp.concatenate([dy * up * (sig + silu * (1.0 - sig)), dy * silu], axis=-1)
        else:
            d_scale = jnp.sum(dy * h, axis=-1).astype(row_scale.dtype)
            dy = dy * row_scale[:, None]
    dy = dy.astype(x.dtype)
    w_t = jnp.swapaxes(w, 1, 2)
    # The forward tiling need not fit the transposed shapes: use the default for them.
    t_config = config if name in _LOOP_MODULES else _resolve_config(
        name, None, dy.shape[0], w.shape[0], k=dy.shape[1], n_out=x.shape[1])
    dx = _forward(name, t_config, "none", x.dtype, dy, w_t, group_sizes, None)
    dx = jnp.where(live, dx, 0).astype(x.dtype)
    # dW: the Pallas kernels' transposed kernels use their own default tiles.
    dw = _tgmm(name, None if name in _TGMM_CONFIG_TYPES else config, x, dy, group_sizes, w.shape[0], w.dtype)
    return dx, dw, None, d_scale  # group_sizes is integer data: no cotangent


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# Jitted so that eager calls with new group_sizes (or new data) reuse one program: an
# eager call traces the XLA loop's while_loop afresh, and the new body misses the cache.
# `lower_for_gpu` only keys the cache: the traced code reads `_LOWER_FOR_GPU` itself.
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _gmm_jit(lower_for_gpu, name, config, epilogue, out_dtype, x, w, group_sizes, row_scale):
    del lower_for_gpu
    return _gmm(name, config, epilogue, out_dtype, x, w, group_sizes, row_scale)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 6, 7))
def _tgmm_jit(lower_for_gpu, name, config, x, dy, group_sizes, num_groups, out_dtype):
    del lower_for_gpu
    return _tgmm(name, config, x, dy, group_sizes, num_groups, out_dtype)


def _run(x, w, group_sizes, *, epilogue, row_scale, implementation, config, preferred_element_type,
         w_name="w"):
    _check_operands("x", x, w_name, w)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if w.ndim != 3:
        raise ValueError(f"{w_name} must be 3-D [G, K, N], got shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x's K={x.shape[1]} must equal {w_name}'s K={w.shape[1]} "
                         f"(x {tuple(x.shape)}, {w_name} {tuple(w.shape)})")
    if epilogue == "swiglu" and w.shape[2] % 2:
        raise ValueError(f"w_gate_up's last dim must be even (gate | up), got {w.shape[2]}")
    _check_group_sizes(group_sizes, w.shape[0])
    if row_scale is not None:
        _check_array("row_scale", row_scale)
        if row_scale.shape != (x.shape[0],):
            raise ValueError(f"row_scale must have shape ({x.shape[0]},), got {row_scale.shape}")
        # Any float dtype (routing weights are float32 next to bf16 activations): it is
        # applied in float32 whatever it is stored in.
        if not jnp.issubdtype(row_scale.dtype, jnp.floating):
            raise TypeError(f"row_scale must have a floating dtype, got {row_scale.dtype}")
    out_dtype = _out_dtype(preferred_element_type, x.dtype)
    n_out = w.shape[2] // (2 if epilogue == "swiglu" else 1)
    name = _resolve(implementation, x.dtype, x.shape[1], n_out)
    config = _resolve_config(name, config, x.shape[0], w.shape[0], x.shape[1], n_out, epilogue)
    scale = None if row_scale is None else row_scale.astype(jnp.float32)
    return _gmm_jit(_LOWER_FOR_GPU, name, config, epilogue, out_dtype, x, w, group_sizes, scale)


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    row_scale: jax.Array | None = None,
    implementation: str | None = None,
    config=None,
    preferred_element_type=None,
) -> jax.Array:
    """Rows of x sorted by group, each times its group's weight.

    Args:
      x: [M, K] rows, grouped contiguously: group g owns rows
        [offset_g, offset_g + group_sizes[g]) with offset the exclusive cumsum.
        A floating dtype: bfloat16 / float16 for the GPU kernels, float32 too for
        `xla` and `ragged_dot`.
      w: [G, K, N] per-group weights, of x's dtype. Operands are never promoted: a
        dtype mismatch (say float32 x, bfloat16 w) is a TypeError; cast first.
      group_sizes: integer [G], may hold zeros; sum <= M. Data, not shape: changing
        it never recompiles. Not checked (it is data), and read the same way by
        every implementation: negative sizes count as 0, and rows past M are cut
        off (the groups that reach past M lose their tail).
      row_scale: optional float [M], any float dtype (applied in float32); row r
        of the product is scaled by row_scale[r] inside the kernel (the routing
        weight of the down projection).
      implementation: one of IMPLEMENTATIONS; None picks `default_implementation`
        for the operands' dtype.
      config: the implementation's tiling dataclass; None uses its default. It
        tiles the forward product; the gradients' kernels use their own defaults.
      preferred_element_type: a floating output dtype (default x.dtype).
        Accumulation is f32.

    Returns:
      [M, N]. Rows at or past sum(group_sizes) are padding: not computed, and
      their values are unspecified (the Pallas kernels never write them).
      Differentiable in x, w and row_scale.
    """
    return _run(x, w, group_sizes, epilogue="none" if row_scale is None else "row_scale",
                row_scale=row_scale, implementation=implementation, config=config,
                preferred_element_type=preferred_element_type)


def grouped_swiglu(
    x: jax.Array,
    w_gate_up: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str | None = None,
    config=None,
    preferred_element_type=None,
) -> jax.Array:
    """``silu(x @ gate) * (x @ up)`` per group, fused into one grouped matmul.

    Args:
      x, group_sizes, implementation, config, preferred_element_type: as in
        `grouped_matmul`.
      w_gate_up: [G, K, 2I] of x's dtype, gate columns then up columns.

    Returns:
      [M, I]; padding rows unspecified. Differentiable in x and w_gate_up.
    """
    return _run(x, w_gate_up, group_sizes, epilogue="swiglu", row_scale=None,
                implementation=implementation, config=config,
                preferred_element_type=preferred_element_type, w_name="w_gate_up")


def grouped_matmul_transposed(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    implementation: str | None = None,
    config=None,
    preferred_element_type=None,
) -> jax.Array:
    """Per-group x^T @ dy (the weight gradient of `grouped_matmul`).

    Args:
      x: [M, K]; dy: [M, N] of x's dtype (not promoted: a mismatch is a
        TypeError); group_sizes: integer [G], read as in `grouped_matmul`.
      num_groups: an int, the number of leading groups to return (default G,
        must be <= G); rows of later groups are skipped.
      implementation, config: as in `grouped_matmul`, except that the Pallas
        implementations take their transposed kernels' tilings (a forward config
        is an error): `mosaic_gpu` runs the Mosaic GPU transposed kernel
        (`mosaic_gpu_tgmm.tgmm`; config a `MosaicTgmmConfig`, None for
        `mosaic_gpu_tgmm.default_config`, which needs K a multiple of 64 and N of
        128, else the Triton one runs); `triton` runs the Triton transposed kernel
        (`triton.tgmm`; config a `TritonConfig` for it, None for
        `triton.default_tgmm_config`).
      preferred_element_type: a floating output dtype (default x.dtype).
        Accumulation is f32.

    Returns:
      dw [num_groups, K, N] with dw[g] = x[rows_g].T @ dy[rows_g]; empty groups 0.
    """
    _check_operands("x", x, "dy", dy)
    for arg, value in (("x", x), ("dy", dy)):
        if value.ndim != 2:
            raise ValueError(f"{arg} must be 2-D [M, {'K' if arg == 'x' else 'N'}], got shape {tuple(value.shape)}")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x and dy must have the same number of rows M, got x {tuple(x.shape)} "
                         f"and dy {tuple(dy.shape)}")
    _check_array("group_sizes", group_sizes)
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D [G], got shape {tuple(group_sizes.shape)}")
    total_groups = group_sizes.shape[0]
    _check_group_sizes(group_sizes, total_groups)
    if num_groups is None:
        num_groups = total_groups
    else:
        # Static: it sets the output's shape. A bool or float is refused, not truncated.
        try:
            if isinstance(num_groups, bool):
                raise TypeError
            num_groups = operator.index(num_groups)
        except TypeError:
            raise TypeError(f"num_groups must be an int (static: it sets dw's shape) or None, "
                            f"got {num_groups!r} ({type(num_groups).__name__})") from None
    if not 0 <= num_groups <= total_groups:
        raise ValueError(f"num_groups must be in [0, {total_groups}], got {num_groups}")
    out_dtype = _out_dtype(preferred_element_type, x.dtype)
    name = _resolve(implementation, x.dtype, x.shape[1], dy.shape[1])
    if name in _TGMM_CONFIG_TYPES:
        expected = _TGMM_CONFIG_TYPES[name]
        if config is not None and not isinstance(config, expected):
            raise ValueError(f"config {config!r} does not fit grouped_matmul_transposed with implementation "
                             f"{name!r}: it takes a {expected.__name__} (its transposed kernel's tiles) or None")
    else:
        config = _resolve_config(name, config, x.shape[0], total_groups, x.shape[1], dy.shape[1])
    return _tgmm_jit(_LOWER_FOR_GPU, name, config, x, dy, group_sizes, num_groups, out_dtype)
