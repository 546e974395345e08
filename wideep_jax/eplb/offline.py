"""Offline EPLB (TensorRT-LLM's workflow): statistics -> placement file -> report.

1. Collect: ``wideep run`` (or TensorRT-LLM) with ``EXPERT_STATISTIC_ITER_RANGE`` set
   records per-rank expert counts with
   :class:`~wideep_jax.eplb.stats_files.StatsRecorder`.
2. Generate: :func:`generate_placement` balances the load summed over the iterations
   (:func:`~wideep_jax.eplb.algorithm.compute_placement`, all layers in one call) and
   :func:`write_placement_file` writes TensorRT-LLM's ``moe_load_balancer.yaml``.
3. Report: :func:`report` gives per-layer load statistics under the default
   placement and, projected, under a placement file (as TensorRT-LLM's
   ``report_load_statistics.py``); :func:`save_heatmap` draws per-rank loads.
"""
from __future__ import annotations

import dataclasses
import heapq
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from wideep_jax.config import _layer_list, default_placement
from wideep_jax.eplb.stats_files import LoadedStats

__all__ = [
    "LayerLoad",
    "LoadReport",
    "Placements",
    "format_report",
    "generate_placement",
    "normalised",
    "report",
    "save_heatmap",
    "shared_rank_greedy",
    "write_placement_file",
]

Placement = Mapping[int, "np.ndarray | list[int]"]


