"""Launching the several processes of one multi-process (multi-host) test run."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on this host now (for jax.distributed's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**overrides: str) -> dict[str, str]:
    """This environment without the test process's device flags (each child sets its
    own), with the repository and tests/ importable, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(overrides)
    return env


def run_processes(commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], *,
                  timeout: float) -> list[str]:
    """Starts every command at once (command ``i`` with ``envs[i]``) and returns each
    one's stdout; each must exit 0.

    Once one fails the others would wait for it in a collective, so they are killed
    then, and at the time limit: a failure never becomes a hang."""
    results = _run(commands, envs, timeout=timeout, stop_on_failure=True)
    # The first failure is the one to read: report the processes that failed by
    # themselves before those killed because of them.
    late = max(r[3] for r in results) >= timeout
    for i in sorted(range(len(results)), key=lambda i: results[i][0] is None):
        code, out, err, _ = results[i]
        why = (f"exit {code}" if code is not None else
               f"killed at the {timeout:.0f} s time limit" if late else "killed after another process failed")
        assert code == 0, f"process {i} ({' '.join(commands[i][1:3])}): {why}\n{out[-2000:]}\n{err[-3000:]}"
    return [out for _, out, _, _ in results]


def run_processes_to_end(commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], *,
                         timeout: float) -> list[tuple[int | None, str, str, float]]:
    """Starts every command at once and waits for each to end by itself (or the time
    limit, when the rest are killed): ``(exit code or None if killed, stdout, stderr,
    seconds)`` per command. For runs that must fail alike on every process."""
    return _run(commands, envs, timeout=timeout, stop_on_failure=False)


def _run(commands, envs, *, timeout: float, stop_on_failure: bool) -> list[tuple[int | None, str, str, float]]:
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs: list[subprocess.Popen] = []
    start = time.monotonic()
    ended: dict[int, float] = {}
    try:
        for c, env, (out, err) in zip(commands, envs, files, strict=True):
            procs.append(subprocess.Popen(list(c), stdout=out, stderr=err, text=True, env=dict(env), cwd=ROOT))
        while len(ended) < len(procs) and time.monotonic() - start < timeout:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - start
            if stop_on_failure and any(procs[i].returncode != 0 for i in ended):
                break
            time.sleep(0.1)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
            elif i not in ended:  # ended since the last look
                ended[i] = time.monotonic() - start
    results = []
    for i, (p, pair) in enumerate(zip(procs, files)):
        for f in pair:
            f.seek(0)
        out, err = (f.read() for f in pair)
        for f in pair:
            f.close()
        results.append((p.returncode if i in ended else None, out, err, ended.get(i, time.monotonic() - start)))
    return results
