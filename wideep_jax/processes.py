"""What the processes of a multi-process run (``jax.distributed``) must agree on.

Every process runs the same compiled program over the whole EP group; JAX checks
neither that they do nor that an error on one stops the others. A setting that
differs between processes (a prompt, ``EXPERT_STATISTIC_ITER_RANGE``, which adds
the statistics' collectives) makes them compile different programs that wait on
each other for ever, or mixes rows of different inputs without a word; an error
on one process leaves the others waiting in a collective. `agree` exchanges each
process's settings and errors through the coordinator's key-value store, so every
process raises the same error instead.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Mapping

import jax

AGREE_TIMEOUT_S = 300.0
"""How long a process waits for the others to reach the same point (as
``jax.distributed.initialize`` waits for them to join)."""

_rounds: dict[str, itertools.count] = {}
_joined = False


class DisagreementError(ValueError):
    """The processes of a run had different settings, or one of them failed a step."""


def raised_alike(error: BaseException) -> bool:
    """True for an error that `agree` raised on every process of the run (each can then
    end normally: they all reach jax.distributed's shutdown barrier)."""
    return getattr(error, "wideep_raised_alike", False)


def mark_raised_alike(error: Exception) -> Exception:
    """``error``, marked as raised on every process (see `raised_alike`)."""
    error.wideep_raised_alike = True
    return error


def mark_joined() -> None:
    """Called by ``wideep run`` once it has joined a multi-process run: from then on an
    error of this process that the others may not share ends it at once (`exit_now`)."""
    global _joined
    _joined = True


def in_multiprocess_run() -> bool:
    """True once ``wideep run`` has joined a run of several processes (not for a script
    that called ``jax.distributed.initialize`` itself). Starts no backend."""
    from jax._src import distributed

    return _joined and (distributed.global_state.num_processes or 1) > 1


def exit_now(code: int) -> None:
    """Ends a process of a multi-process run at once. A normal exit waits in
    ``jax.distributed``'s shutdown barrier for every other process (300 s by default),
    which a process stuck in a collective with this one never reaches; gone, this one
    is noticed by the others' heartbeat instead (100 s by default) or at once by a
    collective with it."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _client():
    from jax._src import distributed  # the coordinator's key-value store (no public API)

    return distributed.global_state.client


def agree(step: str, settings: Mapping[str, str] | None = None, error: Exception | None = None, *,
          timeout_s: float = AGREE_TIMEOUT_S) -> None:
    """Every process of the run calls this at the same point, after ``step``.

    Raises on every process, the same way, when any process passes an ``error``
    (its own is re-raised where it happened; the others get a
    :class:`DisagreementError` naming the process and its message), or when a value of
    ``settings`` (name -> a short text, e.g. a flag's value or a digest) differs
    between processes (the error names it and each process's value). A process that
    does not reach the same step within ``timeout_s`` is an unshared error here. One
    process: raises ``error`` if given, else returns at once.
    """
    client = _client()
    if client is None or jax.process_count() == 1:
        if error is not None:
            raise error
        return
    me, count = jax.process_index(), jax.process_count()
    # Keyed by step and its count: a process that skipped or timed out of one step never
    # reads another step's record.
    name = re.sub(r"\W+", "_", step)
    key = f"wideep_agree/{name}/{next(_rounds.setdefault(name, itertools.count()))}/"
    said = None if error is None else (str(error) if isinstance(error, (ValueError, OSError))
                                       else f"{type(error).__name__}: {error}")  # a bug's type helps
    mine = {"step": step, "error": said, "settings": dict(settings or {})}
    client.key_value_set(key + str(me), json.dumps(mine))
    records = {me: mine}
    deadline = time.monotonic() + timeout_s  # for all of them, not per process
    for pid in range(count):
        if pid == me:
            continue
        try:
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            records[pid] = json.loads(client.blocking_key_value_get(key + str(pid), left_ms))
        except Exception as err:  # jax raises its own deadline error type
            message = f"process {pid} did not finish {step} within {timeout_s:g} s ({str(err).splitlines()[0]})"
            raise DisagreementError(message + ("" if error is None else f"; this process failed too: {error}"))
    if error is not None:
        raise mark_raised_alike(error)
    failed = [pid for pid in range(count) if records[pid]["error"] is not None]
    if failed:
        raise mark_raised_alike(DisagreementError(
            f"process {failed[0]} failed {step}: {records[failed[0]]['error']}"
            + (f" (processes {failed[1:]} failed too)" if len(failed) > 1 else "")))
    for setting in mine["settings"]:
        values = [records[pid]["settings"].get(setting) for pid in range(count)]
        if len(set(values)) > 1:
            raise mark_raised_alike(DisagreementError(
                f"{setting} differs between the processes of this run: "
                + ", ".join(f"process {pid}: {value}" for pid, value in enumerate(values))
                + "; allowed: the same on every process (each runs the same program over the whole EP group)"))
