"""FFI library build, load and host-side layout: review regressions (CPU; one GPU test).

* The build key covers every source and header under ``ffi/csrc`` (``.cuh``,
  ``.hpp``, subfolders), not only ``*.cu``/``*.h`` at its top; ``.cc`` files compile.
* nvcc's own environment (``NVCC_APPEND_FLAGS`` ...) changes the key like a flag.
* ``WIDEEP_CACHE_DIR`` empty means the default, ``~`` is expanded, a relative path
  is made absolute.
* A cached library that is empty or cut short is built again, not loaded.
* A cached library that does not load (or lacks the handlers) is an FfiBuildError
  naming the file and the rebuild command, not a bare OSError / AttributeError.
* The NVLink layout with payload 0 (``x [T, 0]``) is one empty piece; it divided
  by zero (SIGFPE) in the host code every dispatch runs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from test_comm_ffi import _fake_toolchain as fake_nvcc_and_nccl
from wideep_jax.comm import ffi_build, ffi_lib

NVCC_ENV = ffi_build.NVCC_ENV  # what nvcc reads itself


def _fake_toolchain(tmp_path, monkeypatch, elf: Path | None = None) -> None:
    """test_comm_ffi's stand-in nvcc and NCCL tree; this nvcc copies ``elf`` to its -o argument
    (none: it fails), and nvcc's own environment variables are unset."""
    body = "exit 1"
    if elf is not None:
        body = textwrap.dedent(f"""\
            out=""; prev=""
            for a in "$@"; do if [ "$prev" = "-o" ]; then out="$a"; fi; prev="$a"; done
            cp "{elf}" "$out"
            """)
    fake_nvcc_and_nccl(tmp_path, monkeypatch, body)
    for name in NVCC_ENV:
        monkeypatch.delenv(name, raising=False)


def _copied_sources(tmp_path, monkeypatch) -> Path:
    src = tmp_path / "csrc"
    shutil.copytree(ffi_build.SOURCE_DIR, src)
    monkeypatch.setattr(ffi_build, "SOURCE_DIR", src)
    return src


def test_build_key_covers_every_source_and_header(tmp_path, monkeypatch):
    _fake_toolchain(tmp_path, monkeypatch)
    src = _copied_sources(tmp_path, monkeypatch)
    (src / "detail").mkdir()
    included = [src / "tiles.cuh", src / "detail" / "math.h", src / "detail" / "policy.hpp"]
    for f in included:
        f.write_text("// v1\n")
    base = ffi_build.library_path()
    for f in included:
        f.write_text("// v2\n")
        assert ffi_build.library_path() != base, f"editing {f.relative_to(src)} kept the key"
        f.write_text("// v1\n")
        assert ffi_build.library_path() == base
    # A C++ translation unit is compiled, not only hashed.
    (src / "host_side.cc").write_text("int wideep_host_side() { return 1; }\n")
    cmd = ffi_build.nvcc_command(Path("out"), ("90",))
    assert str(src / "host_side.cc") in cmd and str(src / "nvlink_alltoall.cu") in cmd
    assert str(src / "tiles.cuh") not in cmd  # headers are not translation units


@pytest.mark.parametrize("name", NVCC_ENV)
def test_build_key_follows_nvccs_environment(tmp_path, monkeypatch, name):
    """nvcc reads these itself: a build with NVCC_APPEND_FLAGS=-G is another build."""
    _fake_toolchain(tmp_path, monkeypatch)
    base = ffi_build.library_path()
    monkeypatch.setenv(name, "-G" if "FLAGS" in name else "/usr/bin/g++-12")
    assert ffi_build.library_path() != base
    monkeypatch.delenv(name)
    assert ffi_build.library_path() == base


