"""The Pallas Triton backend, where the installed jax still has it.

JAX deprecates Pallas' Triton lowering in favour of Mosaic GPU. The Triton
kernels here import it through this module, so `pallas_kernels` keeps importing
on a jax without it: defaults then pick other implementations, and naming a
Triton kernel raises an error that says what to use instead.
"""
from __future__ import annotations

import jax

try:
    from jax.experimental.pallas import triton as plgpu_triton
except ImportError:  # a jax that dropped the backend
    plgpu_triton = None


def available() -> bool:
    """Whether this jax has the Pallas Triton backend."""
    return plgpu_triton is not None


def require(kernel: str) -> None:
    """Raises if the backend is missing, naming ``kernel`` and the alternatives."""
    if plgpu_triton is None:
        raise NotImplementedError(
            f"{kernel} is a Pallas Triton kernel, and jax {jax.__version__} has no Pallas Triton backend; "
            "use implementation 'mosaic_gpu' (Hopper) or 'xla' instead")
