"""Executes every ``notebooks/*.ipynb`` top to bottom; a cell that raises fails the test.

Each notebook runs in a fresh kernel of the interpreter running pytest (so the same
virtual environment and ``wideep_jax``), on 8 emulated CPU devices. A notebook sets
``JAX_PLATFORMS`` / ``XLA_FLAGS`` itself in its first code cell, before it imports jax;
the kernel's environment says the same, so the kernel never looks for a GPU even if
that cell changes. The stored notebooks must also keep their outputs (they are read on
GitHub) and stay small.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "wideep-jax-test-python3"
MAX_BYTES = 1_000_000

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the kernel process: a kernel spec for ``sys.executable`` (found
    first on ``JUPYTER_PATH``), CPU-only jax with 8 devices, the repo importable."""
    share = tmp_path_factory.mktemp("jupyter")
    spec_dir = share / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (tests)",
        "language": "python",
    }))
    env = dict(os.environ)
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(share), env.get("JUPYTER_PATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)  # let the kernel use its inline backend
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning on frozen modules
    return env


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_with_outputs(path):
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size} bytes; keep it under {MAX_BYTES} (smaller figures, lower dpi)"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    missing = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not missing, f"{path.name}: code cells {missing} were saved unexecuted; save it executed"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was saved with an error output: {errors[0].get('ename')}"
    # jax reads these once, at import: the first code cell sets them, before any import of jax.
    first = code[0].source
    assert "xla_force_host_platform_device_count" in first and "JAX_PLATFORMS" in first, (
        f"{path.name}: the first code cell must set JAX_PLATFORMS and XLA_FLAGS (8 CPU devices)")
    assert "import jax" not in first.split("xla_force_host_platform_device_count")[0], (
        f"{path.name}: jax is imported before XLA_FLAGS is set")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env, monkeypatch):
    # The kernel spec is looked up in this process, the rest is the kernel's environment.
    monkeypatch.setenv("JUPYTER_PATH", kernel_env["JUPYTER_PATH"])
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL_NAME, allow_errors=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute(env=kernel_env)  # raises CellExecutionError naming the failing cell
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
