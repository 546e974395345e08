"""Communication backends for expert-parallel dispatch/combine.

All share :class:`AllToAllBackend`'s interface, so ``moe_config.alltoall_backend``
(or ``$WIDEEP_ALLTOALL``, which overrides it) switches them:

* ``xla``: ``jax.lax.all_to_all`` on padded buffers; any platform.
* ``nccl``: XLA FFI custom call, grouped NCCL send/recv of the real rows; GPUs,
  one or several processes.
* ``nvlink``: XLA FFI custom call, one-sided peer stores; GPUs of one process
  with peer access.
* ``auto``: ``nvlink`` for one process with peer-connected GPUs, ``nccl``
  across processes, ``xla`` on CPU and for an EP group of one GPU (and, with a
  warning, on GPUs where the FFI library cannot be built: no nvcc or NCCL headers).

``nccl`` or ``nvlink`` asked for by name on a mesh of non-GPU devices is a
ValueError naming the config key or the variable that asked, never ``xla``.
"""
from __future__ import annotations

import os
import warnings

from jax.sharding import Mesh

from wideep_jax.comm.base import AllToAllBackend, ReceivedTokens
from wideep_jax.comm.xla import XlaAllToAll

BACKEND_NAMES = ("auto", "xla", "nccl", "nvlink")
ENV_VAR = "WIDEEP_ALLTOALL"


def resolve_alltoall_backend(name: str, mesh: Mesh | None = None, axis: str = "ep") -> str:
    """The concrete backend ``name`` means here: ``$WIDEEP_ALLTOALL`` overrides it,
    and ``auto`` becomes ``xla``, ``nccl`` or ``nvlink`` for ``mesh``."""
    env = os.environ.get(ENV_VAR)
    if env:
        name, source = env.strip().lower(), f"{ENV_VAR}={env!r}"
    else:
        name, source = str(name).lower(), f"alltoall_backend={name!r}"
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} is not a communication backend; allowed: {list(BACKEND_NAMES)}")
    platforms = set() if mesh is None else {d.platform for d in mesh.devices.flat}
    if name != "auto":
        if name != "xla" and platforms - {"gpu"}:
            # Never a silent fallback: the user asked for this backend by name.
            raise ValueError(f"{source} needs GPU devices, the mesh has {sorted(platforms)} devices; "
                             "allowed there: 'xla' or 'auto'")
        return name
    if mesh is None or platforms - {"gpu"}:
        return "xla"
    if mesh.shape.get(axis) == 1:
        # One rank: no token leaves its device, so nothing needs the FFI library (built on first use).
        return "xla"
    from wideep_jax.comm import ffi_lib
    from wideep_jax.comm.ffi_build import FfiBuildError

    try:
        if ffi_lib.peer_access(ffi_lib.ep_groups(mesh, axis)):
            return "nvlink"
        # nccl needs the library too; peer_access need not have built it (groups across processes).
        ffi_lib.library()
        return "nccl"
    except FfiBuildError as err:
        # auto must still run where no toolchain is installed; say so loudly.
        warnings.warn(f"{source} uses 'xla': the FFI all-to-all library cannot be built here ({err}). "
                      "Choose alltoall_backend: xla (or WIDEEP_ALLTOALL=xla) to make that explicit.",
                      RuntimeWarning, stacklevel=2)
        return "xla"


def get_alltoall_backend(name: str, *, mesh: Mesh | None = None, axis: str = "ep") -> AllToAllBackend:
    """The backend for ``name`` (see :func:`resolve_alltoall_backend`) over ``mesh``'s ``axis``.

    The FFI backends build their library on first use (nvcc + NCCL headers).
    """
    resolved = resolve_alltoall_backend(name, mesh, axis)
    if resolved == "xla":
        return XlaAllToAll()
    if resolved == "nccl":
        from wideep_jax.comm.nccl import NcclAllToAll

        return NcclAllToAll(mesh, axis)
    from wideep_jax.comm.nvlink import NvlinkAllToAll

    return NvlinkAllToAll(mesh, axis)


__all__ = ["AllToAllBackend", "BACKEND_NAMES", "ReceivedTokens", "XlaAllToAll", "get_alltoall_backend",
           "resolve_alltoall_backend"]
