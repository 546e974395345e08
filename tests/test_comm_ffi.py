"""The FFI backends' CPU-side parts: the library builds, selection, errors, gradient rules.

The custom calls themselves need GPUs (``tests/test_gpu_comm.py``); here the
library must at least compile (CI has nvcc but no GPU), and the ``custom_vjp``
that turns dispatch and combine into each other's transposes is checked with
stand-in forward calls built from the portable path.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from test_dispatch import dyadic_tokens, random_slots, random_valid, random_weights
from wideep_jax.comm import XlaAllToAll, get_alltoall_backend, resolve_alltoall_backend
from wideep_jax.comm import ffi_build, ffi_lib
from wideep_jax.comm.ffi_backend import FfiAllToAll
from wideep_jax.dispatch import make_dispatch_plan

R, T, K, H, SPR = 4, 12, 4, 8, 3


def _toolchain_missing() -> str | None:
    try:
        ffi_build.find_nvcc()
        ffi_build.nccl_paths()
    except ffi_build.FfiBuildError as e:
        return str(e)
    return None


def test_library_compiles(tmp_path, monkeypatch):
    """A fresh build from ffi/csrc exports every handler and the C API (CI: nvcc, no GPU)."""
    missing = _toolchain_missing()
    if missing:
        if os.environ.get("WIDEEP_REQUIRE_FFI_BUILD"):
            pytest.fail(missing)
        pytest.skip(missing)
    monkeypatch.setenv("WIDEEP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", "90")
    path = ffi_build.build_library()
    assert path.is_file() and str(path).startswith(str(tmp_path))
    assert ffi_build.build_library() == path  # cached: same key, no rebuild
    lib = ctypes.CDLL(str(path))
    for symbol in [*ffi_lib.TARGETS.values(), "wideep_nvlink_create", "wideep_nvlink_peer_access",
                   "wideep_nvlink_layout", "wideep_nvlink_item_order", "wideep_nvlink_profile",
                   "wideep_nvlink_trace", "wideep_nvlink_trace_stamps", "wideep_nccl_init", "wideep_nccl_unique_id",
                   "wideep_last_error"]:
        assert hasattr(lib, symbol), symbol
    assert lib.wideep_nccl_version() >= 22000
    assert lib.wideep_nvlink_trace_calls() >= 2  # the trace ring bench_alltoall reads gaps from


def _built_library() -> ctypes.CDLL:
    """The library from the default cache (built if needed); skips without nvcc/NCCL."""
    missing = _toolchain_missing()
    if missing:
        if os.environ.get("WIDEEP_REQUIRE_FFI_BUILD"):
            pytest.fail(missing)
        pytest.skip(missing)
    lib = ctypes.CDLL(str(ffi_build.build_library()))
    lib.wideep_nvlink_layout.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64,
                                         ctypes.POINTER(ctypes.c_int64)]
    lib.wideep_nvlink_item_order.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                                             ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    lib.wideep_nvlink_item_order.restype = ctypes.c_int64
    lib.wideep_last_error.restype = ctypes.c_char_p
    return lib


def test_nvlink_item_order_visits_every_piece_once_row_by_row(rng):
    """The NVLink kernels' senders walk (list, row, piece) items interleaving peers
    row by row; every piece must come exactly once (a missed one hangs its
    receiver, a doubled one races), rows never going back, a row's pieces together.
    Random counts, ties, zeros, one list holding every row."""
    lib = _built_library()
    cases = [[0], [5], [3, 0, 3], [0, 0, 0, 7], [1, 2, 3, 4, 5, 6, 7]]
    cases += [list(rng.integers(0, 40, size=int(rng.integers(1, 9)))) for _ in range(60)]
    cases += [list(rng.integers(0, 4, size=63)), [0] * 62 + [9]]
    for counts in cases:
        splits = int(rng.integers(1, 17))
        arr = (ctypes.c_int64 * len(counts))(*counts)
        total = sum(counts) * splits
        out = (ctypes.c_int64 * max(3 * total, 1))()
        n = lib.wideep_nvlink_item_order(len(counts), splits, arr, total, out)
        assert n == total, (counts, splits, n, lib.wideep_last_error())
        items = np.asarray(out[:3 * total], np.int64).reshape(total, 3)
        want = sorted((j, i, k) for j, c in enumerate(counts) for i in range(c) for k in range(splits))
        assert sorted(map(tuple, items.tolist())) == want, (counts, splits)
        assert np.all(np.diff(items[:, 1]) >= 0), (counts, splits)  # rows in order
        if total:  # a (list, row)'s pieces are consecutive, in order
            assert np.all(items[:, 2].reshape(-1, splits) == np.arange(splits)), (counts, splits)
    assert lib.wideep_nvlink_item_order(3, 2, (ctypes.c_int64 * 3)(1, 2, 3), 11, out) == -1
    assert "12 items > max_items=11" in lib.wideep_last_error().decode()
    assert lib.wideep_nvlink_item_order(0, 2, arr, 10, out) == -1
    assert "lists=0" in lib.wideep_last_error().decode()


def test_nvlink_workspace_sizing_fits_every_layout(rng):
    """nvlink.py sizes workspace halves from shapes alone; the kernels' layout (grid,
    row pieces, one flag per piece) must always fit them, or a GPU call fails at run
    time. Checked over random shapes, SM counts and grids, plus the refusals."""
    from wideep_jax.comm.nvlink import MAX_PIECES, _align16, _half_bytes

    lib = _built_library()

    def layout(combine, ranks, sms, capacity, payload, top_k, max_ctas, send_ctas, half):
        out = (ctypes.c_int64 * 6)()
        rc = lib.wideep_nvlink_layout(int(combine), ranks, sms, capacity, payload, top_k, max_ctas, send_ctas,
                                      half, out)
        return rc, list(out), lib.wideep_last_error().decode()

    for _ in range(400):
        ranks = int(rng.choice([1, 2, 3, 4, 8, 16, 64]))
        sms = int(rng.choice([2, 78, 114, 132]))
        capacity = int(rng.choice([1, 5, 128, 4096, 40000]))
        payload = int(rng.choice([1, 7, 64, 136, 256, 2048, 7168])) * int(rng.choice([2, 4]))
        top_k = int(rng.choice([1, 2, 8]))
        max_ctas, send_ctas = int(rng.choice([0, 1, 3])), int(rng.choice([0, 1, 120]))
        for combine in (False, True):
            row = _align16(payload) + (0 if combine else _align16(2 * top_k * 4))
            half = _half_bytes(ranks, capacity, payload, row)
            case = f"combine={combine} R={ranks} sms={sms} C={capacity} payload={payload} K={top_k}"
            rc, (ctas, senders, pieces, piece, data, flags), err = layout(
                combine, ranks, sms, capacity, payload, top_k, max_ctas, send_ctas, half)
            assert rc == 0, f"{case}: {err}"
            assert data == ranks * capacity * row and flags == ranks * capacity * pieces * 8, case
            assert 2 <= ctas <= max(2, sms) and (senders == 0 if ranks == 1 else 1 <= senders < ctas), case
            assert 1 <= pieces <= MAX_PIECES and (pieces - 1) * piece < payload <= pieces * piece, case
            if pieces > 1:  # whole 16-byte vectors; combine: whole reduction chunks
                assert piece % (1024 if combine else 16) == 0 and payload % 16 == 0, case
            short = data * 8 // 7 // 2 // 64 * 64  # room for half the rows
            if short >= 64:
                rc, _, err = layout(combine, ranks, sms, capacity, payload, top_k, max_ctas, send_ctas, short)
                assert rc == -1 and f"needs {data} data" in err, f"{case}: {err}"
    rc, _, err = layout(False, 0, 132, 8, 64, 2, 0, 0, 1 << 20)
    assert rc == -1 and "nranks=0" in err and "allowed" in err


def test_build_key_follows_sources(tmp_path, monkeypatch):
    if _toolchain_missing():
        pytest.skip("no nvcc / NCCL headers")
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", "90")
    before = ffi_build.library_path()
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", "80,90")
    assert ffi_build.library_path() != before
    src = tmp_path / "csrc"
    src.mkdir()
    for f in ffi_build.source_files():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "common.h").write_text((src / "common.h").read_text() + "\n// edited\n")
    monkeypatch.setattr(ffi_build, "SOURCE_DIR", src)
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", "90")
    assert ffi_build.library_path() != before


def test_build_key_follows_the_compiler_flags_and_ptx_is_the_newest_arch(monkeypatch):
    """A changed nvcc flag is another build (the key hashed only sources and toolchain), and
    the PTX for GPUs newer than any listed is the newest arch, in whatever order listed."""
    if _toolchain_missing():
        pytest.skip("no nvcc / NCCL headers")
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", "90")
    before = ffi_build.library_path()
    command = ffi_build.nvcc_command
    monkeypatch.setattr(ffi_build, "nvcc_command", lambda out, archs: [*command(out, archs), "-lineinfo"])
    assert ffi_build.library_path() != before
    monkeypatch.setattr(ffi_build, "nvcc_command", command)
    assert ffi_build.library_path() == before
    cmd = " ".join(ffi_build.nvcc_command(Path("out"), ("100", "90")))
    assert "arch=compute_100,code=compute_100" in cmd and "code=compute_90" not in cmd


def test_build_key_follows_the_nccl_library_dir(tmp_path, monkeypatch):
    """The NCCL lib dir is baked in as rpath, so another venv's NCCL means another build."""
    if _toolchain_missing():
        pytest.skip("no nvcc / NCCL headers")
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", "90")
    include, lib_dir = ffi_build.nccl_paths()
    before = ffi_build.library_path()
    (tmp_path / "lib").symlink_to(lib_dir)  # same files, another venv's path
    monkeypatch.setattr(ffi_build, "nccl_paths", lambda: (include, tmp_path / "lib"))
    assert ffi_build.library_path() != before


