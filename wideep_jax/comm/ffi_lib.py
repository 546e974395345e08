"""Loads the FFI library, registers its XLA targets, and sets up its state.

Set-up (communicators, peer-mapped workspaces) happens on the host while a
program is traced, through the library's small C API; the custom calls then
find that state by an integer id baked into the HLO. Ids are hashes of what
they describe, so the same program in a new process gets the same HLO (and
hits the persistent compilation cache).
"""
from __future__ import annotations

import ctypes
import hashlib
import threading

import jax
import numpy as np
from jax.sharding import Mesh

from wideep_jax.comm.ffi_build import FfiBuildError, build_library, nccl_library_file, seconds_from_env

TARGETS = {
    "wideep_nvlink_dispatch": "WideepNvlinkDispatch",
    "wideep_nvlink_combine": "WideepNvlinkCombine",
    "wideep_nccl_dispatch": "WideepNcclDispatch",
    "wideep_nccl_combine": "WideepNcclCombine",
}
DEFAULT_TIMEOUT_S = 30.0

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_nccl_sets: set[int] = set()
_workspaces: set[int] = set()


class FfiError(RuntimeError):
    """A call into the FFI library's C API failed."""


def library() -> ctypes.CDLL:
    """The FFI library (built on first use) with its XLA targets registered for CUDA."""
    global _lib
    with _lock:
        if _lib is None:
            path = build_library()
            # Load the NCCL it was linked against first, by path: the loader then resolves
            # libnccl.so.2 to it whatever the rpath or LD_LIBRARY_PATH say.
            ctypes.CDLL(str(nccl_library_file()), mode=ctypes.RTLD_GLOBAL)
            try:
                lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                missing = [s for s in (*TARGETS.values(), "wideep_last_error") if not hasattr(lib, s)]
            except OSError as e:
                raise FfiBuildError(f"loading the cached FFI library {path} failed: {e}; rebuild it with "
                                    "`wideep build-ffi --force` (or delete its directory)") from None
            if missing:
                raise FfiBuildError(f"the cached FFI library {path} lacks {missing}; rebuild it with "
                                    "`wideep build-ffi --force` (or delete its directory)")
            lib.wideep_last_error.restype = ctypes.c_char_p
            lib.wideep_nvlink_peer_access.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
            lib.wideep_nvlink_create.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                                 ctypes.POINTER(ctypes.c_int), ctypes.c_uint64]
            lib.wideep_nvlink_trace.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                                ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
            lib.wideep_nvlink_profile.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64),
                                                  ctypes.c_int]
            lib.wideep_nccl_unique_id.argtypes = [ctypes.c_char_p]
            lib.wideep_nccl_init.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                             ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_char_p,
                                             ctypes.c_int64]
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
            _lib = lib
        return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise FfiError(f"{what}: {library().wideep_last_error().decode(errors='replace')}")
    return rc


def _ints(values) -> ctypes.Array:
    values = [int(v) for v in values]
    return (ctypes.c_int * len(values))(*values)


