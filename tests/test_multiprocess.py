"""Wide EP across processes (hosts) on CPU: jax.distributed with gloo collectives.

The EP group of a real deployment spans hosts, one process each. Here two
processes with four emulated CPU devices each form one EP8 group. Checked:
the layer and the online balancer in every re-sharding mode
(tests/multiprocess_child.py), and the main job, whose tokens must equal a
one-process run of the same EP8 program.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from wideep_jax import cli

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    # The test process's device-count flag must not reach the children: each sets its own.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(commands: list[list[str]], timeout: float = 600) -> list[str]:
    """Starts every command at once and returns each one's stdout; each must exit 0.

    Once one fails the others would wait for it in a collective, so they are
    killed then, and at the time limit: a failure never becomes a hang."""
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [subprocess.Popen(c, stdout=out, stderr=err, text=True, env=_env(), cwd=ROOT)
             for c, (out, err) in zip(commands, files)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for pair in files:
        for f in pair:
            f.seek(0)
        texts.append(tuple(f.read() for f in pair))
        for f in pair:
            f.close()
    for c, p, (out, err) in zip(commands, procs, texts):
        assert p.returncode == 0, f"{' '.join(c[1:3])}: exit {p.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return [out for out, _ in texts]


def test_layer_and_online_eplb_across_two_processes(tmp_path, rng):
    port, seed = _free_port(), int(rng.integers(2**31))
    child = str(ROOT / "tests" / "multiprocess_child.py")
    outs = _run_processes([[sys.executable, child, str(pid), "2", str(port), str(tmp_path), str(seed), "cpu"]
                           for pid in range(2)])
    for pid, out in enumerate(outs):
        assert f"OK <{pid}>" in out, out[-3000:]
    # Process 0 alone wrote the statistics: one file per EP rank of the group.
    assert sorted(f.name for f in (tmp_path / "stats").iterdir()) == (
        ["meta_info.json"] + [f"rank{r}.safetensors" for r in range(8)])


def _report(out: str) -> list[str]:
    """The main job's result lines: per-layer balance and the generated tokens."""
    return [line for line in out.splitlines() if re.match(r"  (layer \d+:|\[\d+\])", line)]


def test_main_job_across_two_processes_matches_one_process():
    port = _free_port()
    run = [sys.executable, "-m", "wideep_jax.cli", "run", "--max-new-tokens", "4", "--batch", "4"]
    outs = _run_processes([run + ["--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}",
                                  "--num-processes", "2", "--process-id", str(pid)] for pid in range(2)]
                          + [run + ["--cpu-devices", "8"]])
    two, quiet, one = outs
    assert "on 8 cpu devices, WIDEEP" in two and "online EPLB" in two, two[-2000:]
    assert len(_report(one)) == 3 + 4, one[-2000:]  # 3 MoE layers, 4 prompts
    assert _report(two) == _report(one)
    assert _report(quiet) == [] and "wideep run:" not in quiet  # process 0 reports, the others stay quiet


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2"], "allowed only with --coordinator HOST:PORT"),
    (["--coordinator", "auto", "--process-id", "0"], "allowed only with --coordinator HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2"], "needs --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id=2: allowed: 0..1"),
])
def test_main_job_distributed_flag_errors(argv, message, capsys):
    assert cli.main(["run", "--max-new-tokens", "1", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_main_job_coordinator_auto_outside_a_cluster():
    """A fresh process (jax.distributed must start before any backend) with no cluster
    variables: one line naming the flag, exit 2, no hang."""
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MPI_"))}
    proc = subprocess.run([sys.executable, "-m", "wideep_jax.cli", "run", "--coordinator", "auto"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "wideep: error: --coordinator=auto: jax.distributed found no cluster to read" in proc.stderr
