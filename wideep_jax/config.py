"""TensorRT-LLM ``moe_config`` schema: typed frozen dataclasses and a strict YAML loader.

The accepted YAML is the ``moe_config`` section of TensorRT-LLM's Wide-EP README::

    moe_config:
        backend: WIDEEP
        max_num_tokens: 9216
        load_balancer: moe_load_balancer.yaml   # or an inline mapping

with every ``moe_config`` key and ``backend`` value of TensorRT-LLM's ``MoeConfig``
(its kernel-library backends run as ``CUTLASS``, or as ``WIDEEP`` in an LLM-API file
with ``enable_attention_dp: true``, see :data:`TRTLLM_LOCAL_BACKENDS`),
plus keys of our own, marked "(ours)" below (``alltoall_backend``, ``ep_axis``,
``replica_selection``, ``expert_kernel`` and the online balancer's ``decay``, ``warmup_iters``, ``reshard``,
``num_nodes``, ``tolerance``). Every bad input raises
:class:`ConfigError` naming the key (dotted path), the bad value and what is allowed.
A key of ours set to a non-default value in a mode where it does nothing (say
``decay`` with static placement) gives a :class:`ConfigWarning` naming it.
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import re
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "ALLTOALL_BACKENDS",
    "BACKENDS",
    "TRTLLM_LOCAL_BACKENDS",
    "REPLICA_SELECTIONS",
    "EXPERT_KERNELS",
    "RESHARD_MODES",
    "ONLINE_ONLY_KEYS",
    "WIDEEP_ONLY_KEYS",
    "ConfigError",
    "ConfigWarning",
    "LoadBalancerConfig",
    "MoEConfig",
    "load_moe_config",
]

BACKENDS = ("CUTLASS", "WIDEEP")
"""MoE backends, both sharding the slots over the EP axis: ``WIDEEP`` moves tokens by
all-to-all, ``CUTLASS`` by all-gather and reduce-scatter (TensorRT-LLM's two EP paths)."""
TRTLLM_LOCAL_BACKENDS = ("AUTO", "CUTEDSL", "TRTLLM", "DEEPGEMM", "DENSEGEMM", "VANILLA", "TRITON", "MARLIN",
                         "MEGAMOE_DEEPGEMM", "MEGAMOE_CUTEDSL")
"""TensorRT-LLM's other ``backend`` values (its kernel libraries): accepted so its files
load, and run on our kernels (``expert_kernel``; ``AUTO`` silently, the others with a
:class:`ConfigWarning`) as ``CUTLASS``, or as ``WIDEEP`` in an LLM-API options file with
``enable_attention_dp: true`` (see :func:`load_moe_config`)."""
ALLTOALL_BACKENDS = ("auto", "xla", "nccl", "nvlink")
"""Communication backends for ``WIDEEP``."""
REPLICA_SELECTIONS = ("round_robin", "local_first")
"""How a routed pair picks one of its expert's replicas."""
EXPERT_KERNELS = ("auto", "mosaic_gpu", "triton", "xla")
"""Grouped-matmul implementations for the expert FFN (``auto``: by device, dtype and widths)."""
RESHARD_MODES = ("host", "collective")
"""Where online re-sharding reads moved expert weights from."""

ONLINE_ONLY_KEYS = ("decay", "warmup_iters", "reshard", "num_nodes", "tolerance")
"""``load_balancer`` keys of ours that only online balancing reads."""
WIDEEP_ONLY_KEYS = ("alltoall_backend", "replica_selection")
"""``moe_config`` keys of ours that only ``backend: WIDEEP`` reads."""

_MOE = "moe_config"
_AXIS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""What ``ep_axis`` may be: an identifier-like mesh axis name (``ep``, ``expert``)."""
_LB = f"{_MOE}.load_balancer"
_IGA = f"{_LB}.initial_global_assignments"


class ConfigError(ValueError):
    """A ``moe_config`` value is invalid; the message names key, bad value and what is allowed."""


class ConfigWarning(UserWarning):
    """A value that loads but is ignored or runs differently here: a key of ours set away from its
    default where the chosen mode ignores it, or a TensorRT-LLM value with no equivalent path."""


def _warn_inert(obj: Any, prefix: str, names: tuple[str, ...], why: str) -> None:
    """Warns about each of ``names`` that ``obj`` sets away from its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    for name in names:
        value = getattr(obj, name)
        if value != defaults[name]:
            warnings.warn(f"{prefix}.{name}={value!r} does nothing {why}", ConfigWarning, stacklevel=3)


def experts_without_slot(slot_to_expert, num_experts: int) -> list[int]:
    """The experts in ``[0, num_experts)`` that no slot of one layer's placement holds
    (each must hold at least one: its tokens would otherwise run another expert)."""
    return sorted(set(range(num_experts)) - {int(e) for e in np.asarray(slot_to_expert).ravel()})


def placement_violation(num_experts: int, num_slots: int, ep_size: int, num_nodes: int, *,
                        computed: bool) -> tuple[str, int, str] | None:
    """The first placement limit these counts break, as (name, value, what is allowed), or None.

    Every placement needs ``num_slots >= num_experts``, a multiple of ``ep_size``, and
    ``num_nodes`` dividing ``ep_size``. A computed one (online, or ``eplb``'s algorithm)
    also needs ``num_nodes`` dividing ``num_experts`` and at most one replica of an
    expert per rank, all within one node group. Shared by the config and the algorithm.
    """
    if num_slots < num_experts:
        return "num_slots", num_slots, f">= num_experts = {num_experts}"
    if num_slots % ep_size:
        return "num_slots", num_slots, f"a multiple of ep_size = {ep_size}"
    if ep_size % num_nodes:
        return "num_nodes", num_nodes, f"a divisor of ep_size = {ep_size}"
    if computed:
        if num_experts % num_nodes:
            return "num_nodes", num_nodes, (f"a divisor of num_experts = {num_experts} "
                                            "(each node group holds E / num_nodes experts)")
        most = num_experts * (ep_size // num_nodes)
        if num_slots > most:
            return "num_slots", num_slots, (f"<= num_experts * ranks per node group = {most} (here "
                                            f"{num_experts} experts, ep_size {ep_size} over num_nodes "
                                            f"{num_nodes}; at most one replica of an expert per rank, all "
                                            "in one node group)")
    return None


def default_placement(num_slots: int, num_experts: int, ep_size: int) -> np.ndarray:
    """TensorRT-LLM's default placement, int32 ``[num_slots]``: local slot ``j`` of EP rank
    ``r`` holds expert ``(r * num_experts // ep_size + j) % num_experts``. With one slot
    per expert it is slot ``s`` -> expert ``s``; extra slots repeat the next rank's first
    experts (E=8, R=4, S=12: ``0 1 2 | 2 3 4 | 4 5 6 | 6 7 0``)."""
    per_rank = num_slots // ep_size
    rank, local = np.divmod(np.arange(num_slots), per_rank)
    return ((rank * num_experts // ep_size + local) % num_experts).astype(np.int32)


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}: got {value!r} ({type(value).__name__}); allowed: {allowed}")


def _int(key: str, value: Any, *, minimum: int, optional: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes if ``optional``); bools and floats are rejected."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or null" if optional else "")
        raise _fail(key, value, allowed)
    return int(value)


def _float(key: str, value: Any, *, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a float in [low, high] (or (low, high] if ``low_open``); bools are rejected."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise _fail(key, value, f"a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _choice(key: str, value: Any, choices: tuple[str, ...], *, upper: bool) -> str:
    """``value`` matched case-insensitively against ``choices``, returned in their case."""
    if isinstance(value, str):
        norm = value.upper() if upper else value.lower()
        if norm in choices:
            return norm
    raise _fail(key, value, f"one of {', '.join(choices)} (case-insensitive)")


def _kernel_library_backend(value: Any, runs_as: str, path: str, *, stacklevel: int) -> str:
    """``moe_config.backend`` checked and resolved: ``WIDEEP`` and ``CUTLASS`` as they are,
    TensorRT-LLM's kernel-library names (and ``CUTLASS``, where ``runs_as`` says so) as
    ``runs_as`` on our own kernels, with a :class:`ConfigWarning` for the library names
    but ``AUTO``; ``path`` says what ``runs_as`` does, for the warning."""
    backend = _choice(f"{_MOE}.backend", value, BACKENDS + TRTLLM_LOCAL_BACKENDS, upper=True)
    if backend in TRTLLM_LOCAL_BACKENDS and backend != "AUTO":
        warnings.warn(f"{_MOE}.backend={value!r} names a TensorRT-LLM kernel library; it runs as {runs_as} here: "
                      f"{path}, on our own kernels (see expert_kernel)", ConfigWarning, stacklevel=stacklevel)
    return backend if backend == "WIDEEP" else runs_as


def _quiet_replace(obj, **changes):
    """``dataclasses.replace`` without the :class:`ConfigWarning` s that building ``obj`` gave
    already (``__post_init__`` runs again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return dataclasses.replace(obj, **changes)


def _check_keys(key: str, raw: Mapping, allowed: tuple[str, ...]) -> None:
    for k in raw:
        if k not in allowed:
            # TensorRT-LLM's newer placement generators write ep_size for its report; its runtime refuses it too.
            advice = ("; ep_size is read by `wideep eplb report` only: remove it from a placement file you "
                      "deploy (TensorRT-LLM's runtime refuses it too)") if k == "ep_size" and key == _LB else ""
            raise ConfigError(f"{key}: unknown key {k!r}; allowed keys: {', '.join(allowed)}{advice}")


def _layer_key(key: str) -> str:
    return f"{_IGA}[{key}]"


def _layer_list(layers) -> str:
    """Sorted layer ids with runs of 3 or more as ``a..b`` (``[3..60]`` for 58 layers)."""
    ids, parts, i = sorted(layers), [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts += [f"{ids[i]}..{ids[j]}"] if j - i >= 2 else [str(v) for v in ids[i:j + 1]]
        i = j + 1
    return f"[{', '.join(parts)}]"


def _layer_ids(name: str, layers: Any) -> set[int]:
    """``layers`` (an iterable of non-negative int layer indices) as a set; anything else is a
    :class:`ConfigError` naming ``name`` (not a TypeError from inside set arithmetic)."""
    if isinstance(layers, (str, bytes, Mapping)) or not hasattr(layers, "__iter__"):
        raise _fail(name, layers, "an iterable of non-negative int layer indices (e.g. [3, 4, 5] or range(3, 61))")
    ids = list(layers)
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral) or i < 0:
            raise _fail(name, layers, f"non-negative int layer indices (it holds {i!r})")
    return {int(i) for i in ids}


_ALLOWED_LAYERS = ("allowed: a placement for every MoE layer of the model, or no initial_global_assignments "
                   "(TensorRT-LLM's default placement on every layer)")


def _freeze_assignments(raw: Any) -> Mapping[int, tuple[int, ...]] | None:
    """Validate the type of ``initial_global_assignments`` and make it immutable with int keys."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise _fail(_IGA, raw, "a mapping {layer index: list of expert ids, one per slot} or null")
    out: dict[int, tuple[int, ...]] = {}
    for layer, ids in raw.items():
        if isinstance(layer, str) and re.fullmatch(r"[0-9]+", layer):
            idx = int(layer)
        elif isinstance(layer, numbers.Integral) and not isinstance(layer, bool) and layer >= 0:
            idx = int(layer)
        else:
            raise _fail(f"{_IGA} (layer key)", layer, "a non-negative int layer index (int-like strings such as '3' too)")
        if idx in out:
            raise _fail(f"{_IGA} (layer key)", layer, f"each layer once; layer {idx} is given twice")
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, np.ndarray)):
            raise _fail(_layer_key(idx), ids, "a list of int expert ids, one per slot")
        out[idx] = tuple(_int(f"{_layer_key(idx)}[{s}]", e, minimum=0) for s, e in enumerate(ids))
    return types.MappingProxyType(out)


@dataclasses.dataclass(frozen=True)
class LoadBalancerConfig:
    """``moe_config.load_balancer``: expert slots and their initial placement (TRT-LLM EPLB)."""

    num_slots: int | None = None
    """Total expert slots over all EP ranks; None = ``num_experts`` (no replicas)."""
    layer_updates_per_iter: int = 0
    """0 = static/offline placement, > 0 = online rebalancing of that many layers per iteration."""
    initial_global_assignments: Mapping[int, tuple[int, ...]] | None = dataclasses.field(default=None, hash=False)
    """{layer index: expert id per slot} for every MoE layer of the model (see :meth:`check_layers`);
    None = the default placement on every layer."""
    decay: float = 0.9
    """(ours) Online statistics: ``load = decay * load + counts`` each iteration."""
    warmup_iters: int = 0
    """(ours) Online: iterations whose counts are ignored and that update nothing."""
    reshard: str = "host"
    """(ours) Online: ``host`` copies moved slots from a host master copy, ``collective``
    moves them between devices with collective permutes (no host copy)."""
    num_nodes: int = 1
    """(ours) Placement: replicas of an expert are kept within one of this many node groups."""
    tolerance: float = 0.05
    """(ours) Placement: relative max-rank-load slack accepted to move fewer slots; online,
    a layer is re-placed only if that lowers its busiest rank's load by more than this."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _float(f"{_LB}.decay", self.decay, low=0.0, high=1.0, low_open=True))
        object.__setattr__(self, "warmup_iters", _int(f"{_LB}.warmup_iters", self.warmup_iters, minimum=0))
        object.__setattr__(self, "reshard", _choice(f"{_LB}.reshard", self.reshard, RESHARD_MODES, upper=False))
        object.__setattr__(self, "num_nodes", _int(f"{_LB}.num_nodes", self.num_nodes, minimum=1))
        object.__setattr__(self, "tolerance", _float(f"{_LB}.tolerance", self.tolerance, low=0.0, high=1.0))
        object.__setattr__(self, "num_slots", _int(f"{_LB}.num_slots", self.num_slots, minimum=1, optional=True))
        object.__setattr__(
            self, "layer_updates_per_iter", _int(f"{_LB}.layer_updates_per_iter", self.layer_updates_per_iter, minimum=0)
        )
        object.__setattr__(self, "initial_global_assignments", _freeze_assignments(self.initial_global_assignments))
        if self.num_slots is not None:
            self._check_lengths(self.num_slots)
        if not self.is_online:
            _warn_inert(self, _LB, ONLINE_ONLY_KEYS,
                        "with layer_updates_per_iter = 0 (static placement); it applies to online "
                        "balancing (layer_updates_per_iter > 0)")

    @property
    def is_online(self) -> bool:
        """True if the placement is rebalanced during serving (``layer_updates_per_iter > 0``)."""
        return self.layer_updates_per_iter > 0

    def resolved_num_slots(self, num_experts: int) -> int:
        """``num_slots``, or ``num_experts`` when it is not set."""
        num_experts = _int("num_experts", num_experts, minimum=1)
        return num_experts if self.num_slots is None else self.num_slots

    def _check_lengths(self, num_slots: int) -> None:
        for layer, ids in (self.initial_global_assignments or {}).items():
            if len(ids) != num_slots:
                raise ConfigError(
                    f"{_layer_key(layer)}: got a list of {len(ids)} expert ids; "
                    f"allowed: exactly num_slots = {num_slots} (one expert id per slot)"
                    # A longer list may want replica slots; a shorter one cannot be a slot count (< E).
                    + ("" if self.num_slots is not None or len(ids) < num_slots else
                       f"; num_slots is not set, so it is num_experts: set {_LB}.num_slots: {len(ids)} "
                       "for lists of this length")
                )

    def check_layers(self, moe_layers, *, num_layers: int | None = None) -> LoadBalancerConfig:
        """Check that ``initial_global_assignments`` (if given) holds exactly the model's
        MoE layers ``moe_layers``: TensorRT-LLM looks each MoE layer up and fails on a
        missing one, and a key that is no MoE layer would be ignored. With ``num_layers``
        (the model's decoder layers), keys ``>= num_layers`` are its multi-token-prediction
        layers (DeepSeek-V3's layer 61, which TensorRT-LLM builds and places when it runs
        MTP; none runs here): dropped with a :class:`ConfigWarning`. Returns self, or a copy
        without those keys."""
        moe_layers = _layer_ids("moe_layers", moe_layers)
        given = set(self.initial_global_assignments or {})
        if not given:
            return self
        num_layers = _int("num_layers", num_layers, minimum=0, optional=True)
        beyond = {l for l in given - moe_layers if num_layers is not None and l >= num_layers}
        if beyond:
            warnings.warn(f"{_IGA}: layers {_layer_list(beyond)} are past the model's {num_layers} decoder layers "
                          "(TensorRT-LLM's multi-token-prediction layers, which do not run here): their placements "
                          "are ignored", ConfigWarning, stacklevel=3)
            kept = {l: ids for l, ids in self.initial_global_assignments.items() if l not in beyond}
            return _quiet_replace(self, initial_global_assignments=kept).check_layers(moe_layers)
        stray, missing = given - moe_layers, moe_layers - given
        problems = ([f"layers {_layer_list(stray)} are not MoE layers of this model"] if stray else []) + (
            [f"MoE layers {_layer_list(missing)} have no placement"] if missing else [])
        if problems:
            raise ConfigError(f"{_IGA}: {' and '.join(problems)} (it has layers {_layer_list(given)}, the model's "
                              f"MoE layers are {_layer_list(moe_layers)}); {_ALLOWED_LAYERS}")
        return self

    def validate(self, *, num_experts: int, ep_size: int, backend: str | None = None) -> LoadBalancerConfig:
        """Check slot count and placement against the model and mesh (``backend``: the
        MoE's, for the advice in errors); returns self."""
        num_experts = _int("num_experts", num_experts, minimum=1)
        ep_size = _int("ep_size", ep_size, minimum=1)
        num_slots = self.resolved_num_slots(num_experts)
        # Online, the placement is computed: its limits are said now rather than at its first step.
        # Static placement ignores num_nodes (it warns so), so it is not checked then.
        bad = placement_violation(num_experts, num_slots, ep_size, self.num_nodes if self.is_online else 1,
                                  computed=self.is_online)
        if bad and bad[0] == "num_slots" and self.num_slots is None:
            # The user wrote no slot count: name what they can change instead of a key they never set.
            multiple = -(-num_experts // ep_size) * ep_size
            raise ConfigError(
                f"num_experts={num_experts} (the slot count: {_LB}.num_slots is not set) is not a multiple of "
                f"the EP size {ep_size}; allowed: set {_LB}.num_slots to a multiple of {ep_size} that is >= "
                f"{num_experts} (e.g. {multiple}) or use an EP size that divides {num_experts}"
                + ("" if backend == "WIDEEP" else ", or mesh=None"))
        if bad:
            raise _fail(f"{_LB}.{bad[0]}", bad[1], bad[2])
        self._check_lengths(num_slots)
        for layer, ids in (self.initial_global_assignments or {}).items():
            for s, e in enumerate(ids):
                if e >= num_experts:
                    raise _fail(f"{_layer_key(layer)}[{s}]", e, f"an expert id in [0, {num_experts})")
            missing = experts_without_slot(ids, num_experts)
            if missing:
                raise ConfigError(
                    f"{_layer_key(layer)}: layer {layer} gives no slot to experts {missing}; "
                    f"allowed: every expert id in [0, {num_experts}) in at least one slot"
                )
        return self


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """``moe_config``: MoE backend, token chunking and load balancer."""

    backend: str = "CUTLASS"
    """``WIDEEP`` (all-to-all EP) or ``CUTLASS`` (all-gather EP); case-insensitive, stored upper-case.
    TensorRT-LLM's other values (:data:`TRTLLM_LOCAL_BACKENDS`) are stored as ``CUTLASS``."""
    max_num_tokens: int | None = None
    """Tokens of the whole EP group per MoE chunk (TensorRT-LLM's count); None = no chunking."""
    load_balancer: LoadBalancerConfig | None = None
    """Slots and placement; None = one slot per expert, default placement."""
    alltoall_backend: str = "auto"
    """(ours) Communication backend for ``WIDEEP``, one of :data:`ALLTOALL_BACKENDS`."""
    ep_axis: str = "ep"
    """(ours) Mesh axis name that experts are sharded over."""
    replica_selection: str = "round_robin"
    """(ours) ``round_robin`` spreads an expert's pairs over its replicas; ``local_first``
    uses a replica on the token's own rank when there is one (less traffic, less balance)."""
    expert_kernel: str = "auto"
    """(ours) Grouped-matmul implementation of the expert FFN, one of :data:`EXPERT_KERNELS`."""
    disable_finalize_fusion: bool = False
    """TensorRT-LLM: un-fuse CUTLASS's FC2+finalize for deterministic sums. Ours always are
    (each token's rows are summed in a fixed order), so either value behaves the same."""
    use_low_precision_moe_combine: bool = False
    """TensorRT-LLM: low-precision combine for NVFP4 models. There is no NVFP4 path here;
    ``true`` gives a :class:`ConfigWarning`; combine keeps its usual precision."""

    def __post_init__(self) -> None:
        written = self.backend
        backend = _kernel_library_backend(written, "CUTLASS", "all-gather EP", stacklevel=4)
        object.__setattr__(self, "backend", backend)
        for name in ("disable_finalize_fusion", "use_low_precision_moe_combine"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise _fail(f"{_MOE}.{name}", getattr(self, name), "true or false")
            object.__setattr__(self, name, bool(getattr(self, name)))  # NumPy's bool too, stored as bool
        if self.use_low_precision_moe_combine:
            warnings.warn(f"{_MOE}.use_low_precision_moe_combine=True does nothing: it is for NVFP4 models, "
                          "which have no path here", ConfigWarning, stacklevel=3)
        object.__setattr__(
            self, "max_num_tokens", _int(f"{_MOE}.max_num_tokens", self.max_num_tokens, minimum=1, optional=True)
        )
        if self.load_balancer is not None and not isinstance(self.load_balancer, LoadBalancerConfig):
            raise _fail(_LB, self.load_balancer, "a LoadBalancerConfig or None")
        object.__setattr__(
            self,
            "alltoall_backend",
            _choice(f"{_MOE}.alltoall_backend", self.alltoall_backend, ALLTOALL_BACKENDS, upper=False),
        )
        if not isinstance(self.ep_axis, str) or not _AXIS_NAME.fullmatch(self.ep_axis):
            # A name with spaces (or only spaces) is no axis any mesh here is built with.
            raise _fail(f"{_MOE}.ep_axis", self.ep_axis, "a mesh axis name: letters, digits and underscores, "
                        "not starting with a digit (e.g. ep, expert)")
        object.__setattr__(
            self, "replica_selection",
            _choice(f"{_MOE}.replica_selection", self.replica_selection, REPLICA_SELECTIONS, upper=False),
        )
        object.__setattr__(
            self, "expert_kernel",
            _choice(f"{_MOE}.expert_kernel", self.expert_kernel, EXPERT_KERNELS, upper=False),
        )
        if self.load_balancer is not None and self.load_balancer.is_online and self.backend != "WIDEEP":
            raise _fail(f"{_LB}.layer_updates_per_iter", self.load_balancer.layer_updates_per_iter,
                        f"0 with backend {written!r} (online load balancing runs on the all-to-all path: backend "
                        "WIDEEP, or any backend in a TensorRT-LLM LLM-API file with enable_attention_dp: true, "
                        "as TensorRT-LLM runs it)")
        if self.backend != "WIDEEP":
            _warn_inert(self, _MOE, WIDEEP_ONLY_KEYS,
                        f"with backend {self.backend} (all-gather EP: no all-to-all, every slot's rows run where "
                        "the slot lives); it applies to "
                        "backend WIDEEP")

    def num_slots(self, num_experts: int) -> int:
        """``load_balancer.num_slots``, or ``num_experts`` without load balancer or slot count."""
        return (self.load_balancer or LoadBalancerConfig()).resolved_num_slots(num_experts)

    def validate(self, *, num_experts: int, ep_size: int) -> MoEConfig:
        """Run every check that needs the expert count and EP size; returns self."""
        (self.load_balancer or LoadBalancerConfig()).validate(num_experts=num_experts, ep_size=ep_size,
                                                              backend=self.backend)
        return self

    def check_layers(self, moe_layers, *, num_layers: int | None = None) -> MoEConfig:
        """:meth:`LoadBalancerConfig.check_layers` (nothing to check without a load balancer);
        returns self, or a copy whose placement drops the layers past ``num_layers``."""
        lb = (self.load_balancer or LoadBalancerConfig()).check_layers(moe_layers, num_layers=num_layers)
        return self if self.load_balancer is None or lb is self.load_balancer else _quiet_replace(self, load_balancer=lb)

    def slot_to_expert(self, layer_idx: int | None, *, num_experts: int, ep_size: int) -> np.ndarray:
        """int32 ``[num_slots]`` expert id per slot for MoE layer ``layer_idx``.

        ``initial_global_assignments[layer_idx]``; without ``initial_global_assignments``
        (or for ``layer_idx=None``, a layer outside a model), TRT-LLM's default placement
        (:func:`default_placement`). A layer the given assignments leave out is a
        :class:`ConfigError`, as in TensorRT-LLM (a ``KeyError`` there).
        Slot ``s`` lives on EP rank ``s // (num_slots // ep_size)``. Validates first.
        """
        self.validate(num_experts=num_experts, ep_size=ep_size)
        layer_idx = _int("layer_idx", layer_idx, minimum=0, optional=True)
        assignments = (self.load_balancer and self.load_balancer.initial_global_assignments) or {}
        if layer_idx is None or not assignments:
            return default_placement(self.num_slots(num_experts), num_experts, ep_size)
        if layer_idx not in assignments:
            # The default placement here would silently undo an offline placement file
            # made for another model or with a layer dropped.
            raise ConfigError(f"{_IGA}: MoE layer {layer_idx} has no placement (it has layers "
                              f"{_layer_list(assignments)}); {_ALLOWED_LAYERS}")
        return np.asarray(assignments[layer_idx], dtype=np.int32)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: SafeLoader merges it; a key written here overrides a merged one
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (allowed: each key once per mapping)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(key: str, path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{key}: file not found: {str(path)!r}; allowed: a path to an existing YAML file") from None
    except OSError as e:
        what = "a directory" if path.is_dir() else f"unreadable ({e.strerror or e})"
        raise ConfigError(f"{key}: cannot read {str(path)!r}: it is {what}; allowed: a path to a readable "
                          "YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); allowed: "
                          "a YAML file") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: invalid YAML in {str(path)!r}: {e}") from None


def _mapping(key: str, raw: Any) -> Mapping:
    """``raw`` as a mapping (None -> empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _fail(key, raw, "a mapping")
    return raw


def _placement_path(raw: str | os.PathLike, base_dir: Path) -> Path:
    """A placement file's path. Relative: from the current directory, as TensorRT-LLM
    opens it, or else beside the config file (``base_dir``); both existing and
    differing is an error, since either reading could be the wrong one."""
    if not str(raw).strip():  # Path("") is the current directory
        raise _fail(_LB, raw, "a placement file's path, a mapping, or null (no load balancer)")
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path, base_dir / path]
    found = [c for c in candidates if c.is_file()]
    if len(found) == 2 and not found[0].samefile(found[1]):
        raise ConfigError(f"{_LB}: {str(raw)!r} names two different files, {str(found[0])!r} (from the current "
                          f"directory) and {str(found[1])!r} (beside the config file); allowed: a path that "
                          "names one file (make it absolute)")
    if not found:
        looked = list(dict.fromkeys(str(c) for c in candidates))  # one place when base_dir is cwd
        raise ConfigError(f"{_LB}: file not found: {str(raw)!r} (looked in {' and '.join(map(repr, looked))}); "
                          "allowed: a path to an existing YAML file")
    return found[0]


def _load_balancer(raw: Any, base_dir: Path) -> LoadBalancerConfig | None:
    """``load_balancer`` from an inline mapping or a placement-file path (see :func:`_placement_path`)."""
    if raw is None:
        return None
    where = ""
    fields = tuple(f.name for f in dataclasses.fields(LoadBalancerConfig))
    try:
        if isinstance(raw, (str, os.PathLike)):
            path = _placement_path(raw, base_dir)
            where = f" (in {str(path)!r})"
            raw = _read_yaml(_LB, path)
            if raw is None:  # TensorRT-LLM cannot build its config from an empty file either
                raise ConfigError(f"{_LB}: the placement file is empty; allowed: a mapping of "
                                  f"{', '.join(fields)}")
            raw = _mapping(_LB, raw)
        elif not isinstance(raw, Mapping):
            raise _fail(_LB, raw, "a mapping or a path (str) to a placement YAML file")
        _check_keys(_LB, raw, fields)
        return LoadBalancerConfig(**raw)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


LEGACY_MOE_KEYS = types.MappingProxyType(
    {"moe_backend": "backend", "moe_max_num_tokens": "max_num_tokens", "moe_load_balancer": "load_balancer"})
"""TensorRT-LLM's LLM-API MoE options from before ``moe_config`` (top level, or under
``pytorch_backend_config``) -> the ``moe_config`` key each became."""

LLM_API_KEYS = frozenset({
    "_mpi_session", "allreduce_strategy", "attention_dp_config", "attn_backend", "auto_parallel",
    "auto_parallel_world_size", "autotuner_enabled", "batch_wait_max_tokens_ratio", "batch_wait_timeout_iters",
    "batch_wait_timeout_ms", "batched_logits_processor", "batching_type", "build_config",
    "cache_transceiver_config", "calib_config", "checkpoint_format", "checkpoint_io_policy",
    "checkpoint_loader", "connector_config", "context_parallel_size", "cp_config", "cuda_graph_batch_sizes",
    "cuda_graph_config", "cuda_graph_max_batch_size", "cuda_graph_padding_enabled", "custom_tokenizer",
    "decoding_config", "disable_flashinfer_sampling", "disable_mm_encoder", "disable_overlap_scheduler",
    "dtype", "dwdp_config", "embedding_parallel_mode", "enable_attention_dp", "enable_autotuner",
    "enable_build_cache", "enable_chunked_prefill", "enable_early_first_token_response",
    "enable_encoder_decoder_mixed_cuda_graph", "enable_energy_metrics", "enable_in_graph_sampling",
    "enable_iter_perf_stats", "enable_iter_req_stats", "enable_layerwise_nvtx_marker",
    "enable_lm_head_tp_in_adp", "enable_lora", "enable_low_latency_host_dispatch", "enable_min_latency",
    "enable_mixed_sampler", "enable_mla_skip_correction", "enable_prompt_adapter", "enable_resource_governor",
    "enable_sleep", "enable_speculative_beam_history_d2h", "enable_tqdm", "enable_trtllm_sampler",
    "encode_only", "encoder_cuda_graph_config", "encoder_max_batch_size", "encoder_max_num_tokens",
    "env_overrides", "extended_runtime_perf_knob_config", "fail_fast_on_attention_window_too_large",
    "fast_build", "force_dynamic_quantization", "garbage_collection_gen0_threshold", "gather_generation_logits",
    "generation_config", "gms_config", "gpus_per_node", "guided_decoding_backend", "hf_revision",
    "iter_stats_max_iterations", "kv_cache_compression_config", "kv_cache_config", "kv_cache_dtype",
    "kv_connector_config", "layer_wise_benchmarks_config", "load_format", "lora_config", "max_batch_size",
    "max_beam_width", "max_cpu_loras", "max_input_len", "max_lora_rank", "max_loras",
    "max_prompt_adapter_token", "max_seq_len", "max_stats_len", "mixed_sampler",
    "mla_skip_correction_threshold", "mm_encoder_only", "model", "model_kwargs", "moe_cluster_parallel_size",
    "moe_expert_parallel_size", "moe_tensor_parallel_size", "mpi_session", "multimodal_config", "mx_config",
    "normalize_log_probs", "num_instances", "num_postprocess_workers", "num_serve_frontends",
    "nvfp4_gemm_config", "orchestrator_type", "otlp_traces_endpoint", "peft_cache_config",
    "perf_metrics_max_requests", "perf_metrics_output_dir", "pipeline_parallel_size", "post_processor_hook",
    "postprocess_tokenizer_dir", "pp_partition", "prefill_capture_num_tokens", "prefill_cuda_graph_backend",
    "print_iter_log", "prometheus_metrics_config", "pytorch_backend_config", "quant_config",
    "ray_placement_config", "ray_worker_extension_cls", "ray_worker_nsight_options", "reasoning_parser",
    "reorder_policy_config", "request_stats_max_iterations", "return_perf_metrics", "revision", "router",
    "sampler_force_async_worker", "sampler_type", "scheduler_config", "skip_tokenizer_init", "sleep_config",
    "sparse_attention_config", "speculative_config", "stream_interval", "telemetry_config",
    "tensor_parallel_size", "tokenizer", "tokenizer_mode", "tokenizer_revision", "torch_compile_config",
    "trust_remote_code", "urls", "use_cuda_graph", "use_cute_dsl_bf16_bmm", "use_cute_dsl_bf16_gemm",
    "use_cute_dsl_blockscaling_bmm", "use_cute_dsl_blockscaling_mm", "use_fine_grained_sync", "workspace",
})
"""TensorRT-LLM LLM-API option names (none of them a ``moe_config`` key): a file with
one of them at the top level is an LLM-API options file, not a bare ``moe_config``. The
fields of its ``BaseLlmArgs`` / ``TorchLlmArgs`` / ``TrtLlmArgs`` (``llmapi/llm_args.py``,
current and older releases) and the keys its YAML merge takes besides them, less the
ones that are also ``moe_config`` or legacy MoE keys; plus ``num_instances``, ``urls`` and
``router`` of a disaggregated-serving config's per-server section, so that such a
section (say ``generation_servers``) loads as an options file."""

DISAGG_SERVER_SECTIONS = ("context_servers", "generation_servers")
"""The per-server sections of a TensorRT-LLM disaggregated-serving config
(``trtllm-serve disaggregated -c``), each an LLM-API options mapping."""


def _refuse_misspelt_moe_keys(data: Mapping) -> None:
    """An LLM-API file: a key (top level or under ``pytorch_backend_config``) one typo, or
    only letter case, away from ``moe_config`` or a legacy key would be silently ignored
    (its setting left at the default), so it is an error (TensorRT-LLM refuses unknown
    options too)."""
    nested = data.get("pytorch_backend_config")
    places = [("", data)] + ([("pytorch_backend_config.", nested)] if isinstance(nested, Mapping) else [])
    names = [_MOE, *LEGACY_MOE_KEYS]
    for prefix, section in places:
        for key in section:
            if key in names or key in LLM_API_KEYS or key in ("backend", "max_num_tokens"):
                continue  # known names (the last two: the engine's options, warned about below)
            close = difflib.get_close_matches(str(key).lower(), names, n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"{prefix}{key}: unknown option in a TensorRT-LLM LLM-API options file; "
                                  f"allowed: {close[0]!r} (a misspelt MoE option would be ignored, leaving "
                                  "its setting at the default)")


def _moe_section(data: Mapping) -> tuple[Mapping, dict[str, str], bool]:
    """The ``moe_config`` mapping of a loaded file: its ``moe_config`` key, the legacy
    ``moe_*`` options, or the whole file when it is a bare ``moe_config`` mapping; for
    legacy keys, ``{"moe_config.<key>": where the file wrote it}`` for error messages; and
    whether the file was read as a bare mapping."""
    sections = [k for k in DISAGG_SERVER_SECTIONS if k in data]
    if sections:
        # Its servers may run different MoE settings (prefill vs decode): not ours to pick.
        raise ConfigError(f"{sections[0]}: the file is a TensorRT-LLM disaggregated-serving config (its "
                          f"{' and '.join(sections)} hold each server kind's LLM-API options); allowed: an LLM-API "
                          "options file or a moe_config mapping: load the section of the servers you run, e.g. "
                          "load_moe_config(yaml.safe_load(open(path))['generation_servers'])")
    nested = data.get("pytorch_backend_config")
    if isinstance(nested, Mapping) and _MOE in nested:
        raise ConfigError(f"pytorch_backend_config.{_MOE}: got a {type(nested[_MOE]).__name__} there, where "
                          f"it is not read (it would be ignored); allowed: {_MOE} at the top "
                          "level of the file, or the legacy moe_backend, moe_max_num_tokens, moe_load_balancer "
                          "under pytorch_backend_config")
    legacy = {k: v for k, v in data.items() if k in LEGACY_MOE_KEYS}
    written = {k: k for k in legacy}
    if isinstance(nested, Mapping):
        for k in LEGACY_MOE_KEYS.keys() & nested.keys():
            if k in legacy:
                raise ConfigError(f"{k}: given both at the top level and under pytorch_backend_config; "
                                  "allowed: one of them")
            legacy[k] = nested[k]
            written[k] = f"pytorch_backend_config.{k}"
    if _MOE in data:
        if legacy:
            raise ConfigError(f"{_MOE} and the legacy {', '.join(sorted(legacy))}: both given; allowed: one "
                              f"of them (moe_config.{LEGACY_MOE_KEYS[min(legacy)]} replaces {min(legacy)})")
        _refuse_misspelt_moe_keys(data)
        return _mapping(_MOE, data[_MOE]), {}, False
    if not legacy and not LLM_API_KEYS & data.keys():
        return data, {}, True  # a bare moe_config mapping: every key must be ours
    # Legacy keys, or no MoE section (TensorRT-LLM's defaults, as there): none may be misspelt.
    _refuse_misspelt_moe_keys(data)
    # An LLM-API options file: its other keys are not ours. Top-level names that are also
    # moe_config keys (backend, max_num_tokens) are the engine's options there, not the MoE's.
    for k in {"backend", "max_num_tokens"} & data.keys():
        warnings.warn(ConfigWarning(f"{k}={data[k]!r} at the top level of a TensorRT-LLM LLM-API options file is "
                                    f"the engine's option and is ignored here; the MoE's is moe_config.{k}"),
                      stacklevel=3)
    # Errors name the legacy keys, as the file has them or (unwritten) at the top level: a
    # moe_config key next to them would be refused.
    if legacy:
        written = {k: written.get(k, k) for k in LEGACY_MOE_KEYS}
    return ({LEGACY_MOE_KEYS[k]: v for k, v in legacy.items()},
            {f"{_MOE}.{LEGACY_MOE_KEYS[k]}": where for k, where in written.items()}, False)


def _warn_parallel_sizes(data: Mapping, ep_size: int | None) -> None:
    """An LLM-API file's MoE parallel sizes, which set nothing here: the EP group is the
    mesh's ``ep_axis`` and an expert always runs whole on one rank. Sizes asking for
    something else give a warning (the file stays loadable, as its engine options do)."""
    def size(key):
        value = data.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    for key in ("moe_tensor_parallel_size", "moe_cluster_parallel_size"):
        if (size(key) or 1) > 1:
            warnings.warn(ConfigWarning(f"{key}={data[key]!r}: experts are not split over ranks here (each runs "
                                        "whole on one rank, as with 1); the EP group is the mesh's ep_axis"),
                          stacklevel=3)
    expert = size("moe_expert_parallel_size")
    if ep_size is not None and expert is not None and expert > 0 and expert != ep_size:
        warnings.warn(ConfigWarning(f"moe_expert_parallel_size={expert!r}, but the EP group has {ep_size} ranks "
                                    "(the mesh's ep_axis), which is what runs"), stacklevel=3)


def _legacy_names(message: str, written: Mapping[str, str]) -> str:
    """``message`` with each ``moe_config.<key>`` in ``written`` named as the legacy key
    the file has; quoted values (paths, strings the file wrote) are left as they are."""
    pattern = re.compile("|".join(rf"{re.escape(k)}\b" for k in sorted(written, key=len, reverse=True)))
    parts = re.split(r"('(?:[^'\\]|\\.)*')", message)  # odd indexes: quoted reprs
    return "".join(part if i % 2 else pattern.sub(lambda m: written[m.group(0)], part)
                   for i, part in enumerate(parts))


def load_moe_config(
    source: str | os.PathLike | Mapping | None,
    *,
    num_experts: int | None = None,
    ep_size: int | None = None,
    name: str = "source",
) -> MoEConfig:
    """Load a :class:`MoEConfig` from a YAML file path or a mapping.

    The content is a TensorRT-LLM LLM-API options file (with ``moe_config: {...}``, or
    the legacy ``moe_backend`` / ``moe_max_num_tokens`` / ``moe_load_balancer`` keys,
    see :data:`LEGACY_MOE_KEYS`; its other keys are ignored) or the bare
    ``moe_config`` mapping. A file with neither ``moe_config`` nor a legacy key is an
    LLM-API file when it has a key of :data:`LLM_API_KEYS`. Empty content gives the
    defaults. A relative ``load_balancer`` path is found from the current directory (as
    TensorRT-LLM does) or beside the config file. If ``num_experts`` is given (with
    ``ep_size``, default 1), :meth:`MoEConfig.validate` runs too. ``name`` is what errors
    about ``source`` itself call it (a command-line tool passes its flag).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        data, base_dir = _read_yaml(name, path), path.resolve().parent
    elif source is None or isinstance(source, Mapping):
        data, base_dir = source, Path.cwd()
    else:
        raise _fail(name, source, "a YAML file path (str or os.PathLike) or a mapping")
    data, written, bare = _moe_section(raw := _mapping(name, data))
    if not bare:
        _warn_parallel_sizes(raw, ep_size)
    if num_experts is None and ep_size is not None:
        raise ConfigError(
            f"num_experts=None, ep_size={ep_size!r}: allowed: num_experts given with ep_size "
            "(the slot count may default to num_experts)"
        )
    fields = tuple(f.name for f in dataclasses.fields(MoEConfig))
    unknown = [k for k in data if k not in fields]
    if bare and unknown:
        lb_fields = {f.name for f in dataclasses.fields(LoadBalancerConfig)}
        hint = ("; it looks like a load_balancer placement file: name it from moe_config.load_balancer"
                if set(data) <= lb_fields else "")
        raise ConfigError(f"{_MOE}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)} (the mapping has "
                          "no moe_config key, no legacy moe_* key and no TensorRT-LLM LLM-API option, so it was "
                          f"read as a bare moe_config mapping{hint})")
    placement_file = data.get("load_balancer") if isinstance(data.get("load_balancer"), (str, os.PathLike)) else None
    try:
        _check_keys(_MOE, data, fields)
        kwargs = dict(data)
        if not bare and raw.get("enable_attention_dp") is True:
            # TensorRT-LLM (whose current releases no longer take WIDEEP) moves tokens by
            # all-to-all under attention data parallelism whatever the kernel backend, and
            # balances load online with any of them: that is our WIDEEP path.
            kwargs["backend"] = _kernel_library_backend(data.get("backend", "AUTO"), "WIDEEP",
                                                        "all-to-all EP, as TensorRT-LLM runs it under enable_attention_dp",
                                                        stacklevel=3)
        kwargs["load_balancer"] = _load_balancer(data.get("load_balancer"), base_dir)
        cfg = MoEConfig(**kwargs)
        if num_experts is not None:
            try:
                cfg.validate(num_experts=num_experts, ep_size=1 if ep_size is None else ep_size)
            except ConfigError as err:
                if placement_file is None or f"{_MOE}.load_balancer." not in str(err):
                    raise
                path = _placement_path(placement_file, base_dir)
                raise ConfigError(f"{err} (in the placement file {str(path)!r}, for num_experts="
                                  f"{num_experts}, ep_size={1 if ep_size is None else ep_size})") from None
    except ConfigError as err:
        if not written:
            raise
        raise ConfigError(_legacy_names(str(err), written)) from None
    return cfg
