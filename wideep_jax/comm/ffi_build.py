"""Builds the FFI library (``ffi/csrc``) with nvcc into a cache.

The library has no Python ABI: C++/CUDA against XLA's FFI headers
(``jax.ffi.include_dir()``) and NCCL (the ``nvidia-nccl-cu13`` package).
It is cached under ``$WIDEEP_CACHE_DIR`` (default ``~/.cache/wideep_jax``),
keyed by the hash of every source and header in ``ffi/csrc``, the jaxlib and
NCCL versions, NCCL's directory (the library's rpath), nvcc (its version, flags
and ``NVCC_PREPEND_FLAGS``/``NVCC_APPEND_FLAGS``/``NVCC_CCBIN``) and the GPU
architectures, so editing a source or upgrading jaxlib rebuilds it. Built on first use or by ``wideep build-ffi``,
within ``$WIDEEP_FFI_BUILD_TIMEOUT_S``.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import signal
import tempfile
import time
from pathlib import Path

LIBRARY_NAME = "libwideep_ffi.so"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "ffi" / "csrc"
DEFAULT_ARCHS = ("80", "90")  # what CI compiles for when no GPU is visible
FALLBACK_CUDA_HOMES = ("/usr/local/cuda",)
BUILD_TIMEOUT_ENV = "WIDEEP_FFI_BUILD_TIMEOUT_S"
DEFAULT_BUILD_TIMEOUT_S = 1200.0  # CI's 2-core build of two archs takes about 20 s
MAX_TIMEOUT_S = 86400  # a day: the kernels take their limit as int64 milliseconds


class FfiBuildError(RuntimeError):
    """The FFI library could not be built; the message says what to install."""


# What nvcc compiles (each one a translation unit) and what they may include (-I ffi/csrc).
COMPILED_SUFFIXES = (".cu", ".cc", ".cpp", ".cxx")
SOURCE_SUFFIXES = (*COMPILED_SUFFIXES, ".h", ".hh", ".hpp", ".hxx", ".cuh", ".inc", ".inl")
# Environment variables nvcc itself reads: they change the build as flags do.
NVCC_ENV = ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN")


def source_files() -> list[Path]:
    """The library's sources and headers (``ffi/csrc/**``: ``.cu``, ``.cc``, ``.h``, ``.cuh``, ...), sorted."""
    if not SOURCE_DIR.is_dir():
        raise FfiBuildError(
            f"FFI sources not found at {SOURCE_DIR}; install wideep-jax from a source checkout "
            "(pip install -e .) so ffi/csrc ships with it"
        )
    return sorted(p for p in SOURCE_DIR.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())


def find_nvcc() -> str:
    """Path of nvcc: ``$NVCC``, then ``PATH``, then ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``."""
    given = os.environ.get("NVCC")
    if given and not (Path(given).is_file() and os.access(given, os.X_OK)):
        # Set on purpose: another nvcc from PATH would build against another toolkit unannounced.
        raise FfiBuildError(f"NVCC={given!r} is no executable file; allowed: the path of nvcc (>= 12.4), "
                            "or NVCC unset (PATH, then $CUDA_HOME/bin)")
    candidates = [given, shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *FALLBACK_CUDA_HOMES):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise FfiBuildError(
        "nvcc not found (looked at $NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin); install the "
        "CUDA toolkit (nvcc >= 12.4) or point $NVCC / $CUDA_HOME at it, "
        "or choose alltoall_backend: xla (WIDEEP_ALLTOALL=xla)"
    )


def nccl_paths() -> tuple[Path, Path]:
    """(include dir, lib dir) of NCCL from the ``nvidia-nccl-cu13`` package or ``$NCCL_HOME``."""
    roots = []
    given = os.environ.get("NCCL_HOME")
    if given:
        root = Path(given)
        if not ((root / "include" / "nccl.h").is_file() and (root / "lib").is_dir()):
            # Set on purpose: the pip package's NCCL instead would be a different one unannounced.
            raise FfiBuildError(f"NCCL_HOME={given!r} has no include/nccl.h and lib/; allowed: an NCCL install "
                                "folder holding both, or NCCL_HOME unset (the nvidia-nccl-cu13 package)")
        roots.append(root)
    try:
        import nvidia.nccl

        roots.extend(Path(p) for p in nvidia.nccl.__path__)
    except ImportError:
        pass
    for root in roots:
        if (root / "include" / "nccl.h").is_file() and (root / "lib").is_dir():
            return root / "include", root / "lib"
    raise FfiBuildError(
        "NCCL headers not found (looked at $NCCL_HOME and the nvidia.nccl package); "
        "`pip install nvidia-nccl-cu13` (or `pip install wideep-jax[ffi]`), "
        "or choose alltoall_backend: xla (WIDEEP_ALLTOALL=xla)"
    )


