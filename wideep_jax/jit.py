"""``forward_jit``: jit a function that reads an NNX module, without ``nnx.jit``'s state round trip.

``nnx.jit`` hands every Variable of the module back as an output of the
compiled program, so XLA copies each weight on every call: all expert weights,
12 ms of a 23 ms DeepSeek-V3 decode step at EP4 (benchmarks/RESULTS.md,
2026-11-28). A forward pass changes no Variable, so ``forward_jit`` passes the
module's arrays in and returns only the function's result.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx


def forward_jit(fn: Callable[..., Any], *, static_argnames: str | Sequence[str] = (),
                donate_argnums: int | Sequence[int] = ()) -> Callable[..., Any]:
    """``jax.jit`` of ``fn(module, *args, **kwargs)`` for an ``fn`` that does not change the module.

    Called as ``f(module, *args, **kwargs)``, like ``nnx.jit(fn)``. The module's
    Variables are read at every call, so weights replaced between calls (an online
    balancer) are used, and a different module of the same structure reuses the
    compiled program. Changes ``fn`` makes to the module's Variables are not kept:
    use ``nnx.jit`` for a training step. ``donate_argnums`` count ``fn``'s
    positional arguments with the module as 0 (which cannot be donated); donate a
    KV cache that ``fn`` returns updated, so XLA updates it in place instead of
    copying all of it every step.
    """
    donate = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
    if any(not isinstance(i, int) or i < 1 for i in donate):
        raise ValueError(f"forward_jit donate_argnums={donate_argnums!r}: allowed: positions >= 1 "
                         "(0 is the module, whose weights the caller keeps)")

    def pure(graphdef, state, *args, **kwargs):
        return fn(nnx.merge(graphdef, state), *args, **kwargs)

    # jax.jit maps static_argnames to positions through the signature: give pure
    # fn's, with the module replaced by (graphdef, state).
    signature = inspect.signature(fn)
    rest = list(signature.parameters.values())[1:]
    head = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_ONLY) for name in ("_graphdef", "_state")]
    pure.__signature__ = signature.replace(parameters=head + rest)

    names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    # pure's arguments are (graphdef, state, *args): fn's argument i is pure's i + 1.
    # Given static_argnums, jax.jit no longer derives positions from static_argnames.
    params = list(pure.__signature__.parameters)
    static = (0,) + tuple(params.index(name) for name in names if name in params)
    jitted = jax.jit(pure, static_argnums=static, static_argnames=names,
                     donate_argnums=tuple(i + 1 for i in donate))

    def call(module: nnx.Module, *args, **kwargs):
        graphdef, state = nnx.split(module)
        return jitted(graphdef, state, *args, **kwargs)

    call.jitted = jitted  # for compile-cache checks (``jitted._cache_size()``)
    return call
