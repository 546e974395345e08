"""Every benchmark script runs end to end at its CPU smoke size and prints its table.

The benchmarks only run for real on GPU machines, which CI never has; without
this they could rot between GPU sessions (an import renamed, an argument
changed) and fail when device time is scarcest. Each runs in a subprocess with
``--small --no-write`` (RESULTS.md stays untouched).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# script, extra arguments, implementations its table must name
SCRIPTS = [
    ("bench_alltoall.py", [], ["| 128 | xla |", "| 4096 | xla |"]),
    ("bench_alltoall.py", ["--ep", "8"], ["EP8", "| 4096 | xla |"]),  # issue 7's shape
    ("bench_grouped_matmul.py", [], ["| gate/up | 1024 | uniform | xla loop |", "| down x weight |"]),
    ("bench_grouped_matmul.py", ["--phase", "wgrad"], ["| gate/up dW |", "| down dW |", "dense (same FLOPs)"]),
    ("bench_model.py", [], ["alltoall=xla (xla), expert_kernel=xla", "alltoall=auto (xla), expert_kernel=auto"]),
    ("bench_moe_layer.py", [], ["| 128 |"]),
    ("bench_eplb.py", [], ["| "]),
    ("bench_permute.py", [], ["| "]),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra,expected", SCRIPTS, ids=[" ".join([s, *e]) for s, e, _ in SCRIPTS])
def test_benchmark_smoke_run(script, extra, expected):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    before = (ROOT / "benchmarks" / "RESULTS.md").read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--small", "--no-write", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("| ") and "---" not in line]
    assert len(rows) >= 2, proc.stdout[-3000:]  # a header and at least one result
    for text in expected:
        assert text in proc.stdout, f"{text!r} missing from {script}'s output:\n{proc.stdout[-3000:]}"
    assert (ROOT / "benchmarks" / "RESULTS.md").read_bytes() == before, "--no-write must not append"