def nccl_library_file() -> Path:
    """The NCCL shared library the FFI library links against."""
    _, lib_dir = nccl_paths()
    return lib_dir / _nccl_library(lib_dir)


def _nccl_library(lib_dir: Path) -> str:
    names = sorted(p.name for p in lib_dir.glob("libnccl.so*"))
    if not names:
        raise FfiBuildError(f"no libnccl.so* in {lib_dir}; reinstall nvidia-nccl-cu13")
    return "libnccl.so.2" if "libnccl.so.2" in names else names[0]


def _nccl_version(include: Path) -> str:
    text = (include / "nccl.h").read_text(errors="replace")
    parts = [re.search(rf"#define NCCL_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


def target_archs() -> tuple[str, ...]:
    """GPU architectures to compile for: ``$WIDEEP_CUDA_ARCHS`` (e.g. ``"90,100"``),
    else those of the visible GPUs, else ``DEFAULT_ARCHS``."""
    env = os.environ.get("WIDEEP_CUDA_ARCHS")
    if env:
        archs = tuple(a.strip().replace(".", "") for a in env.split(",") if a.strip())
        bad = [a for a in archs if not a.isdigit()]
        if bad or not archs:
            what = f"has {bad}" if bad else "names no arch"
            raise FfiBuildError(f"WIDEEP_CUDA_ARCHS={env!r} {what}; allowed: comma-separated like '80,90'")
        return archs
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    found = sorted({str(d.compute_capability).replace(".", "") for d in gpus
                    if getattr(d, "compute_capability", None)})
    return tuple(found) or DEFAULT_ARCHS


def _cache_root() -> Path:
    """``$WIDEEP_CACHE_DIR`` (``~`` expanded; unset or empty: ``~/.cache/wideep_jax``), made absolute."""
    raw = os.environ.get("WIDEEP_CACHE_DIR", "").strip()
    root = Path(raw).expanduser() if raw else Path.home() / ".cache" / "wideep_jax"
    return root.absolute()


def _build_key(nvcc: str, archs: tuple[str, ...], nccl_version: str, nccl_lib: Path) -> str:
    import jaxlib

    h = hashlib.sha256()
    for path in source_files():
        h.update(path.relative_to(SOURCE_DIR).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        raise FfiBuildError(f"`{nvcc} --version` did not answer in 60 s; check $NVCC / the CUDA install") from None
    # The NCCL lib dir is the library's rpath: a build from another venv would point at its NCCL.
    # The compiler flags count too (a changed flag rebuilds), not where the sources lie.
    flags = " ".join(nvcc_command(Path("out"), archs)).replace(str(SOURCE_DIR), "<src>")
    nvcc_env = ";".join(f"{k}={os.environ.get(k, '')}" for k in NVCC_ENV)
    for part in (jaxlib.__version__, nccl_version, str(nccl_lib), version, ",".join(archs), flags, nvcc_env):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def nvcc_command(out: Path, archs: tuple[str, ...]) -> list[str]:
    """The nvcc invocation that builds the library to ``out``."""
    import jax

    nvcc = find_nvcc()
    nccl_include, nccl_lib = nccl_paths()
    cmd = [
        nvcc, "-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC",
        # XLA's FFI headers trip these two harmless nvcc front-end warnings.
        "-diag-suppress=2473,940",
        "-I", jax.ffi.include_dir(), "-I", str(SOURCE_DIR), "-I", str(nccl_include),
        "--threads", "0",
    ]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = max(archs, key=int)  # PTX for newer GPUs than any listed
    cmd += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    cmd += [str(p) for p in source_files() if p.suffix in COMPILED_SUFFIXES]
    cmd += ["-o", str(out), "-L", str(nccl_lib), f"-l:{_nccl_library(nccl_lib)}",
            "-Xlinker", f"-rpath={nccl_lib}"]
    return cmd


def library_path(archs: tuple[str, ...] | None = None) -> Path:
    """Where the library for the current sources and toolchain lives (built or not)."""
    archs = archs or target_archs()
    nccl_include, nccl_lib = nccl_paths()
    key = _build_key(find_nvcc(), archs, _nccl_version(nccl_include), nccl_lib)
    return _cache_root() / "ffi" / key / LIBRARY_NAME


def seconds_from_env(name: str, default: float) -> float:
    """``$name`` as seconds in (0, a day], else ``default``; a ValueError names the value."""
    raw = os.environ.get(name, str(default))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise ValueError(f"{name}={raw!r}; allowed: a number of seconds in (0, {MAX_TIMEOUT_S}]")
    return seconds


def build_timeout_s() -> float:
    """Seconds one nvcc build, or the wait for another process's build, may take:
    ``$WIDEEP_FFI_BUILD_TIMEOUT_S``, default ``DEFAULT_BUILD_TIMEOUT_S``."""
    try:
        return seconds_from_env(BUILD_TIMEOUT_ENV, DEFAULT_BUILD_TIMEOUT_S)
    except ValueError as e:
        raise FfiBuildError(str(e)) from None


def _lock_within(lock, path: Path, timeout: float) -> None:
    """Takes the build lock, or fails naming the process that holds it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise FfiBuildError(
                    f"waited {timeout:g} s for {path}, held by process {holder} building the FFI library; "
                    f"end that process or raise {BUILD_TIMEOUT_ENV}"
                ) from None
            time.sleep(0.1)


def _run_nvcc(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """nvcc in its own process group, so a timeout also ends its cicc/ptxas children."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise FfiBuildError(
            f"building {LIBRARY_NAME} took over {timeout:g} s and was stopped; raise {BUILD_TIMEOUT_ENV} "
            f"or build fewer archs (WIDEEP_CUDA_ARCHS):\n{' '.join(cmd)}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _complete(path: Path) -> bool:
    """Whether ``path`` is a whole 64-bit ELF file: its section header table, which the
    linker writes last, lies within it. An empty or cut file (a crash before the data
    reached the disk, a copy that stopped) is not, and is built again."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(header) < 64 or header[:5] != b"\x7fELF\x02":
        return False
    order = "little" if header[5] == 1 else "big"
    shoff = int.from_bytes(header[0x28:0x30], order)
    shentsize = int.from_bytes(header[0x3A:0x3C], order)
    shnum = int.from_bytes(header[0x3C:0x3E], order)
    return 0 < shoff and shoff + shentsize * shnum <= size


def build_library(*, force: bool = False, archs: tuple[str, ...] | None = None, verbose: bool = False) -> Path:
    """Builds the library if the cache lacks it and returns its path.

    Concurrent builders (several processes) serialize on a lock file; the
    result is moved into place atomically. A cached file that is not a whole
    ELF library (empty or cut) is built again. The build and the wait for
    another process's build are each bounded by ``build_timeout_s()``.
    """
    archs = archs or target_archs()
    out = library_path(archs)
    if not force and _complete(out):
        return out
    timeout = build_timeout_s()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / ".lock"
    with open(lock_path, "a+") as lock:  # "a+": a waiter must not wipe the holder's pid
        # The holder's nvcc may run for the whole timeout, so a waiter gives it a little more.
        _lock_within(lock, lock_path, timeout + min(60.0, timeout))
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        if not force and _complete(out):
            return out
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / LIBRARY_NAME
            cmd = nvcc_command(tmp_out, archs)
            if verbose:
                print(" ".join(cmd), flush=True)
            proc = _run_nvcc(cmd, timeout)
            if proc.returncode != 0:
                raise FfiBuildError(
                    f"building {LIBRARY_NAME} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n"
                    f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
                )
            with open(tmp_out, "rb") as f:  # on disk before it is named: no empty file after a crash
                os.fsync(f.fileno())
            os.replace(tmp_out, out)
    return out