def _int_at_least(name: str, value, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: allowed: an int >= {minimum}")
    return int(value)


def _positive_int(name: str, value) -> int:
    return _int_at_least(name, value, 1)


class Placements(dict):
    """``{layer: int32 [num_slots] slot_to_expert}`` from :func:`generate_placement`, with the
    ``num_nodes`` it was balanced for: :func:`write_placement_file` writes that into the
    file (for online EPLB), so re-placement keeps the node groups of the initial placement."""

    def __init__(self, rows=(), *, num_nodes: int = 1) -> None:
        super().__init__(rows)
        self.num_nodes = _positive_int("num_nodes", num_nodes)


def generate_placement(stats: LoadedStats, *, ep_size: int, num_slots: int,
                       num_nodes: int = 1) -> Placements:
    """``{layer: int32 [num_slots] slot_to_expert}`` balancing the load summed over ``stats.iters``
    (a :class:`Placements`, which also keeps ``num_nodes``).

    Per layer, :func:`~wideep_jax.eplb.algorithm.compute_placement` (at most one replica of
    an expert per rank), or with one node group :func:`shared_rank_greedy` (TensorRT-LLM's
    kind of greedy, which may put two replicas of an expert on one rank) where that gives
    the busiest rank strictly less load: neither is better on every layer."""
    from wideep_jax.eplb.algorithm import compute_placement

    ep_size = _positive_int("ep_size", ep_size)
    num_slots = _positive_int("num_slots", num_slots)
    num_nodes = _positive_int("num_nodes", num_nodes)
    # Checked here too so the CLI names its own flags' values before any jax work.
    if num_slots < stats.num_experts:
        raise ValueError(f"num_slots={num_slots}: allowed: >= num_experts = {stats.num_experts}")
    if num_slots % ep_size:
        raise ValueError(f"num_slots={num_slots}: allowed: a multiple of ep_size = {ep_size}")
    load = stats.load().astype(np.float32)  # [L, E]
    slots = np.array(compute_placement(load, num_slots, ep_size, num_nodes=num_nodes), np.int32)  # a copy
    if num_nodes == 1:  # the greedy knows no node groups
        for i, layer_load in enumerate(load.astype(np.float64)):
            greedy = shared_rank_greedy(layer_load, num_slots, ep_size)
            if _busiest(layer_load, greedy, ep_size) < _busiest(layer_load, slots[i], ep_size) * (1 - 1e-9):
                slots[i] = greedy
    return Placements({layer: slots[i] for i, layer in enumerate(stats.layers)}, num_nodes=num_nodes)


def shared_rank_greedy(load: np.ndarray, num_slots: int, ep_size: int) -> np.ndarray:
    """int32 [num_slots]: each extra slot replicates the expert with the largest load per
    replica (ties: lower id; no load at all: spread evenly), then replicas, heaviest first
    (ties: lower id), go to the least-loaded rank with a free slot (ties: lower rank), even
    one that holds that expert already (TensorRT-LLM's placement greedy)."""
    load = np.asarray(load, np.float64)
    num_experts, per_rank = len(load), num_slots // ep_size
    if load.sum() > 0:
        count = np.ones(num_experts, np.int64)
        heap = [(-float(v), e) for e, v in enumerate(load)]
        heapq.heapify(heap)
        for _ in range(num_slots - num_experts):
            _, e = heapq.heappop(heap)
            count[e] += 1
            heapq.heappush(heap, (-float(load[e]) / count[e], e))
    else:
        count = np.full(num_experts, num_slots // num_experts) + (np.arange(num_experts) < num_slots % num_experts)
    replicas = sorted(((-load[e] / count[e], e) for e in range(num_experts) for _ in range(count[e])))
    out = np.empty((ep_size, per_rank), np.int32)
    filled = np.zeros(ep_size, np.int64)
    ranks = [(0.0, r) for r in range(ep_size)]  # (load, rank): a min-heap of the ranks with room
    for neg_share, e in replicas:
        rank_load, r = heapq.heappop(ranks)
        out[r, filled[r]] = e
        filled[r] += 1
        if filled[r] < per_rank:
            heapq.heappush(ranks, (rank_load - neg_share, r))
    return out.reshape(-1)


def _busiest(load: np.ndarray, slot_to_expert: np.ndarray, ep_size: int) -> float:
    """The largest rank load of one layer's placement (float64)."""
    return float(_slot_loads(load[None, None], slot_to_expert[None])[0, 0].reshape(ep_size, -1).sum(1).max())


def write_placement_file(path: str | os.PathLike, placements: Placement, num_slots: int, *,
                         comment: str | None = None, layer_updates_per_iter: int = 0,
                         num_nodes: int | None = None) -> Path:
    """Writes TensorRT-LLM's placement YAML (``num_slots``, ``layer_updates_per_iter``,
    ``initial_global_assignments`` with one inline list per layer); returns the path.

    ``layer_updates_per_iter`` 0 is a static placement; N > 0 starts online EPLB
    (N layers re-placed per iteration) from this placement, as TensorRT-LLM's option.
    ``num_nodes`` (None: ``placements.num_nodes`` of a :func:`generate_placement` result,
    else 1) other than 1 is written as our ``num_nodes`` key when N > 0, so online
    re-placement keeps the node groups; a static placement is used as written (the
    loader warns that ``num_nodes`` does nothing there), so it is not written then.
    """
    num_slots = _positive_int("num_slots", num_slots)
    layer_updates_per_iter = _int_at_least("layer_updates_per_iter", layer_updates_per_iter, 0)
    num_nodes = _positive_int("num_nodes", getattr(placements, "num_nodes", 1) if num_nodes is None else num_nodes)
    online_nodes = num_nodes if layer_updates_per_iter > 0 and num_nodes != 1 else None
    rows = {}
    for layer, ids in sorted(placements.items()):
        ids = np.asarray(ids)
        if ids.shape != (num_slots,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"placement of layer {layer}: shape {list(ids.shape)}, dtype {ids.dtype}; "
                             f"allowed: {num_slots} (num_slots) integer expert ids")
        rows[int(layer)] = [int(e) for e in ids]
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    lines += [f"num_slots: {num_slots}", f"layer_updates_per_iter: {layer_updates_per_iter}"]
    if online_nodes is not None:
        lines += [f"num_nodes: {online_nodes}"]
    lines += ["initial_global_assignments:"]
    # Inline (flow-style) lists, one line per layer, as TensorRT-LLM's generate_eplb_config.py.
    lines += [f"  {layer}: [{', '.join(map(str, ids))}]" for layer, ids in rows.items()]
    text = "\n".join(lines) + "\n"
    parsed = yaml.safe_load(text)
    assert parsed["initial_global_assignments"] == (rows or None) and parsed["num_slots"] == num_slots
    assert parsed["layer_updates_per_iter"] == layer_updates_per_iter
    assert parsed.get("num_nodes") == online_nodes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclasses.dataclass
class LayerLoad:
    """Load statistics of one MoE layer; each value is computed per iteration, then averaged
    over the iterations (TensorRT-LLM's convention; the imbalances over the iterations that
    had load). ``mean`` and ``std`` are over the EP ranks, as ``report_load_statistics.py``
    gives them, or over the slots with ``per_expert`` (its ``--per_expert``)."""

    layer: int
    mean: float
    """Mean load (routed pairs) of a rank (of a slot with ``per_expert``)."""
    std: float
    """Its standard deviation over the ranks (slots) under the default placement (ddof=1, as torch.std)."""
    rank_imbalance: float
    """(max - mean) / mean of the per-rank load under the default placement."""
    slot_imbalance: float
    """(max - mean) / mean of the per-slot load under the default placement."""
    placed_rank_imbalance: float | None = None
    """Projected (max - mean) / mean of the per-rank load under the given placement."""
    placed_slot_imbalance: float | None = None
    """Projected (max - mean) / mean of the per-slot load under the given placement."""
    placed_std: float | None = None
    """``std`` under the given placement."""


@dataclasses.dataclass
class LoadReport:
    """Per-layer load statistics and per-rank loads (for :func:`save_heatmap`)."""

    layers: list[LayerLoad]
    ep_size: int
    num_slots: int
    """Slots of the default placement (``config.default_placement``)."""
    rank_load: np.ndarray
    """float64 [num_layers, ep_size], default placement, summed over the iterations."""
    placed_rank_load: np.ndarray | None = None
    """float64 [num_layers, ep_size] under the given placement, or None."""
    placement_num_slots: int | None = None
    ep_size_from_stats: bool = False
    """True when ``ep_size`` is the statistics' number of rank files, for want of another."""

    def summed_rank_imbalance(self) -> tuple[float, float | None]:
        """(max - mean) / mean of the per-rank load summed over the iterations (what
        :func:`generate_placement` balances), mean over layers: ``(default, placed or None)``."""
        def imb(load):
            return None if load is None else float(np.mean(_imbalance(load[None])))
        return imb(self.rank_load), imb(self.placed_rank_load)

    def average(self) -> LayerLoad:
        """Mean of every column over the layers (``layer = -1``)."""
        def avg(name):
            values = [getattr(row, name) for row in self.layers]
            return None if values[0] is None else float(np.mean(values))
        return LayerLoad(-1, *(avg(f.name) for f in dataclasses.fields(LayerLoad)[1:]))


def _slot_loads(counts: np.ndarray, slot_to_expert: np.ndarray) -> np.ndarray:
    """[I, L, S]: each slot carries ``counts[e] / replicas[e]`` of its expert."""
    num_experts = counts.shape[-1]
    replicas = np.stack([np.bincount(row, minlength=num_experts) for row in slot_to_expert])
    per_replica = counts / np.maximum(replicas, 1)[None]
    index = np.broadcast_to(slot_to_expert, counts.shape[:2] + slot_to_expert.shape[-1:])
    return np.take_along_axis(per_replica, index, -1)


def _imbalance(loads: np.ndarray) -> np.ndarray:
    """(max - mean) / mean over the last axis, averaged over iterations (axis 0) that had load."""
    mean = loads.mean(-1)
    ratio = np.where(mean > 0, (loads.max(-1) - mean) / np.where(mean > 0, mean, 1), np.nan)
    has_load = ~np.isnan(ratio)
    return np.where(has_load.any(0), np.nansum(ratio, 0) / np.maximum(has_load.sum(0), 1), 0.0)


def _ep_of_stats(stats: LoadedStats) -> str:
    """Where a defaulted ``ep_size`` came from, and how to give one: statistics files hold none."""
    return (f"; ep_size {stats.ep_size} is the number of rank files in {str(stats.path)!r}, used as no ep_size "
            "was given (the statistics hold none): pass ep_size (`wideep eplb report --ep-size N`), or a "
            "placement file with an ep_size key")


def _resolve_placement(placement, stats: LoadedStats,
                       ep_size: int | None) -> tuple[int, dict[int, np.ndarray], int, bool]:
    """``(num_slots, {layer: slot_to_expert}, ep_size, ep_size is the statistics' rank count by
    default)`` from a placement file or mapping,
    validated by the config loader (coverage, lengths, num_slots a multiple of ep_size).

    ``ep_size`` None: the file's ``ep_size`` key if it has one, else the statistics' ranks.
    TensorRT-LLM's newer generators write ``ep_size`` into the file and its
    ``report_load_statistics.py`` projects with it; the runtime's ``load_balancer`` refuses
    that key (as TensorRT-LLM's does), so it is read and removed here."""
    from wideep_jax.config import ConfigError, _read_yaml, load_moe_config

    name = "placement"
    file_ep = None
    where = None
    unreadable = False
    if isinstance(placement, (str, os.PathLike)):
        path = Path(placement).expanduser().resolve()
        source = str(path)
        name = f"placement {str(placement)!r}"
        try:
            raw = _read_yaml(name, path)
        except ConfigError:
            raw = None  # the loader below names the problem, as for the runtime
            unreadable = True
        if isinstance(raw, Mapping) and "ep_size" in raw:
            file_ep = raw["ep_size"]
            if not isinstance(file_ep, int) or isinstance(file_ep, bool) or file_ep < 1:
                raise ValueError(f"{name}: ep_size={file_ep!r}; allowed: an int >= 1 (the EP size the "
                                 "placement was generated for)")
            if ep_size is not None and ep_size != file_ep:
                raise ValueError(f"ep_size={ep_size}: {name} was generated for ep_size {file_ep} (its ep_size "
                                 f"key); allowed: {file_ep}, or no ep_size to use the file's")
            source = {k: v for k, v in raw.items() if k != "ep_size"}
            where = (f" (in the placement file {str(path)!r}, for num_experts={stats.num_experts}, "
                     f"ep_size={file_ep} from its ep_size key)")
    elif isinstance(placement, Mapping):
        rows = {int(k): np.asarray(v).tolist() for k, v in placement.items()}
        lengths = {len(v) for v in rows.values()}
        if len(lengths) != 1:
            raise ValueError(f"placement: layers have {sorted(lengths)} slots; allowed: one slot count")
        source = {"num_slots": lengths.pop(), "initial_global_assignments": rows}
    else:
        raise ValueError(f"placement={placement!r}: allowed: a placement file path or {{layer: slot_to_expert}}")
    # WIDEEP: a placement spreads slots over EP ranks, and the default backend (CUTLASS)
    # would refuse a file with layer_updates_per_iter > 0 (online EPLB needs WIDEEP).
    from_stats = file_ep is None and ep_size is None
    if file_ep is not None:
        ep_size = file_ep
    elif ep_size is None:
        ep_size = stats.ep_size
        where = _ep_of_stats(stats)
    try:
        lb = load_moe_config({"backend": "WIDEEP", "load_balancer": source}, num_experts=stats.num_experts,
                             ep_size=ep_size).load_balancer
    except ConfigError as err:
        # Where the sizes came from, for the placement's checks (not for a missing or unreadable
        # file, or a key the file should not have).
        if where is None or unreadable or ": unknown key " in str(err):
            raise
        raise ConfigError(f"{err}{where}") from None
    num_slots = lb.num_slots or stats.num_experts
    default = default_placement(num_slots, stats.num_experts, ep_size)
    given = lb.initial_global_assignments or {}
    if given and not set(given) & set(stats.layers):
        # Most likely numbered differently (e.g. from 0 where the statistics count MoE layers
        # by model layer): projecting the default placement instead would be silently wrong.
        raise ValueError(f"{name}: layers {_layer_list(given)} hold none of the statistics' layers "
                         f"{_layer_list(stats.layers)}; allowed: placements keyed by the statistics' layer ids")
    missing = [l for l in stats.layers if l not in given]
    stray = sorted(set(given) - set(stats.layers))
    if given and (missing or stray):
        # The runtime refuses such a placement (so does TensorRT-LLM): a projection with the
        # default placement on missing layers would report a run that cannot happen, and a
        # layer the statistics lack is no MoE layer of the model the statistics came from.
        problems = ([f"the statistics' layers {_layer_list(missing)} have no placement"] if missing else []) + (
            [f"layers {_layer_list(stray)} are not in the statistics"] if stray else [])
        raise ValueError(f"{name}: {' and '.join(problems)} (it has layers {_layer_list(given)}, the statistics "
                         f"have layers {_layer_list(stats.layers)}); allowed: a placement for every layer of the "
                         "statistics and no other layer (every MoE layer of the model)")
    return (num_slots, {l: np.asarray(given.get(l, default), np.int64) for l in stats.layers}, ep_size,
            from_stats)


def report(stats: LoadedStats, *, ep_size: int | None = None, placement=None,
           per_expert: bool = False) -> LoadReport:
    """Per-layer load statistics under the default placement and, if ``placement`` (a
    placement file or ``{layer: slot_to_expert}``) is given, projected under it.

    ``ep_size`` None: the ``ep_size`` key of a placement file that has one (TensorRT-LLM's
    newer generators write it), else the statistics' number of rank files. ``mean`` and
    ``std`` are over the ranks, or over the slots with ``per_expert``."""
    ep_size = None if ep_size is None else _positive_int("ep_size", ep_size)
    num_experts = stats.num_experts
    placed = None
    num_slots = num_experts
    where = ""  # where a defaulted ep_size came from
    from_stats = ep_size is None
    if placement is not None:
        num_slots, placed, ep_size, from_stats = _resolve_placement(placement, stats, ep_size)
    elif ep_size is None:
        ep_size, where = stats.ep_size, _ep_of_stats(stats)
    if num_slots % ep_size:
        raise ValueError(f"ep_size={ep_size}: allowed: a divisor of num_slots = {num_slots} "
                         f"(the default placement has one slot per expert){where}")
    counts = stats.counts.astype(np.float64)  # [I, L, E]
    num_layers = len(stats.layers)

    def loads(s2e: np.ndarray):
        slot = _slot_loads(counts, s2e)
        rank = slot.reshape(*slot.shape[:2], ep_size, -1).sum(-1)
        return slot, rank

    def std(values):  # [I, L, n] -> [L]: per iteration (ddof=1, as torch.std), averaged
        return (values.std(-1, ddof=1) if values.shape[-1] > 1 else np.zeros(values.shape[:-1])).mean(0)

    default = np.broadcast_to(default_placement(num_slots, num_experts, ep_size), (num_layers, num_slots))
    slot, rank = loads(default)
    spread = slot if per_expert else rank
    mean = spread.mean(-1).mean(0)
    rank_imb, slot_imb = _imbalance(rank), _imbalance(slot)
    placed_rank = placed_slot = placed_rank_load = placed_std = None
    if placed is not None:
        p_slot, p_rank = loads(np.stack([placed[l] for l in stats.layers]))
        placed_rank, placed_slot = _imbalance(p_rank), _imbalance(p_slot)
        placed_rank_load = p_rank.sum(0)
        placed_std = std(p_slot if per_expert else p_rank)
    default_std = std(spread)
    rows = [LayerLoad(layer, float(mean[i]), float(default_std[i]), float(rank_imb[i]), float(slot_imb[i]),
                      None if placed is None else float(placed_rank[i]),
                      None if placed is None else float(placed_slot[i]),
                      None if placed is None else float(placed_std[i]))
            for i, layer in enumerate(stats.layers)]
    return LoadReport(rows, ep_size, num_slots, rank.sum(0), placed_rank_load,
                      None if placed is None else num_slots, from_stats)


def format_report(rep: LoadReport) -> str:
    """A text table: one row per layer and an ``avg`` row."""
    placed = rep.placed_rank_load is not None
    head = ["layer", "mean", "std", "rank imb", "slot imb"]
    if placed:
        head += ["std (placed)", "rank imb (placed)", "slot imb (placed)"]

    def cells(row: LayerLoad) -> list[str]:
        out = ["avg" if row.layer < 0 else str(row.layer), f"{row.mean:.1f}", f"{row.std:.1f}",
               f"{row.rank_imbalance:.3f}", f"{row.slot_imbalance:.3f}"]
        if placed:
            out += [f"{row.placed_std:.1f}", f"{row.placed_rank_imbalance:.3f}", f"{row.placed_slot_imbalance:.3f}"]
        return out

    table = [head] + [cells(r) for r in rep.layers] + [cells(rep.average())]
    widths = [max(len(r[c]) for r in table) for c in range(len(head))]
    fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
    lines = [fmt(table[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in table[1:]]
    return "\n".join(lines)


def check_png_path(png_path: str | os.PathLike) -> Path:
    """``png_path`` as a Path if it can name a heatmap file (see `save_heatmap`), else ValueError."""
    path = Path(png_path)
    if path.suffix.lower() != ".png":
        got = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise ValueError(f"heatmap path {str(path)!r}: {got}; allowed: a file path ending in '.png'")
    if path.is_dir():
        raise ValueError(f"heatmap path {str(path)!r} is a folder; allowed: a file path ending in '.png'")
    return path


def save_heatmap(png_path: str | os.PathLike, matrix, title: str, *, row_labels=None,
                 xlabel: str = "EP rank", ylabel: str = "MoE layer",
                 colorbar_label: str = "load / layer mean") -> Path:
    """Draws ``matrix [layers, ranks]`` as a heatmap PNG (matplotlib, Agg); returns the path.

    ``png_path`` must end in ``.png`` (any case): the file written is exactly that path.
    Another suffix or none raises ValueError (matplotlib would pick the format from the
    suffix, or write ``<path>.png`` for none), as does an existing folder.
    """
    path = check_png_path(png_path)
    try:  # lazily: the package and the other commands work without matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("save_heatmap needs matplotlib: pip install matplotlib") from None
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"matrix has shape {list(matrix.shape)}; allowed: [layers, ranks], non-empty")
    rows, cols = matrix.shape
    # Figure/FigureCanvasAgg directly: no pyplot global state, no backend switch.
    fig = Figure(figsize=(min(3.0 + 0.3 * cols, 24.0), min(2.0 + 0.22 * rows, 24.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if row_labels is not None:
        step = max(1, rows // 32)  # keep the labels readable for deep models
        ax.set_yticks(range(0, rows, step), [str(v) for v in list(row_labels)[::step]])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def normalised(rank_load: np.ndarray) -> np.ndarray:
    """Per-rank load divided by its layer's mean (1 = balanced)."""
    mean = rank_load.mean(-1, keepdims=True)
    return rank_load / np.where(mean > 0, mean, 1)
