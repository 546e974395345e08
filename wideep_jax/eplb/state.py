"""EPLB state and load statistics, as pure functions of the state.

The state is a small pytree of device arrays that jit carries from step to step:
the decayed per-expert load of every MoE layer and every layer's placement.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wideep_jax.config import RESHARD_MODES, LoadBalancerConfig, MoEConfig, experts_without_slot, placement_violation


@dataclasses.dataclass(frozen=True)
class EplbConfig:
    """Static settings of the online balancer (hashable: a jit static argument)."""

    num_layers: int
    """MoE layers the balancer covers (index ``l`` = position in the weights list)."""
    num_experts: int
    num_slots: int
    ep_size: int
    layer_updates_per_iter: int = 1
    """Layers re-placed per iteration (TRT-LLM's ``layer_updates_per_iter``)."""
    decay: float = 0.9
    warmup_iters: int = 0
    reshard: str = "host"
    num_nodes: int = 1
    tolerance: float = 0.05

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "num_slots", "ep_size", "layer_updates_per_iter", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EplbConfig.{name}: got {value!r}; allowed: an int >= 1")
        if self.num_slots < self.num_experts or self.num_slots % self.ep_size:
            raise ValueError(f"EplbConfig.num_slots: got {self.num_slots}; allowed: >= num_experts = "
                             f"{self.num_experts} and a multiple of ep_size = {self.ep_size}")
        # The placement the balancer computes has more limits (nodes, one replica of an
        # expert per rank): checked here, not at the first step's trace under another name.
        bad = placement_violation(self.num_experts, self.num_slots, self.ep_size, self.num_nodes, computed=True)
        if bad:
            raise ValueError(f"EplbConfig.{bad[0]}: got {bad[1]}; allowed: {bad[2]}")
        for name in ("decay", "tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"EplbConfig.{name}: got {value!r}; allowed: a number")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"EplbConfig.decay: got {self.decay!r}; allowed: a number in (0, 1]")
        if self.reshard not in RESHARD_MODES:
            raise ValueError(f"EplbConfig.reshard: got {self.reshard!r}; allowed: one of {RESHARD_MODES}")
        if isinstance(self.warmup_iters, bool) or not isinstance(self.warmup_iters, int) or self.warmup_iters < 0:
            raise ValueError(f"EplbConfig.warmup_iters: got {self.warmup_iters!r}; allowed: an int >= 0")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"EplbConfig.tolerance: got {self.tolerance!r}; allowed: a number in [0, 1]")

    @property
    def num_groups(self) -> int:
        """Layer groups updated in turn: layer ``l`` is in group ``l % num_groups``."""
        return math.ceil(self.num_layers / self.layer_updates_per_iter)

    @property
    def group_size(self) -> int:
        """Most layers in one group (groups of the last residue may be one short)."""
        return math.ceil(self.num_layers / self.num_groups)

    @classmethod
    def from_moe_config(cls, config: MoEConfig, *, num_layers: int, num_experts: int,
                        ep_size: int) -> EplbConfig:
        """The balancer settings of a ``moe_config`` with an online ``load_balancer``."""
        lb = config.load_balancer or LoadBalancerConfig()
        if not lb.is_online:
            raise ValueError(
                "moe_config.load_balancer.layer_updates_per_iter: got "
                f"{lb.layer_updates_per_iter}; allowed: an int >= 1 for the online balancer"
            )
        config.validate(num_experts=num_experts, ep_size=ep_size)
        return cls(num_layers=num_layers, num_experts=num_experts,
                   num_slots=lb.resolved_num_slots(num_experts), ep_size=ep_size,
                   layer_updates_per_iter=min(lb.layer_updates_per_iter, num_layers),
                   decay=lb.decay, warmup_iters=lb.warmup_iters, reshard=lb.reshard,
                   num_nodes=lb.num_nodes, tolerance=lb.tolerance)


class EplbState(NamedTuple):
    """What the balancer carries between iterations (all device arrays)."""

    load: jax.Array  # float32 [L, E]: decayed routed pairs since the layer's last placement change
    placement: jax.Array  # int32 [L, S]: slot -> expert of every layer
    iteration: jax.Array  # int32 []: eplb_update calls so far
    moved_slots: jax.Array  # int32 [L]: slots whose expert changed at the last call


def init_state(placement: jax.Array | np.ndarray, num_experts: int) -> EplbState:
    """Fresh state for ``placement`` (int32 [L, S]); loads start at zero.

    Every layer's placement must hold every expert ``[0, num_experts)`` in at least
    one slot: an expert without a slot would drop out of the statistics (its load
    counts on no rank) and its tokens would run another expert's weights.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 1:
        raise ValueError(f"num_experts: got {num_experts!r}; allowed: an int >= 1")
    num_experts = int(num_experts)
    if not isinstance(placement, jax.core.Tracer):
        values = np.asarray(placement)
        if values.ndim != 2:
            raise ValueError(f"placement has shape {values.shape}; allowed: [num_layers, num_slots]")
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"placement: got dtype {values.dtype}; allowed: integer expert ids")
        bad = np.argwhere((values < 0) | (values >= num_experts))
        if bad.size:
            layer, slot = (int(i) for i in bad[0])
            raise ValueError(f"placement[{layer}, {slot}]: got {int(values[layer, slot])}; allowed: an "
                             f"expert id in [0, {num_experts})")
        for layer, row in enumerate(values):
            missing = experts_without_slot(row, num_experts)
            if missing:
                raise ValueError(f"placement[{layer}] gives no slot to experts {missing}; allowed: "
                                 f"every expert in [0, {num_experts}) in at least one slot")
    placement = jnp.asarray(placement, jnp.int32)
    if placement.ndim != 2:
        raise ValueError(f"placement has shape {placement.shape}; allowed: [num_layers, num_slots]")
    num_layers = placement.shape[0]
    return EplbState(
        load=jnp.zeros((num_layers, num_experts), jnp.float32),
        placement=placement,
        iteration=jnp.zeros((), jnp.int32),
        moved_slots=jnp.zeros((num_layers,), jnp.int32),
    )


def accumulate(load: jax.Array, counts: jax.Array, *, decay: float, active: jax.Array) -> jax.Array:
    """``decay * load + counts`` where ``active`` (a bool scalar), else ``load``.

    Negative counts count as 0: NumPy counts are refused before the step (``check_update``),
    but device counts are not read back (that would be a host sync), so here, under jit,
    the rule is applied as :func:`~wideep_jax.eplb.compute_placement` applies it to loads.
    """
    updated = decay * load + jnp.maximum(counts, 0).astype(jnp.float32)
    return jnp.where(active, updated, load)


def group_layers(iteration_in_schedule: jax.Array, config: EplbConfig) -> tuple[jax.Array, jax.Array]:
    """The layers updated at this iteration (TRT-LLM's interleaving, without the idle
    iteration its cycle adds when all groups have the same size).

    Returns ``(layers int32 [group_size], valid bool [group_size])``: group
    ``g = iteration % num_groups`` is the layers ``l`` with ``l % num_groups == g``.
    """
    groups = config.num_groups
    g = iteration_in_schedule % groups
    layers = g + groups * jnp.arange(config.group_size, dtype=jnp.int32)
    valid = layers < config.num_layers
    return jnp.where(valid, layers, 0), valid