def test_cache_dir_empty_tilde_and_relative(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WIDEEP_CACHE_DIR", "")
    assert ffi_build._cache_root() == tmp_path / "home" / ".cache" / "wideep_jax"  # not the working dir
    monkeypatch.setenv("WIDEEP_CACHE_DIR", "~/wc")
    assert ffi_build._cache_root() == tmp_path / "home" / "wc"  # not a folder named '~'
    monkeypatch.setenv("WIDEEP_CACHE_DIR", "rel/cache")
    assert ffi_build._cache_root() == tmp_path / "rel" / "cache"
    assert ffi_build._cache_root().is_absolute()


def _an_elf_library() -> Path:
    """Some whole 64-bit ELF shared library this process has loaded (libc)."""
    for line in open("/proc/self/maps"):
        path = Path(line.split()[-1])
        if path.name.startswith(("libc.so", "libm.so")) and path.read_bytes()[:5] == b"\x7fELF\x02":
            return path
    pytest.skip("no libc.so / libm.so in /proc/self/maps")


@pytest.mark.parametrize("damage", ["empty", "cut", "not_elf"])
def test_an_incomplete_cached_library_is_built_again(tmp_path, monkeypatch, damage):
    """An empty or cut file where the library should be (a crash before its data reached the
    disk) was returned as built, and every later process failed to load it."""
    elf = _an_elf_library()
    _fake_toolchain(tmp_path, monkeypatch, elf=elf)
    out = ffi_build.library_path()
    out.parent.mkdir(parents=True)
    whole = elf.read_bytes()
    out.write_bytes({"empty": b"", "cut": whole[: len(whole) // 2], "not_elf": b"garbage" * 100}[damage])
    assert ffi_build.build_library() == out
    assert out.read_bytes() == whole  # rebuilt (the stand-in nvcc copies the ELF file)
    assert ffi_build.build_library() == out  # and now cached


def test_a_library_that_does_not_load_names_the_file_and_the_fix(tmp_path, monkeypatch):
    bad = tmp_path / "libwideep_ffi.so"
    bad.write_bytes(b"\x7fELF" + b"\0" * 200)
    libm = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    monkeypatch.setattr(ffi_lib, "_lib", None)
    monkeypatch.setattr(ffi_lib, "nccl_library_file", lambda: libm)
    monkeypatch.setattr(ffi_lib, "build_library", lambda: bad)
    with pytest.raises(ffi_build.FfiBuildError, match=rf"{bad}.*wideep build-ffi --force"):
        ffi_lib.library()
    monkeypatch.setattr(ffi_lib, "build_library", lambda: libm)  # loads, but has no handlers
    with pytest.raises(ffi_build.FfiBuildError, match=r"lacks \['WideepNvlinkDispatch'.*wideep build-ffi --force"):
        ffi_lib.library()
    assert ffi_lib._lib is None


_LAYOUT_WORKER = """
import ctypes, sys
from wideep_jax.comm import ffi_build
from wideep_jax.comm.nvlink import _align16, _half_bytes
lib = ctypes.CDLL(str(ffi_build.build_library()))
lib.wideep_nvlink_layout.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64,
                                     ctypes.POINTER(ctypes.c_int64)]
lib.wideep_last_error.restype = ctypes.c_char_p
for combine in (0, 1):
    for ranks, capacity, top_k in ((1, 8, 2), (4, 8, 2), (8, 4096, 8)):
        row = 0 if combine else _align16(2 * top_k * 4)
        half = _half_bytes(ranks, capacity, 0, row)
        out = (ctypes.c_int64 * 6)()
        rc = lib.wideep_nvlink_layout(combine, ranks, 132, capacity, 0, top_k, 0, 0, half, out)
        print(combine, ranks, rc, list(out), lib.wideep_last_error().decode(), flush=True)
        assert rc == 0 and out[2] == 1 and out[3] == 0, (combine, ranks, list(out))
print("OK")
"""


def test_nvlink_layout_of_an_empty_row_is_one_empty_piece(tmp_path):
    """Dispatch of x [T, 0] (only slots and weights move) planned its layout with a
    division by a zero piece size: SIGFPE, the process gone. Needs nvcc + NCCL headers."""
    try:
        ffi_build.find_nvcc()
        ffi_build.nccl_paths()
    except ffi_build.FfiBuildError as e:
        pytest.skip(str(e))
    script = tmp_path / "worker.py"
    script.write_text(_LAYOUT_WORKER)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2, reason="needs 2+ CUDA GPUs")
@pytest.mark.parametrize("backend", ["nccl", "nvlink"])
@pytest.mark.parametrize("tokens, hidden", [(0, 64), (6, 0)])
def test_gpu_empty_tokens_or_rows_match_xla(rng, backend, tokens, hidden):
    """No tokens (nvlink dispatch returned before writing recv_count) or no hidden bytes
    (its layout divided by zero): counts, slots and weights equal the portable path's."""
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from numpy.testing import assert_array_equal

    from test_dispatch import random_slots, random_valid, random_weights
    from test_gpu_comm import SPR, _round_trip

    num_ranks, top_k = 2, 2
    mesh, fn = _round_trip(backend, num_ranks, jax.numpy.float32)
    _, ref = _round_trip("xla", num_ranks, jax.numpy.float32)
    sharding = NamedSharding(mesh, P("ep"))
    x = np.ones((num_ranks * tokens, hidden), np.float32)
    slots = np.concatenate([random_slots(rng, "random", tokens, top_k, num_ranks, SPR) for _ in range(num_ranks)])
    weights = random_weights(rng, (num_ranks * tokens, top_k))
    valid = np.concatenate([random_valid(rng, "random", tokens) for _ in range(num_ranks)])
    args = [jax.device_put(a, sharding) for a in (x, slots, weights, valid)]
    for _ in range(3):  # the garbage a skipped write leaves shows on reuse
        for got, want in zip(fn(*args), ref(*args)):
            assert_array_equal(np.asarray(got), np.asarray(want))
