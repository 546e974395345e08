"""Communication backends for expert-parallel dispatch/combine."""
from __future__ import annotations

from wideep_jax.comm.base import AllToAllBackend, ReceivedTokens
from wideep_jax.comm.xla import XlaAllToAll

_BACKENDS: dict[str, type] = {"xla": XlaAllToAll}


def get_alltoall_backend(name: str) -> AllToAllBackend:
    """Returns the backend named ``name`` (``"auto"`` resolves to the best available).

    Only the portable ``"xla"`` backend exists so far; ``"auto"`` picks it.
    """
    resolved = "xla" if name == "auto" else name
    if resolved not in _BACKENDS:
        raise ValueError(
            f"alltoall_backend={name!r} is not available; allowed: {['auto', *_BACKENDS]}"
        )
    return _BACKENDS[resolved]()


__all__ = ["AllToAllBackend", "ReceivedTokens", "XlaAllToAll", "get_alltoall_backend"]