def stable_id(*parts) -> int:
    """A positive int63 naming ``parts`` (the same in every process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def timeout_ms() -> int:
    """The all-to-all calls' wait limit for peers: ``$WIDEEP_COMM_TIMEOUT_S`` (default 30 s)."""
    return _whole_ms(seconds_from_env("WIDEEP_COMM_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def _whole_ms(seconds: float) -> int:
    """A wait limit for the C++ side: whole milliseconds, at least 1."""
    return max(1, int(seconds * 1000))


DEFAULT_INIT_TIMEOUT_S = 600.0  # processes reach their first MoE layer apart by their load times


def init_timeout_s() -> float:
    """How long setting up NCCL communicators waits for the group's other processes:
    ``$WIDEEP_NCCL_INIT_TIMEOUT_S`` (default 600 s)."""
    return seconds_from_env("WIDEEP_NCCL_INIT_TIMEOUT_S", DEFAULT_INIT_TIMEOUT_S)


def _bounded_call(fn, timeout_s: float, what: str):
    """``fn()``, a C call that may block on other processes, run in a daemon thread and
    waited for at most ``timeout_s``: an error instead of a hang. ``fn`` must read the
    library's (thread-local) last error itself, so it runs ``_check`` inside."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name=f"wideep {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise FfiError(f"{what}: no answer within {timeout_s:g} s (WIDEEP_NCCL_INIT_TIMEOUT_S); a process of "
                       "the EP group has not reached its first all-to-all (still loading, stopped, or crashed)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def ep_groups(mesh: Mesh, axis: str) -> list[list[jax.Device]]:
    """The mesh's EP groups: devices that share every other axis index, in ``axis`` order
    (position in a group = ``jax.lax.axis_index(axis)`` = rank)."""
    if axis not in mesh.axis_names:
        raise ValueError(f"ep_axis={axis!r} is not an axis of the mesh; allowed: {mesh.axis_names}")
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), -1)
    return [list(row) for row in devices.reshape(-1, devices.shape[-1])]


def peer_access(groups: list[list[jax.Device]]) -> bool:
    """True when every group is in this process and its GPUs can map each other's memory."""
    me = jax.process_index()
    for g in groups:
        if any(d.process_index != me or d.platform != "gpu" for d in g):
            return False
        ordinals = [d.local_hardware_id for d in g]
        if not _check(library().wideep_nvlink_peer_access(len(ordinals), _ints(ordinals)), "peer access"):
            return False
    return True


def nvlink_workspace(groups: list[list[jax.Device]], half_bytes: int) -> int:
    """Id of a peer-mapped workspace with ``half_bytes`` per half on every group member.

    Sizes are rounded up to a power of two (at least 1 MiB) so few distinct
    workspaces exist; they live as long as the process (compiled programs and
    captured CUDA graphs keep their addresses).
    """
    size = max(1 << 20, 1 << max(0, int(half_bytes) - 1).bit_length())
    ordinals = [[d.local_hardware_id for d in g] for g in groups]
    me = jax.process_index()
    if any(d.process_index != me for g in groups for d in g):
        raise ValueError("alltoall_backend='nvlink' needs every device of the mesh in this process; "
                         "allowed across processes: 'nccl' or 'xla'")
    wid = stable_id("nvlink", ordinals, size)
    with _lock:
        if wid in _workspaces:
            return wid
    flat = [o for g in ordinals for o in g]
    _check(library().wideep_nvlink_create(wid, len(ordinals), len(ordinals[0]), _ints(flat), size),
           "creating the nvlink workspace")
    with _lock:
        _workspaces.add(wid)
    return wid


def nvlink_profile(workspace: int, device: jax.Device, *, reset: bool = False) -> dict[str, float]:
    """Mean kernel time (µs, CTA 0's start to the last CTA's end) and call counts of
    the nvlink dispatch and combine on ``device`` since the last reset (synchronizes);
    ``dispatch_ready_us``: of dispatch's time, the mean wait until every peer had
    started the call (launch skew plus a round trip)."""
    out = (ctypes.c_uint64 * 5)()
    _check(library().wideep_nvlink_profile(workspace, device.local_hardware_id, out, int(reset)),
           "reading the nvlink profile")
    ns_d, calls_d, ns_c, calls_c, ready_d = (int(v) for v in out)
    return {"dispatch_us": ns_d / max(calls_d, 1) / 1e3, "dispatch_calls": calls_d,
            "combine_us": ns_c / max(calls_c, 1) / 1e3, "combine_calls": calls_c,
            "dispatch_ready_us": ready_d / max(calls_d, 1) / 1e3}


# The stamps of each traced nvlink call, in the library's order (globaltimer ns).
NVLINK_TRACE_STAMPS = ("start", "last_cta_start", "peers_seen", "senders_done", "end")


def nvlink_trace(workspace: int, device: jax.Device, op: str) -> np.ndarray:
    """[calls, len(NVLINK_TRACE_STAMPS)] globaltimer ns of ``op``'s ("dispatch" or
    "combine") last calls on ``device`` since the last profile reset, oldest first,
    at most `nvlink_trace_calls()` of them (synchronizes). Per call: CTA 0's start,
    the last CTA's start, when a receiver had seen every peer's call number, the
    last sender CTA's end (the start when nothing is sent) and the call's end. Gaps
    between one call's end and the next one's start are time the GPU spent outside
    the kernel."""
    if op not in ("dispatch", "combine"):
        raise ValueError(f"op={op!r}; allowed: 'dispatch', 'combine'")
    size, stamps = nvlink_trace_calls(), int(library().wideep_nvlink_trace_stamps())
    if stamps != len(NVLINK_TRACE_STAMPS):
        raise RuntimeError(f"the nvlink library keeps {stamps} trace stamps per call, this module names "
                           f"{len(NVLINK_TRACE_STAMPS)}: rebuild it (wideep build-ffi)")
    ring = (ctypes.c_uint64 * (stamps * size))()
    calls = ctypes.c_uint64()
    _check(library().wideep_nvlink_trace(workspace, device.local_hardware_id, ("dispatch", "combine").index(op),
                                         ring, ctypes.byref(calls)), "reading the nvlink trace")
    ring = np.asarray(ring, np.uint64).reshape(size, stamps)
    n = int(calls.value)
    if n <= size:
        return ring[:n].copy()
    return np.roll(ring, -(n % size), axis=0)


def nvlink_trace_calls() -> int:
    """How many of each op's last calls the nvlink kernels' trace ring keeps."""
    return int(library().wideep_nvlink_trace_calls())


def nccl_communicators(groups: list[list[jax.Device]]) -> int:
    """Id of NCCL communicators for this process's devices, one per device, rank =
    position in its group. Across processes the unique ids travel through
    ``jax.distributed``'s key-value store."""
    cid = stable_id("nccl", [[(d.process_index, d.id) for d in g] for g in groups])
    with _lock:
        if cid in _nccl_sets:
            return cid
    lib = library()
    uid_bytes = lib.wideep_nccl_unique_id_bytes()
    me = jax.process_index()
    ordinals, ranks, uids = [], [], b""
    for index, group in enumerate(groups):
        if all(d.process_index != me for d in group):
            continue
        uid = _group_unique_id(lib, cid, index, group, uid_bytes)
        for rank, d in enumerate(group):
            if d.process_index == me:
                ordinals.append(d.local_hardware_id)
                ranks.append(rank)
                uids += uid
    nranks = len(groups[0])
    init_s = init_timeout_s()
    # The first all-to-all waits for peers as long as this set-up may: processes reach their
    # first step apart by their compile and load times.
    first_call_ms = _whole_ms(init_s)
    _bounded_call(lambda: _check(lib.wideep_nccl_init(cid, len(ordinals), _ints(ordinals), _ints(ranks), nranks,
                                                      uids, first_call_ms), "creating NCCL communicators"),
                  init_s, f"creating NCCL communicators of {nranks} ranks")
    with _lock:
        _nccl_sets.add(cid)
    return cid


def _group_unique_id(lib, cid: int, index: int, group, uid_bytes: int) -> bytes:
    def fresh() -> bytes:
        buf = ctypes.create_string_buffer(uid_bytes)
        _check(lib.wideep_nccl_unique_id(buf), "ncclGetUniqueId")
        return buf.raw

    if all(d.process_index == jax.process_index() for d in group):
        return fresh()
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("a multi-process EP group needs jax.distributed.initialize() first")
    key = f"wideep_nccl/{cid}/{index}"
    if group[0].process_index == jax.process_index():
        uid = fresh()
        client.key_value_set_bytes(key, uid)
        return uid
    timeout = init_timeout_s()
    try:
        return client.blocking_key_value_get_bytes(key, int(timeout * 1000))
    except Exception as e:  # jax raises its own deadline error type
        raise FfiError(f"waiting {timeout:g} s (WIDEEP_NCCL_INIT_TIMEOUT_S) for process "
                       f"{group[0].process_index} to publish the NCCL unique id of EP group {index}: {e}") from None
