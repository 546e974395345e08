"""``forward_jit``: jit a function that reads an NNX module, without ``nnx.jit``'s state round trip.

``nnx.jit`` hands every Variable of the module back as an output of the
compiled program, so XLA copies each weight on every call: 73 % of a
DeepSeek-V3 decode step's device time at EP4, which went from 23.5 to 6.6 ms
without them (benchmarks/RESULTS.md, 2026-11-28). A forward pass changes no
Variable, so ``forward_jit`` passes the module's arrays in and returns only the
function's result.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx


class ForwardJit:
    """A jitted ``fn(module, *args, **kwargs)``; see `forward_jit`."""

    def __init__(self, fn: Callable[..., Any], static_argnames: tuple[str, ...], donate: tuple[int, ...]):
        def pure(graphdef, state, *args, **kwargs):
            return fn(nnx.merge(graphdef, state), *args, **kwargs)

        # jax.jit maps static_argnames to positions through the signature: give pure
        # fn's, with the module replaced by (graphdef, state). Given static_argnums
        # too, jax.jit no longer derives them, so both are spelled out.
        signature = inspect.signature(fn)
        _check_arguments(signature, static_argnames, donate)
        head = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in ("_graphdef", "_state")]
        pure.__signature__ = signature.replace(parameters=head + list(signature.parameters.values())[1:])
        # Only parameters that can be passed by position get a number; keyword-only ones
        # are static through static_argnames alone.
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params = [n for n, p in pure.__signature__.parameters.items() if p.kind in positional]
        static = (0,) + tuple(params.index(n) for n in static_argnames if n in params)
        # pure's arguments are (graphdef, state, *args): fn's argument i is pure's i + 1.
        self.jitted = jax.jit(pure, static_argnums=static, static_argnames=static_argnames,
                              donate_argnums=tuple(i + 1 for i in donate))

    def __call__(self, module: nnx.Module, *args, **kwargs):
        """Runs on the module's current Variables (read by a graph traversal per call)."""
        graphdef, state = nnx.split(module)
        return self.jitted(graphdef, state, *args, **kwargs)

    def bind(self, module: nnx.Module) -> BoundForward:
        """The same function on ``module``'s Variables found now, without a traversal per call:
        for a loop of many short calls (decode). Call ``refresh()`` after changing them."""
        return BoundForward(self.jitted, module)


class BoundForward:
    """`ForwardJit.bind`'s result: ``f(*args, **kwargs)`` on the module's Variables found at
    bind or at the last ``refresh()``."""

    def __init__(self, jitted, module: nnx.Module):
        self._jitted, self._module = jitted, module
        self.refresh()

    def refresh(self) -> None:
        """Re-reads the module's Variables (after an online balancer replaced weights)."""
        self._graphdef, self._state = nnx.split(self._module)

    def __call__(self, *args, **kwargs):
        return self._jitted(self._graphdef, self._state, *args, **kwargs)


def forward_jit(fn: Callable[..., Any], *, static_argnames: str | Sequence[str] = (),
                donate_argnums: int | Sequence[int] = ()) -> ForwardJit:
    """``jax.jit`` of ``fn(module, *args, **kwargs)`` for an ``fn`` that does not change the module.

    Called as ``f(module, *args, **kwargs)``, like ``nnx.jit(fn)``. The module's
    Variables are read at every call, so weights replaced between calls (an online
    balancer) are used, and a different module of the same structure reuses the
    compiled program; ``f.bind(module)`` skips that read (a graph traversal: 2 ms
    of host time per decode step of a 5-layer DeepSeek-V3-shaped model at EP4,
    benchmarks/RESULTS.md) in decode loops. Changes ``fn``
    makes to the module's Variables are not kept: use ``nnx.jit`` for a training
    step. ``donate_argnums`` count ``fn``'s positional arguments with the module as
    0 (which cannot be donated); donate a KV cache that ``fn`` returns updated, so
    XLA updates it in place instead of copying all of it every step.
    """
    allowed = "allowed: positions >= 1 (0 is the module, whose weights the caller keeps)"
    try:  # a bool is an int to Python: True would donate argument 1 without a word
        donate = ((donate_argnums,) if isinstance(donate_argnums, int) and not isinstance(donate_argnums, bool)
                  else tuple(donate_argnums))
    except TypeError:
        raise ValueError(f"forward_jit donate_argnums={donate_argnums!r}: {allowed}, an int or a sequence "
                         "of ints") from None
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in donate):
        raise ValueError(f"forward_jit donate_argnums={donate_argnums!r}: {allowed}")
    try:
        names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"forward_jit static_argnames={static_argnames!r}: allowed: a parameter name of fn, "
                         "or a sequence of them")
    if not callable(fn):
        raise ValueError(f"forward_jit fn={fn!r}: allowed: a callable fn(module, *args, **kwargs)")
    return ForwardJit(fn, names, donate)


def _check_arguments(signature: inspect.Signature, static_argnames: tuple[str, ...],
                     donate: tuple[int, ...]) -> None:
    """Names and positions that ``fn``'s signature has, said in ``fn``'s own numbering
    (jax.jit's errors would count ``pure``'s arguments, one more than the caller's)."""
    params = list(signature.parameters.values())
    kinds = {p.kind for p in params}
    positional = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if not positional and inspect.Parameter.VAR_POSITIONAL not in kinds:
        raise ValueError(f"forward_jit fn{signature}: allowed: a function whose first parameter is the module")
    module = positional[0] if positional else None
    named = [p.name for p in params[1:] if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                           inspect.Parameter.VAR_KEYWORD)]
    for name in static_argnames:
        if name == module:
            raise ValueError(f"forward_jit static_argnames={name!r}: that is fn's module parameter (its arrays "
                             f"are traced, its structure is static already); allowed: fn's other parameters "
                             f"({', '.join(named) or 'none'})")
        if name not in named and inspect.Parameter.VAR_KEYWORD not in kinds:
            raise ValueError(f"forward_jit static_argnames={name!r}: fn{signature} has no such parameter; "
                             f"allowed: {', '.join(named) or 'none (fn takes only the module)'}")
    if inspect.Parameter.VAR_POSITIONAL not in kinds:
        for i in donate:
            if i >= len(positional):
                raise ValueError(f"forward_jit donate_argnums={i}: fn{signature} has positional arguments "
                                 f"0..{len(positional) - 1} (0 the module); allowed: "
                                 + (f"1..{len(positional) - 1}" if len(positional) > 1 else
                                    "none (fn takes no positional argument after the module)"))