_STALE_RPATH_WORKER = """
import os
os.environ["JAX_PLATFORMS"] = "cpu"
from wideep_jax.comm import ffi_lib
lib = ffi_lib.library()
print("LOADED", lib.wideep_nccl_version(), flush=True)
"""


def test_library_loads_when_its_rpath_is_stale(tmp_path):
    """A cached library whose rpath names a NCCL that is gone (the venv it was built in was
    deleted) still loads: ``library()`` loads the current NCCL by path first (CI failed so)."""
    lib_file = ffi_build.build_library() if not _toolchain_missing() else None
    if lib_file is None:
        pytest.skip("no nvcc / NCCL headers")
    _, nccl_lib = ffi_build.nccl_paths()
    blob = lib_file.read_bytes()
    old = str(nccl_lib).encode() + b"\0"
    assert blob.count(old) == 1, "the NCCL lib dir should appear once, as the rpath"
    stale = tmp_path / "cache" / lib_file.relative_to(ffi_build._cache_root())
    stale.parent.mkdir(parents=True)
    stale.write_bytes(blob.replace(old, b"/gone".ljust(len(old), b"\0")))  # same length: ELF intact
    script = tmp_path / "worker.py"
    script.write_text(_STALE_RPATH_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LD_LIBRARY_PATH")}
    env["WIDEEP_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "LOADED" in proc.stdout
    # it was found in the cache, not rebuilt under another key or over the stale file
    assert [p.name for p in (tmp_path / "cache" / "ffi").iterdir()] == [stale.parent.name]
    assert stale.read_bytes().count(b"/gone") == 1


def test_missing_toolchain_says_what_to_install(monkeypatch):
    monkeypatch.delenv("NVCC", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setattr(ffi_build, "FALLBACK_CUDA_HOMES", ())
    with pytest.raises(ffi_build.FfiBuildError, match="install the CUDA toolkit"):
        ffi_build.find_nvcc()
    monkeypatch.delenv("NCCL_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.nccl", None)
    with pytest.raises(ffi_build.FfiBuildError, match="pip install nvidia-nccl-cu13"):
        ffi_build.nccl_paths()


def test_nvcc_or_nccl_home_set_to_nothing_is_refused(tmp_path, monkeypatch):
    """$NVCC / $NCCL_HOME pointing nowhere: an error naming the variable and its value, not
    a build with the toolkit or NCCL found elsewhere (PATH, the pip package), where both
    exist too."""
    _fake_toolchain(tmp_path, monkeypatch, "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])  # a working nvcc on PATH
    assert ffi_build.find_nvcc() == str(tmp_path / "nvcc")
    assert ffi_build.nccl_paths() == (tmp_path / "nccl" / "include", tmp_path / "nccl" / "lib")
    for value in (str(tmp_path / "missing" / "nvcc"), str(tmp_path)):  # absent; a folder
        monkeypatch.setenv("NVCC", value)
        with pytest.raises(ffi_build.FfiBuildError, match=f"NVCC='{re.escape(value)}' is no executable file"):
            ffi_build.find_nvcc()
    (tmp_path / "half" / "include").mkdir(parents=True)
    for value in (str(tmp_path / "missing"), str(tmp_path / "half")):
        monkeypatch.setenv("NCCL_HOME", value)
        with pytest.raises(ffi_build.FfiBuildError, match=f"NCCL_HOME='{re.escape(value)}' has no include/nccl.h"):
            ffi_build.nccl_paths()


def _fake_toolchain(tmp_path, monkeypatch, nvcc_body: str) -> None:
    """A stand-in nvcc (a shell script) and NCCL tree, and an empty cache."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo fake nvcc; exit 0; fi\n{nvcc_body}\n')
    nvcc.chmod(0o755)
    (tmp_path / "nccl" / "include").mkdir(parents=True)
    (tmp_path / "nccl" / "include" / "nccl.h").write_text("#define NCCL_MAJOR 2\n")
    (tmp_path / "nccl" / "lib").mkdir()
    (tmp_path / "nccl" / "lib" / "libnccl.so.2").write_bytes(b"")
    monkeypatch.setenv("NVCC", str(nvcc))
    monkeypatch.setenv("NCCL_HOME", str(tmp_path / "nccl"))
    monkeypatch.setenv("WIDEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", "90")


def test_a_hung_nvcc_is_stopped_with_its_children(tmp_path, monkeypatch):
    """nvcc past WIDEEP_FFI_BUILD_TIMEOUT_S: an error saying so, and its whole process group ends."""
    pid_file = tmp_path / "child.pid"
    _fake_toolchain(tmp_path, monkeypatch, f"sleep 120 &\necho $! > {pid_file}\nwait")
    monkeypatch.setenv("WIDEEP_FFI_BUILD_TIMEOUT_S", "1.5")
    start = time.monotonic()
    with pytest.raises(ffi_build.FfiBuildError, match=r"took over 1.5 s.*WIDEEP_FFI_BUILD_TIMEOUT_S"):
        ffi_build.build_library()
    assert time.monotonic() - start < 30
    child = int(pid_file.read_text())
    time.sleep(0.2)
    try:  # gone, or a zombie waiting for init: either way no longer running
        state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        assert state == "Z", f"nvcc's child {child} still runs (state {state})"
    except FileNotFoundError:
        pass
    assert not ffi_build.library_path().exists()


def test_a_held_build_lock_is_an_error_naming_its_holder(tmp_path, monkeypatch):
    """Another process building (holding the lock) past the timeout: an error, not a wait forever."""
    _fake_toolchain(tmp_path, monkeypatch, "exit 1")
    monkeypatch.setenv("WIDEEP_FFI_BUILD_TIMEOUT_S", "0.5")
    lock_path = ffi_build.library_path().parent / ".lock"
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "w") as held:  # another open file: flock conflicts even in this process
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        start = time.monotonic()
        with pytest.raises(ffi_build.FfiBuildError, match=r"waited 1 s for .*\.lock, held by process 4242"):
            ffi_build.build_library()
        assert time.monotonic() - start < 10
    assert lock_path.read_text() == "4242"  # the waiter did not wipe the holder's pid
    # Once free, the lock is taken and nvcc runs (and fails, here, with its exit code).
    with pytest.raises(ffi_build.FfiBuildError, match="failed \\(exit 1\\)"):
        ffi_build.build_library()


@pytest.mark.parametrize("value", ["0", "-3", "inf", "nan", "ten", "1e9"])
def test_bad_build_timeout_is_rejected(monkeypatch, value):
    monkeypatch.setenv("WIDEEP_FFI_BUILD_TIMEOUT_S", value)
    with pytest.raises(ffi_build.FfiBuildError, match=rf"WIDEEP_FFI_BUILD_TIMEOUT_S='{value}'.*\(0, 86400\]"):
        ffi_build.build_timeout_s()
    monkeypatch.setenv("WIDEEP_FFI_BUILD_TIMEOUT_S", "2.5")
    assert ffi_build.build_timeout_s() == 2.5


def test_bad_arch_list_is_rejected(monkeypatch):
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", "90,sm_100")
    with pytest.raises(ffi_build.FfiBuildError, match="WIDEEP_CUDA_ARCHS"):
        ffi_build.target_archs()
    # Set but naming no arch: an error naming it (nvcc_command indexed an empty tuple).
    monkeypatch.setenv("WIDEEP_CUDA_ARCHS", " , ")
    with pytest.raises(ffi_build.FfiBuildError, match="WIDEEP_CUDA_ARCHS=' , ' names no arch; allowed"):
        ffi_build.target_archs()


def _mesh(shape=(R,), names=("ep",)):
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


def test_selection_on_cpu(monkeypatch):
    mesh = _mesh()
    monkeypatch.delenv("WIDEEP_ALLTOALL", raising=False)
    assert resolve_alltoall_backend("auto", mesh, "ep") == "xla"
    assert resolve_alltoall_backend("auto") == "xla"
    assert resolve_alltoall_backend("XLA", mesh, "ep") == "xla"
    assert isinstance(get_alltoall_backend("auto", mesh=mesh), XlaAllToAll)
    monkeypatch.setenv("WIDEEP_ALLTOALL", "nvlink")  # the environment overrides the config
    assert resolve_alltoall_backend("xla") == "nvlink"  # (no mesh: on this CPU mesh, an error)
    monkeypatch.setenv("WIDEEP_ALLTOALL", "xla")
    assert resolve_alltoall_backend("nccl", mesh, "ep") == "xla"
    monkeypatch.setenv("WIDEEP_ALLTOALL", "")  # empty: unset, the config decides
    assert resolve_alltoall_backend("XLA", mesh, "ep") == "xla"
    monkeypatch.setenv("WIDEEP_ALLTOALL", "mpi")
    with pytest.raises(ValueError, match=r"WIDEEP_ALLTOALL='mpi'.*allowed: \['auto', 'xla', 'nccl', 'nvlink'\]"):
        resolve_alltoall_backend("auto", mesh, "ep")
    monkeypatch.delenv("WIDEEP_ALLTOALL")
    with pytest.raises(ValueError, match="alltoall_backend='nope'"):
        get_alltoall_backend("nope")


def test_auto_without_toolchain_warns_and_uses_xla(monkeypatch):
    """On GPUs without nvcc, auto keeps working on the portable path, with a warning."""
    class FakeDevice:
        platform = "gpu"

    class FakeMesh:
        devices = np.array([FakeDevice(), FakeDevice()])
        shape = {"ep": 2}

    def no_toolchain(groups):
        raise ffi_build.FfiBuildError("nvcc not found")

    monkeypatch.delenv("WIDEEP_ALLTOALL", raising=False)
    monkeypatch.setattr(ffi_lib, "ep_groups", lambda mesh, axis: [[1, 2]])
    monkeypatch.setattr(ffi_lib, "peer_access", no_toolchain)
    with pytest.warns(RuntimeWarning, match="nvcc not found"):
        assert resolve_alltoall_backend("auto", FakeMesh(), "ep") == "xla"
    # Groups across processes: peer_access answers False without the library, which nccl
    # needs all the same, so auto must find out now rather than fail when tracing.
    monkeypatch.setattr(ffi_lib, "peer_access", lambda groups: False)
    monkeypatch.setattr(ffi_lib, "library", lambda: no_toolchain(None))
    with pytest.warns(RuntimeWarning, match="nvcc not found"):
        assert resolve_alltoall_backend("auto", FakeMesh(), "ep") == "xla"
    monkeypatch.setattr(ffi_lib, "library", lambda: None)
    assert resolve_alltoall_backend("auto", FakeMesh(), "ep") == "nccl"
    monkeypatch.setattr(ffi_lib, "peer_access", lambda groups: True)
    assert resolve_alltoall_backend("auto", FakeMesh(), "ep") == "nvlink"


def test_auto_with_one_gpu_rank_needs_no_library(monkeypatch):
    """An EP group of one GPU moves nothing between devices: auto picks xla without building
    (or even asking for) the FFI library."""
    class FakeDevice:
        platform = "gpu"

    class FakeMesh:
        devices = np.array([[FakeDevice()], [FakeDevice()]])
        shape = {"dp": 2, "ep": 1}

    def must_not_run(*_):
        raise AssertionError("auto asked for the FFI library with one rank")

    monkeypatch.delenv("WIDEEP_ALLTOALL", raising=False)
    monkeypatch.setattr(ffi_lib, "ep_groups", must_not_run)
    monkeypatch.setattr(ffi_lib, "peer_access", must_not_run)
    assert resolve_alltoall_backend("auto", FakeMesh(), "ep") == "xla"
    FakeMesh.shape = {"dp": 1, "ep": 2}
    with pytest.raises(AssertionError, match="one rank"):
        resolve_alltoall_backend("auto", FakeMesh(), "ep")


@pytest.mark.parametrize("name", ["nccl", "nvlink"])
def test_ffi_backends_refuse_cpu_devices(name, monkeypatch):
    monkeypatch.delenv("WIDEEP_ALLTOALL", raising=False)
    with pytest.raises(ValueError, match=f"alltoall_backend='{name}'.*allowed"):
        get_alltoall_backend(name, mesh=_mesh())
    with pytest.raises(ValueError, match="needs the device mesh"):
        get_alltoall_backend(name)


@pytest.mark.parametrize("name", ["nccl", "nvlink"])
def test_ffi_backend_from_the_env_on_cpu_names_the_env(name, monkeypatch):
    """$WIDEEP_ALLTOALL asking for an FFI backend on CPU: the error names the variable and its
    value, not the config key (whose value, here 'xla', was not the one refused)."""
    monkeypatch.setenv("WIDEEP_ALLTOALL", name.upper())
    for call in (lambda: resolve_alltoall_backend("xla", _mesh(), "ep"),
                 lambda: get_alltoall_backend("xla", mesh=_mesh())):
        with pytest.raises(ValueError, match=rf"^WIDEEP_ALLTOALL='{name.upper()}' needs GPU devices.*'cpu'.*allowed"):
            call()


def test_ep_groups_follow_the_axis():
    """A 2 (data) x 4 (ep) mesh: groups are rows along ep, rank = position = axis_index."""
    mesh = _mesh((2, 4), ("data", "ep"))
    groups = ffi_lib.ep_groups(mesh, "ep")
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert [[d.id for d in g] for g in groups] == ids.tolist()
    by_data = ffi_lib.ep_groups(mesh, "data")
    assert [[d.id for d in g] for g in by_data] == ids.T.tolist()
    with pytest.raises(ValueError, match="ep_axis='x'"):
        ffi_lib.ep_groups(mesh, "x")


def test_stable_ids_and_timeout(monkeypatch):
    assert ffi_lib.stable_id("nvlink", [[0, 1]], 1 << 20) == ffi_lib.stable_id("nvlink", [[0, 1]], 1 << 20)
    assert ffi_lib.stable_id("nvlink", [[0, 1]], 1 << 20) != ffi_lib.stable_id("nvlink", [[1, 0]], 1 << 20)
    assert 0 < ffi_lib.stable_id("x") < 1 << 62
    monkeypatch.setenv("WIDEEP_COMM_TIMEOUT_S", "2.5")
    assert ffi_lib.timeout_ms() == 2500
    for bad in ("0", "-1", "soon", "inf", "nan", "1e30"):
        monkeypatch.setenv("WIDEEP_COMM_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=r"WIDEEP_COMM_TIMEOUT_S=.*allowed: a number of seconds in \(0, 86400\]"):
            ffi_lib.timeout_ms()


def test_init_timeout_env(monkeypatch):
    monkeypatch.delenv("WIDEEP_NCCL_INIT_TIMEOUT_S", raising=False)
    assert ffi_lib.init_timeout_s() == ffi_lib.DEFAULT_INIT_TIMEOUT_S
    monkeypatch.setenv("WIDEEP_NCCL_INIT_TIMEOUT_S", "90")
    assert ffi_lib.init_timeout_s() == 90.0
    for bad in ("0", "never", "inf"):
        monkeypatch.setenv("WIDEEP_NCCL_INIT_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=rf"WIDEEP_NCCL_INIT_TIMEOUT_S='{bad}'.*\(0, 86400\]"):
            ffi_lib.init_timeout_s()


class _StandInNccl:
    """The library's NCCL set-up calls, in Python: ``init`` decides what creating the
    communicators does (block on an event, fail, succeed)."""

    def __init__(self, init):
        self.init, self._error = init, b""
        self.first_call_ms = None  # what the last init passed as the first call's wait limit

    def wideep_nccl_unique_id_bytes(self):
        return 128

    def wideep_nccl_unique_id(self, buf):
        ctypes.memset(buf, 7, 128)
        return 0

    def wideep_nccl_init(self, cid, nlocal, ordinals, ranks, nranks, uids, first_call_ms):
        self.first_call_ms = first_call_ms
        return self.init(self)

    def wideep_last_error(self):
        return self._error


def test_nccl_setup_that_never_returns_is_an_error(monkeypatch):
    """Creating NCCL communicators blocks until every rank of the group joins: a process
    that never does gives an error after WIDEEP_NCCL_INIT_TIMEOUT_S, not a hang. A failure
    reports the library's message (read in the thread that made the call)."""
    monkeypatch.setattr(ffi_lib, "_nccl_sets", set())  # the stand-in's ids stay out of the real set
    release = threading.Event()
    blocked = _StandInNccl(lambda lib: 0 if release.wait(60) else -1)
    monkeypatch.setattr(ffi_lib, "library", lambda: blocked)
    monkeypatch.setenv("WIDEEP_NCCL_INIT_TIMEOUT_S", "0.5")
    groups = [jax.devices()[:2], jax.devices()[2:4]]
    start = time.monotonic()
    try:
        with pytest.raises(ffi_lib.FfiError, match=r"creating NCCL communicators of 2 ranks: no answer within 0.5 s "
                                                   r"\(WIDEEP_NCCL_INIT_TIMEOUT_S\)"):
            ffi_lib.nccl_communicators(groups)
        assert time.monotonic() - start < 10
    finally:
        release.set()

    def fail(lib):
        lib._error = b"ncclCommInitRank failed: unhandled system error"
        return -1

    failing = _StandInNccl(fail)
    monkeypatch.setattr(ffi_lib, "library", lambda: failing)
    with pytest.raises(ffi_lib.FfiError, match="creating NCCL communicators: ncclCommInitRank failed: unhandled"):
        ffi_lib.nccl_communicators(groups)
    working = _StandInNccl(lambda lib: 0)
    monkeypatch.setattr(ffi_lib, "library", lambda: working)
    monkeypatch.setenv("WIDEEP_NCCL_INIT_TIMEOUT_S", "42.5")
    cid = ffi_lib.nccl_communicators(groups)
    assert cid in ffi_lib._nccl_sets and ffi_lib.nccl_communicators(groups) == cid
    # The first all-to-all on these communicators waits for peers as long as the set-up may.
    assert working.first_call_ms == 42500


class _StandInBackend(FfiAllToAll):
    """The FFI base class's gradient rules over the portable path's forward (CPU)."""

    name = "stand-in"

    def __init__(self, mesh, axis):
        super().__init__(mesh, axis)
        self._xla = XlaAllToAll()
        self._axis = axis

    def _dispatch(self, x, plan):
        recv = self._xla.dispatch(x, plan, axis_name=self._axis)
        # The custom calls leave padding rows unspecified: make them loud.
        live = recv.valid_rows()[:, :, None]
        return (jnp.where(live, recv.x, jnp.nan).astype(x.dtype), jnp.where(live, recv.slot, -1),
                jnp.where(live, recv.weight, 0.0), recv.count)

    def _combine(self, partial_sums, plan, recv_count):
        live = (jnp.arange(partial_sums.shape[1])[None, :] < recv_count[:, None])[:, :, None]
        return self._xla.combine(jnp.where(live, partial_sums, jnp.nan), plan, recv_count, axis_name=self._axis)


def dispatch_combine_loss(comm, x, w, slots, valid):
    """dispatch -> per-row math using slot and weight -> combine -> a scalar (inside shard_map)."""
    plan = make_dispatch_plan(slots, w, valid, num_ranks=R, slots_per_rank=SPR)
    recv = comm.dispatch(x, plan, axis_name="ep")
    live = recv.valid_rows()[:, :, None]
    pair = jnp.where(recv.slot >= 0, recv.weight * (recv.slot + 1), 0.0).sum(-1, keepdims=True)
    partial = jnp.where(live, jnp.sin(recv.x) * pair, 0.0)
    y = comm.combine(partial, plan, recv.count, axis_name="ep")
    return jax.lax.psum(jnp.sum(y * jnp.cos(x)), "ep")


@pytest.mark.parametrize("mode", ["random", "one_rank", "every_rank"])
def test_ffi_gradient_rules_match_the_portable_path(rng, mode):
    """d/dx and d/dweights through dispatch -> per-row math -> combine equal XLA's autodiff."""
    mesh = _mesh()
    stand_in, xla = _StandInBackend(mesh, "ep"), XlaAllToAll()

    def grads(comm):
        f = jax.shard_map(lambda *a: jax.grad(dispatch_combine_loss, argnums=(1, 2))(comm, *a), mesh=mesh,
                          in_specs=(P("ep"),) * 4, out_specs=(P("ep"), P("ep")), check_vma=False)
        return jax.jit(f)

    sharding = NamedSharding(mesh, P("ep"))
    x = dyadic_tokens(rng, (R * T, H))
    slots = np.concatenate([random_slots(rng, mode, T, K, R, SPR) for _ in range(R)])
    valid = np.concatenate([random_valid(rng, mode, T) for _ in range(R)])
    w = random_weights(rng, slots.shape)
    args = [jax.device_put(jnp.asarray(a), sharding) for a in (x, w, slots, valid)]
    got, want = grads(stand_in)(*args), grads(xla)(*args)
    for g, e, name in zip(got, want, ("dx", "dweights")):
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=2e-5, err_msg=name)
    assert np.abs(np.asarray(want[1])).sum() > 0  # the weights do get a gradient


def test_build_ffi_command(tmp_path):
    """``wideep build-ffi`` builds (or finds) the library and prints its path."""
    if _toolchain_missing():
        pytest.skip("no nvcc / NCCL headers")
    env = dict(os.environ, WIDEEP_CACHE_DIR=str(tmp_path), WIDEEP_CUDA_ARCHS="90")
    proc = subprocess.run([sys.executable, "-m", "wideep_jax.cli", "build-ffi"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(tmp_path) in proc.stdout and "libwideep_ffi.so" in proc.stdout


_UNIQUE_ID_WORKER = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from wideep_jax.comm import ffi_lib
devices = jax.devices()
group = [d for d in devices if d.process_index == 0][:1] + [d for d in devices if d.process_index == 1][:1]
lib = ffi_lib.library()
uid = ffi_lib._group_unique_id(lib, 1234, 0, group, lib.wideep_nccl_unique_id_bytes())
print("UID", uid.hex(), flush=True)
jax.distributed.shutdown()
"""


def test_nccl_unique_id_travels_through_the_kv_store(tmp_path):
    """Two processes (jax.distributed on CPU): the group's first process makes the NCCL
    unique id and the other reads the same bytes from the key-value store."""
    if _toolchain_missing():
        pytest.skip("no nvcc / NCCL headers")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_UNIQUE_ID_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    uids = [next(line.split()[1] for line in out.splitlines() if line.startswith("UID ")) for out in outs]
    assert uids[0] == uids[1] and len(uids[0]) == 256 and set(uids[0]) != {"0"}


def test_ordered_ffi_call_is_side_effecting_in_hlo_and_effect_free_in_jax():
    """XLA must keep the all-to-all calls in order (never two at once: their spinning
    kernels would wait on each other's peers), while the jaxpr has no effect, so jitted
    programs keep JAX's fast C++ dispatch; inside shard_map the outputs vary like the inputs."""
    from wideep_jax.comm.ffi_primitive import ordered_ffi_call

    def f(x, counts):
        out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((3,), jnp.int32))
        y, n = ordered_ffi_call("wideep_test_target", out, x, counts, workspace=np.int64(7))
        return y * 2, n

    x, counts = jnp.ones((8, 16), jnp.bfloat16), jnp.arange(3, dtype=jnp.int32)
    assert jax.make_jaxpr(f)(x, counts).effects == set()
    text = jax.jit(f).trace(x, counts).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @wideep_test_target" in line]
    assert len(calls) == 1 and "has_side_effect = true" in calls[0] and "workspace = 7" in calls[0], calls
    mesh = _mesh()
    sharded = jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P()), out_specs=(P("ep"), P()), check_vma=False)
    tokens = jax.ShapeDtypeStruct((R * 8, 16), jnp.bfloat16, sharding=NamedSharding(mesh, P("ep")))
    y_aval, n_aval = jax.eval_shape(sharded, tokens, jax.ShapeDtypeStruct((3,), jnp.int32,
                                                                          sharding=NamedSharding(mesh, P())))
    assert y_aval.shape == (R * 8, 16) and n_aval.shape == (3,)
