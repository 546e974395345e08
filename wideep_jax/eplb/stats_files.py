"""Expert-load statistics files in TensorRT-LLM's format (offline EPLB, step 1).

A statistics directory holds

- ``meta_info.json``: ``{"num_experts": E, "num_experts_per_token": K}``;
- ``rank{r}.safetensors`` for every EP rank ``r``: keys ``"{iteration}_{layer}"``
  (e.g. ``"105_3"``), values int32 ``[E]``, the routed (token, k) pairs per expert of
  the tokens that started on rank ``r`` in that iteration and layer, summed over the
  MoE calls of the iteration.

TensorRT-LLM and ``wideep run`` write these when ``EXPERT_STATISTIC_ITER_RANGE=A-B`` is set
(into ``EXPERT_STATISTIC_PATH``, default ``expert_statistic``), so files from either
tool load with :func:`load_stats` and its ``generate_eplb_config.py`` reads ours.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from wideep_jax._checks import is_int

__all__ = [
    "DEFAULT_STATS_PATH",
    "ENV_PATH",
    "ENV_RANGE",
    "LoadedStats",
    "StatsFileError",
    "StatsRecorder",
    "load_stats",
    "parse_iter_range",
]

ENV_RANGE = "EXPERT_STATISTIC_ITER_RANGE"
ENV_PATH = "EXPERT_STATISTIC_PATH"
DEFAULT_STATS_PATH = "expert_statistic"
META_FILE = "meta_info.json"
# Exactly "rank<r>.safetensors": TensorRT-LLM puts cooccurrence_rank*, token_selected_
# experts_rank* and rank*_raw files in the same directory, and those are not counts.
_RANK_FILE = re.compile(r"^rank(\d+)\.safetensors$")
_KEY = re.compile(r"^(\d+)_(\d+)$")
_INT64_MAX = int(np.iinfo(np.int64).max)
_INT32_MAX = int(np.iinfo(np.int32).max)


class StatsFileError(ValueError):
    """A statistics directory or file is missing or malformed; the message names it."""


def parse_iter_range(text: str, *, name: str = ENV_RANGE) -> tuple[int, int]:
    """``"A-B"`` -> ``(A, B)``: iterations ``A <= i < B`` (TensorRT-LLM's range format)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(text))
    if match is None:
        raise ValueError(f"{name}={text!r}: allowed: 'A-B' with integers 0 <= A < B "
                         "(iterations A..B-1 are recorded), e.g. '100-200'")
    start, stop = int(match.group(1)), int(match.group(2))
    if start >= stop:
        raise ValueError(f"{name}={text!r}: allowed: 'A-B' with A < B (got an empty range)")
    return start, stop


def _counts_of(stats_or_counts: Any):
    """The ``[R, E]`` counts of a MoEStats (``.rank_expert_counts``) or of an int array."""
    counts = getattr(stats_or_counts, "rank_expert_counts", stats_or_counts)
    if not hasattr(counts, "shape"):
        counts = np.asarray(counts)
    return counts


class StatsRecorder:
    """Collects per-rank expert counts of iterations ``[iter_start, iter_stop)``.

    ``record`` keeps the device arrays it is given (sums of repeated records are
    device adds), so recording adds no host sync; :meth:`save` converts them. The
    files are written once, by :meth:`save` or automatically when ``record`` or
    :meth:`step` first sees an iteration ``>= iter_stop`` (as TensorRT-LLM does).
    A ``path`` holding statistics of another shape (another ``meta_info.json``) is
    refused when the recorder is made, not overwritten (see :meth:`save`).
    """

    def __init__(self, path: str | os.PathLike, iter_start: int, iter_stop: int, *,
                 num_experts: int, top_k: int) -> None:
        for key, value in (("iter_start", iter_start), ("iter_stop", iter_stop),
                           ("num_experts", num_experts), ("top_k", top_k)):
            if not is_int(value) or value < 0:
                raise ValueError(f"{key}={value!r}: allowed: an int >= 0")
        if iter_start >= iter_stop:
            raise ValueError(f"iter_start={iter_start}, iter_stop={iter_stop}: allowed: iter_start < iter_stop")
        if num_experts < 1 or top_k < 1:
            raise ValueError(f"num_experts={num_experts}, top_k={top_k}: allowed: both >= 1")
        if top_k > num_experts:  # load_stats refuses such a meta_info.json
            raise ValueError(f"top_k={top_k}: allowed: an int in [1, num_experts = {num_experts}]")
        self.path = Path(path)
        self.iter_start, self.iter_stop = int(iter_start), int(iter_stop)
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self._records: dict[tuple[int, int], Any] = {}
        self._num_ranks: int | None = None
        self._done = False
        self._saved = False
        # Now, so a run that would end in a refused save fails before it starts.
        self._check_folder()

    @property
    def meta(self) -> dict:
        """The ``meta_info.json`` this recorder writes."""
        return {"num_experts": self.num_experts, "num_experts_per_token": self.top_k}

    def _check_folder(self) -> None:
        """Refuses a folder that holds statistics of another shape (see :meth:`save`)."""
        if not self.path.is_dir():
            return
        meta_path = self.path / META_FILE
        allowed = (f"allowed: a new or empty folder, or one holding statistics with this {META_FILE} "
                   f"{json.dumps(self.meta)} (they are overwritten); remove the old files or pick another path")
        if not meta_path.exists():
            ranks = [f.name for _, f in _rank_files(self.path)]
            if ranks:
                shown = ", ".join(ranks[:4]) + (" ..." if len(ranks) > 4 else "")
                raise StatsFileError(f"{str(self.path)!r} holds {shown} but no {META_FILE}: statistics of an "
                                     "unknown shape would be overwritten; " + allowed)
            return
        try:
            theirs = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StatsFileError(f"{str(meta_path)!r} exists but is not readable JSON ({e}); " + allowed) from None
        if not isinstance(theirs, dict) or {k: theirs.get(k) for k in self.meta} != self.meta:
            raise StatsFileError(f"{str(meta_path)!r} holds {json.dumps(theirs)}, statistics of another shape than "
                                 f"this recorder's {json.dumps(self.meta)}; " + allowed)

    @classmethod
    def from_env(cls, num_experts: int, top_k: int) -> StatsRecorder | None:
        """A recorder from ``EXPERT_STATISTIC_ITER_RANGE`` / ``EXPERT_STATISTIC_PATH``; None if the range is unset."""
        span = os.environ.get(ENV_RANGE)
        if span is None or not span.strip():
            return None
        start, stop = parse_iter_range(span)
        return cls(os.environ.get(ENV_PATH) or DEFAULT_STATS_PATH, start, stop,
                   num_experts=num_experts, top_k=top_k)

    @property
    def done(self) -> bool:
        """True once an iteration ``>= iter_stop`` has been seen (nothing more is recorded)."""
        return self._done

    @property
    def saved(self) -> bool:
        """True once the files have been written."""
        return self._saved

    @property
    def iterations(self) -> list[int]:
        """The iterations recorded so far, ascending."""
        return sorted({i for i, _ in self._records})

    @property
    def num_ranks(self) -> int | None:
        """Ranks of the recorded counts (one file each), or None before the first record."""
        return self._num_ranks

    def should_record(self, iteration: int) -> bool:
        """Whether ``iteration`` is in ``[iter_start, iter_stop)``."""
        return self.iter_start <= iteration < self.iter_stop

    def step(self, iteration: int) -> None:
        """Marks the start of ``iteration``; saves the files at the first iteration ``>= iter_stop``."""
        if iteration >= self.iter_stop and not self._done:
            self._done = True
            if not self._saved:
                self.save()

    def record(self, iteration: int, layer_idx: int, stats_or_counts: Any) -> None:
        """Adds one MoE call's counts: a ``MoEStats`` or an int array ``[R, E]`` (``[E]`` = one rank)."""
        self.step(iteration)
        if not self.should_record(iteration):
            return
        counts = _counts_of(stats_or_counts)
        if _is_tracer(counts):
            raise ValueError("StatsRecorder.record got a traced array: call it outside jit, "
                             "on the MoEStats the jitted forward returns")
        if len(counts.shape) == 1:
            counts = counts[None]
        if len(counts.shape) != 2 or counts.shape[1] != self.num_experts:
            raise ValueError(f"counts of iteration {iteration}, layer {layer_idx} have shape "
                             f"{tuple(counts.shape)}; allowed: [ranks, num_experts={self.num_experts}]")
        if not np.issubdtype(np.dtype(counts.dtype), np.integer):
            raise ValueError(f"counts of iteration {iteration}, layer {layer_idx} have dtype "
                             f"{counts.dtype}; allowed: an integer dtype")
        if self._num_ranks is None:
            self._num_ranks = int(counts.shape[0])
        elif counts.shape[0] != self._num_ranks:
            raise ValueError(f"counts of iteration {iteration}, layer {layer_idx} have "
                             f"{counts.shape[0]} ranks; allowed: {self._num_ranks} (as recorded before)")
        key = (int(iteration), int(layer_idx))
        previous = self._records.get(key)
        # Repeated calls in one iteration (chunks, micro-batches) add up, as in TensorRT-LLM.
        # A copy: a caller reusing its buffer must not rewrite the iterations recorded before.
        if previous is None:
            self._records[key] = np.array(counts) if isinstance(counts, np.ndarray) else counts
        else:
            self._records[key] = previous + counts

    def save(self) -> Path:
        """Writes ``meta_info.json`` and ``rank{r}.safetensors`` for every rank; returns the directory.

        A folder that already holds statistics is overwritten only if its ``meta_info.json``
        is this recorder's (same ``num_experts`` and ``num_experts_per_token``): every rank
        file is then rewritten and the rank files past this run's ranks are removed, so no
        old counts remain. A differing or unreadable ``meta_info.json``, or rank files
        without one, raise :class:`StatsFileError` naming both (checked when the recorder is
        made, and again here); nothing is written then.
        """
        from safetensors.numpy import save_file

        if not self._records:
            raise ValueError(f"StatsRecorder({str(self.path)!r}): nothing was recorded in iterations "
                             f"[{self.iter_start}, {self.iter_stop})")
        import jax

        # Counts are replicated on every device, so in a multi-process run one writer suffices.
        if jax.process_index() == 0:
            self._check_folder()  # again: the folder may have been written since the recorder was made
            host = {f"{i}_{l}": np.asarray(c) for (i, l), c in sorted(self._records.items())}
            for key, value in host.items():
                # load_stats refuses negative counts, and the files hold int32 (a larger count
                # would wrap): write neither.
                negative = value.min() < 0
                bad = value < 0 if negative else value > _INT32_MAX
                if bad.any():
                    r, e = (int(v) for v in np.argwhere(bad)[0])
                    i, l = key.split("_")
                    raise ValueError(f"StatsRecorder({str(self.path)!r}): counts of iteration {i}, layer {l}, rank "
                                     f"{r} have {int(value[r, e])} for expert {e}; allowed: counts "
                                     + (">= 0" if negative else "< 2**31 (the files hold int32)"))
            host = {key: value.astype(np.int32) for key, value in host.items()}
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / META_FILE).write_text(json.dumps(self.meta))
            mode = (self.path / META_FILE).stat().st_mode & 0o777  # as the umask gives a new file
            for r in range(self._num_ranks):
                rank_file = self.path / f"rank{r}.safetensors"
                save_file({k: np.ascontiguousarray(v[r]) for k, v in host.items()}, str(rank_file))
                # safetensors creates its files 0600: readable to others as the meta file is.
                rank_file.chmod(mode)
            # A stale rank file of an earlier, wider run would be summed into these counts; a
            # second file of a rank (rank01 beside rank1) would make load_stats refuse the folder.
            for rank, stale in _rank_files(self.path):
                if rank >= self._num_ranks or stale.name != f"rank{rank}.safetensors":
                    stale.unlink()
        self._saved = True
        return self.path


