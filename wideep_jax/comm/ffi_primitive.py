"""``ordered_ffi_call``: an XLA FFI custom call that XLA keeps in order, while JAX sees no effect.

The all-to-all kernels spin on flags their peers raise, so XLA must neither
drop one nor run two of them at once (in parallel branches of a CUDA graph or
on two streams: each waits for peers whose CTAs the other holds, a hang). The
custom call's ``has_side_effect`` attribute tells XLA that. ``jax.ffi.ffi_call``
with ``has_side_effect=True`` also puts an effect in the jaxpr, and any jitted
program with an effect leaves JAX's C++ dispatch path for its Python one:
2.5 ms more host time per DeepSeek-V3 decode step at EP4, where the host
bounds the step (benchmarks/RESULTS.md, 2026-11-28). So each target is a
primitive of its own: effect-free abstract evaluation, a side-effecting custom
call in HLO.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec


def _varying(aval) -> frozenset:
    """The manual mesh axes ``aval`` varies over (shard_map with check_vma)."""
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10+: a ManualAxisType
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # older jax


def _abstract_eval(*avals_in, out_types, **_attributes):
    # The outputs vary over every manual axis an input varies over. Typed as invariant,
    # check_vma's autodiff would psum their cotangents over the EP axis (or refuse a
    # custom_vjp whose backward pass returns one).
    vma = frozenset().union(*(_varying(a) for a in avals_in))
    if not vma:
        return tuple(jax.core.ShapedArray(t.shape, t.dtype) for t in out_types)
    if not any(hasattr(a, "manual_axis_type") for a in avals_in):
        return tuple(jax.core.ShapedArray(t.shape, t.dtype, vma=vma) for t in out_types)  # older jax
    from jax._src import core  # no public constructor takes the manual axis type

    mesh = next(a.sharding.mesh for a in avals_in if _varying(a))  # the shard_map's (manual) mesh
    return tuple(core.ShapedArray(t.shape, t.dtype, sharding=NamedSharding(mesh, PartitionSpec()),
                                  manual_axis_type=core.ManualAxisType(varying=vma)) for t in out_types)


@functools.cache
def _primitive(target: str) -> Primitive:
    prim = Primitive(target)
    prim.multiple_results = True
    prim.def_abstract_eval(_abstract_eval)
    lowering = jax.ffi.ffi_lowering(target, has_side_effect=True)
    mlir.register_lowering(prim, lambda ctx, *args, out_types, **attrs: lowering(ctx, *args, **attrs),
                           platform="cuda")
    return prim


def ordered_ffi_call(target: str, out_types: Sequence[jax.ShapeDtypeStruct], *operands,
                     **attributes: np.generic) -> tuple[jax.Array, ...]:
    """Calls FFI target ``target`` (registered for CUDA) on ``operands``; returns one array
    per ``out_types``. ``attributes`` (NumPy scalars) become the handler's attributes."""
    out_types = tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in out_types)
    return tuple(_primitive(target).bind(*operands, out_types=out_types, **attributes))