def _is_tracer(a: Any) -> bool:
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dependency
        return False
    return isinstance(a, jax.core.Tracer)


def _rank_files(path: Path) -> list[tuple[int, Path]]:
    """``(rank, file)`` of the ``rank{r}.safetensors`` files in ``path``, by rank."""
    found = []
    for f in path.iterdir():
        m = _RANK_FILE.match(f.name)
        if m and not f.is_file():  # skipped, its rank's counts would be missing silently
            raise StatsFileError(f"{str(f)!r} is not a file (a directory or broken link); allowed: "
                                 "rank<r>.safetensors names only files of counts, one per EP rank")
        if m:
            found.append((int(m.group(1)), f))
    return sorted(found)


@dataclasses.dataclass
class LoadedStats:
    """Statistics of iterations ``iters`` and MoE layers ``layers``, summed over ranks."""

    path: Path
    meta: dict
    """meta_info.json (``num_experts``, ``num_experts_per_token``)."""
    ep_size: int
    """Number of rank files."""
    iters: list[int]
    layers: list[int]
    counts: np.ndarray
    """int64 [num_iters, num_layers, E], summed over ranks."""
    per_rank: np.ndarray
    """int64 [ep_size, num_iters, num_layers, E]."""

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["num_experts_per_token"])

    @property
    def iter_start(self) -> int:
        return self.iters[0]

    @property
    def iter_stop(self) -> int:
        return self.iters[-1] + 1

    def load(self) -> np.ndarray:
        """float64 [num_layers, E]: counts summed over the iterations."""
        return self.counts.sum(axis=0).astype(np.float64)


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise StatsFileError(f"{str(meta_path)!r} not found: allowed: a statistics directory with "
                             f"{META_FILE} and rank<r>.safetensors files")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # JSON is UTF-8 text
        raise StatsFileError(f"{str(meta_path)!r}: invalid JSON ({e}); allowed: "
                             '{"num_experts": E, "num_experts_per_token": K}') from None
    for key in ("num_experts", "num_experts_per_token"):
        value = meta.get(key) if isinstance(meta, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StatsFileError(f"{str(meta_path)!r}: {key}={value!r}; allowed: an int >= 1")
    if meta["num_experts_per_token"] > meta["num_experts"]:
        raise StatsFileError(f"{str(meta_path)!r}: num_experts_per_token={meta['num_experts_per_token']!r}; "
                             f"allowed: an int in [1, num_experts = {meta['num_experts']}] (each token picks "
                             "top-k distinct experts)")
    return meta


def _read_rank(file: Path, num_experts: int) -> dict[tuple[int, int], np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise StatsFileError(f"{str(file)!r}: not a readable safetensors file ({e})") from None
    out, key_of = {}, {}
    for key, value in raw.items():
        m = _KEY.match(key)
        if m is None:
            raise StatsFileError(f"{str(file)!r}: key {key!r}; allowed: '<iteration>_<layer>', e.g. '105_3'")
        if value.shape != (num_experts,):
            raise StatsFileError(f"{str(file)!r}: key {key!r} has shape {list(value.shape)}; "
                                 f"allowed: [num_experts={num_experts}] (meta_info.json)")
        if not np.issubdtype(value.dtype, np.integer):
            raise StatsFileError(f"{str(file)!r}: key {key!r} has dtype {value.dtype}; allowed: integer counts")
        if value.size and value.dtype.kind == "u" and value.max() > _INT64_MAX:  # would wrap in int64
            expert = int(np.argmax(value))
            raise StatsFileError(f"{str(file)!r}: key {key!r} (iteration {m.group(1)}, layer {m.group(2)}) has "
                                 f"count {int(value[expert])} for expert {expert}; allowed: counts < 2**63 "
                                 "(they are summed as int64)")
        if value.size and value.min() < 0:
            expert = int(np.argmin(value))
            raise StatsFileError(f"{str(file)!r}: key {key!r} (iteration {m.group(1)}, layer {m.group(2)}) has "
                                 f"count {int(value[expert])} for expert {expert}; allowed: counts >= 0 "
                                 "(routed (token, k) pairs per expert)")
        pair = (int(m.group(1)), int(m.group(2)))
        if pair in key_of:  # e.g. '5_3' and '05_3': one would silently replace the other
            raise StatsFileError(f"{str(file)!r}: keys {key_of[pair]!r} and {key!r} both name iteration "
                                 f"{pair[0]}, layer {pair[1]}; allowed: one key per (iteration, layer), "
                                 f"'{pair[0]}_{pair[1]}'")
        key_of[pair] = key
        out[pair] = value.astype(np.int64)
    return out


def load_stats(path: str | os.PathLike, *, iter_start: int | None = None,
               iter_stop: int | None = None) -> LoadedStats:
    """Reads a statistics directory (ours or TensorRT-LLM's), keeping iterations ``[iter_start, iter_stop)``.

    As TensorRT-LLM's reader: the rank files are summed, their iterations must be
    contiguous, every (iteration, layer) pair must be present, and ``ep_size`` is the
    number of rank files. A key missing from one rank file counts as zeros there.
    """
    for key, value in (("iter_start", iter_start), ("iter_stop", iter_stop)):
        # int() would silently truncate 10.9 to 10 (and name no argument for "x")
        if value is not None and (not is_int(value) or value < 0):
            raise ValueError(f"{key}={value!r}: allowed: an int >= 0, or None (the recorded range's own bound)")
    path = Path(path)
    if not path.is_dir():
        raise StatsFileError(f"statistics directory {str(path)!r} not found")
    meta = _read_meta(path)
    num_experts = meta["num_experts"]
    files = _rank_files(path)
    if not files:
        raise StatsFileError(f"{str(path)!r} has no rank<r>.safetensors files")
    ranks = [r for r, _ in files]
    twice = sorted({r for r in ranks if ranks.count(r) > 1})
    if twice:  # e.g. rank1 and rank01: both would be summed as one rank
        names = [f.name for r, f in files if r == twice[0]]
        raise StatsFileError(f"{str(path)!r}: {' and '.join(names)} are both rank {twice[0]}; allowed: one "
                             f"file per EP rank, rank{twice[0]}.safetensors")
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise StatsFileError(f"{str(path)!r}: rank files {ranks}; missing rank{missing[0]}.safetensors "
                             "(allowed: rank0 .. rank<R-1>, one per EP rank)")
    records = [_read_rank(f, num_experts) for _, f in files]
    keys = set().union(*records)
    if not keys:
        raise StatsFileError(f"{str(path)!r}: the rank files hold no counts")
    all_iters = sorted({i for i, _ in keys})
    layers = sorted({l for _, l in keys})
    gaps = sorted(set(range(all_iters[0], all_iters[-1] + 1)) - set(all_iters))
    if gaps:
        raise StatsFileError(f"{str(path)!r}: iterations {all_iters[0]}..{all_iters[-1]} are not contiguous "
                             f"(iteration {gaps[0]} missing); allowed: one key per iteration of a range")
    start = all_iters[0] if iter_start is None else int(iter_start)
    stop = all_iters[-1] + 1 if iter_stop is None else int(iter_stop)
    if start >= stop:
        raise StatsFileError(f"iter_start={start}, iter_stop={stop}: empty range; allowed: iter_start < iter_stop")
    if start < all_iters[0] or stop > all_iters[-1] + 1:
        raise StatsFileError(f"iterations [{start}, {stop}): allowed: within the recorded "
                             f"[{all_iters[0]}, {all_iters[-1] + 1}) of {str(path)!r}")
    iters = list(range(start, stop))
    missing = [(i, l) for i in iters for l in layers if (i, l) not in keys]
    if missing:
        i, l = missing[0]
        raise StatsFileError(f"{str(path)!r}: key '{i}_{l}' (iteration {i}, layer {l}) is in no rank file; "
                             f"allowed: every layer {layers} recorded in every iteration")
    per_rank = np.zeros((len(files), len(iters), len(layers), num_experts), np.int64)
    for r, rec in enumerate(records):
        for a, i in enumerate(iters):
            for b, l in enumerate(layers):
                if (i, l) in rec:
                    per_rank[r, a, b] = rec[(i, l)]
    # Counts add up over ranks and iterations as int64: a total >= 2**63 would wrap to
    # negative. The float64 sum is within a relative 1e-6 of exact: only near 2**63 is it redone exactly.
    if per_rank.size and per_rank.sum(axis=(0, 1), dtype=np.float64).max() >= 2.0 ** 62:
        total = per_rank.astype(object).sum(axis=(0, 1))
        b, e = np.unravel_index(np.argmax(total), total.shape)
        if total[b, e] > _INT64_MAX:
            raise StatsFileError(f"{str(path)!r}: layer {layers[b]}, expert {e}: the counts of iterations "
                                 f"[{start}, {stop}) over all rank files sum to {total[b, e]}; allowed: a sum "
                                 "< 2**63 (counts are summed as int64)")
    return LoadedStats(path=path, meta=dict(meta), ep_size=len(files), iters=iters, layers=layers,
                       counts=per_rank.sum(axis=0), per_rank=per_rank)
