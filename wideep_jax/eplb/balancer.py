"""Online EPLB for a model's :class:`~wideep_jax.MoELayer` s.

``balancer = OnlineBalancer(layers)`` once; after each forward,
``balancer.step(stats)`` with the layers' :class:`~wideep_jax.MoEStats`. The step is
the jitted :func:`~wideep_jax.eplb.eplb_update`; its results are written back into
the layers (slot weights and placement), so the next forward uses them.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from wideep_jax.eplb.online import check_update, compiled_step, counts_on_mesh
from wideep_jax.eplb.resharding import make_master_copy
from wideep_jax.eplb.state import EplbConfig, EplbState, init_state
from wideep_jax.layer import MoELayer
from wideep_jax.moe import MoEStats

# MoELayer -> weak reference to the newest OnlineBalancer built over it. Weak both ways:
# the balancer holds its layers, so a strong value would keep the keys alive.
_LAYER_BALANCERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_balancer(layer: MoELayer) -> OnlineBalancer | None:
    """The newest live :class:`OnlineBalancer` built over ``layer``, or None."""
    ref = _LAYER_BALANCERS.get(layer)
    return None if ref is None else ref()


def register_balancer(layer: MoELayer, balancer: OnlineBalancer) -> None:
    """Makes ``balancer`` the one :func:`layer_balancer` returns for ``layer``."""
    _LAYER_BALANCERS[layer] = weakref.ref(balancer)


class OnlineBalancer:
    """Re-places ``layer_updates_per_iter`` of ``layers`` per step, moving only changed slots.

    Args:
      layers: the model's MoE layers, all ``WIDEEP`` on one mesh with the same dims.
      config: balancer settings; default: from the first layer's ``moe_config``
        (its ``load_balancer`` must be online).
      replicate_master: ``reshard: host`` only: a full host copy per device instead
        of one copy sharded over the EP group (see :func:`make_master_copy`).

    The layers' placements (and, with ``reshard: host``, their experts' weights) are taken
    here: after changing the layers' weights or placements outside the balancer, build a new one.

    Attributes:
      state: the current :class:`EplbState` (device arrays).
      master: per layer, the experts' weights in host memory (``reshard: host``), else None.
    """

    def __init__(self, layers: Sequence[MoELayer], config: EplbConfig | None = None, *,
                 replicate_master: bool = False):
        if not layers:
            raise ValueError("layers: got an empty sequence; allowed: one or more MoELayer")
        first = layers[0]
        for i, layer in enumerate(layers):
            if layer.config.backend != "WIDEEP":
                raise ValueError(f"moe_config.backend: got {layer.config.backend!r} in layers[{i}]; allowed: "
                                 "'WIDEEP' (the online balancer moves slots between EP ranks)")
            if any(layer is other for other in layers[:i]):
                raise ValueError(f"layers[{i}] appears twice in layers; allowed: each MoELayer once (its "
                                 "weights are donated to the step)")
            if ((layer.mesh, layer.config.ep_axis, layer.num_slots, layer.spec.num_experts)
                    != (first.mesh, first.config.ep_axis, first.num_slots, first.spec.num_experts)):
                raise ValueError(f"layers[{i}] differs from layers[0] in mesh, ep_axis, num_slots or num_experts; "
                                 "allowed: one balancer per group of identical layers")
        self.layers = list(layers)
        self.mesh, self.axis = first.mesh, first.config.ep_axis
        num_experts = first.spec.num_experts
        if config is None:
            config = EplbConfig.from_moe_config(first.config, num_layers=len(layers),
                                                num_experts=num_experts, ep_size=first.ep_size)
            for i, layer in enumerate(layers[1:], 1):
                # One step serves every layer with layers[0]'s settings: others would be ignored.
                theirs = EplbConfig.from_moe_config(layer.config, num_layers=len(layers),
                                                    num_experts=num_experts, ep_size=first.ep_size)
                if theirs != config:
                    raise ValueError(f"layers[{i}]'s moe_config.load_balancer gives {theirs}, layers[0]'s "
                                     f"{config}; allowed: the same balancer settings in every layer (or pass "
                                     "config= to override them all)")
        if (config.num_layers, config.num_slots, config.num_experts) != (len(layers), first.num_slots, num_experts):
            raise ValueError(f"config: num_layers/num_slots/num_experts = {config.num_layers}/"
                             f"{config.num_slots}/{config.num_experts}; allowed: {len(layers)}/"
                             f"{first.num_slots}/{num_experts} (the layers')")
        if config.ep_size != first.ep_size:
            raise ValueError(f"EplbConfig.ep_size: got {config.ep_size}; allowed: {first.ep_size} "
                             f"(the size of the layers' mesh axis {self.axis!r})")
        self.config = config
        placement = jnp.stack([layer.slot_to_expert[...] for layer in layers])
        state = init_state(placement, num_experts)
        self.state = jax.device_put(state, NamedSharding(self.mesh, P()))
        self.master = None
        if config.reshard == "host":
            self.master = [make_master_copy(self._slot_weights(layer), layer.slot_to_expert[...],
                                            num_experts, self.mesh, axis=self.axis,
                                            replicated=replicate_master) for layer in layers]
        for layer in self.layers:
            register_balancer(layer, self)

    @staticmethod
    def _slot_weights(layer: MoELayer):
        return (layer.w_gate_up[...], layer.w_down[...])

    def step(self, stats: Sequence[MoEStats] | jax.Array) -> EplbState:
        """Feeds one iteration's statistics (a ``MoEStats`` per layer, or int [L, E]
        counts) and applies the re-placement to the layers. No host sync: negative NumPy
        counts are refused, negative device counts count as 0 (see :func:`~wideep_jax.eplb.eplb_update`)."""
        if isinstance(stats, (jax.Array, np.ndarray)):
            counts = jnp.asarray(stats)
        elif (isinstance(stats, Sequence) and not isinstance(stats, (str, MoEStats)) and stats
              and all(isinstance(s, MoEStats) for s in stats)):
            counts = jnp.stack([s.expert_counts for s in stats])
        else:  # None, an empty list, one bare MoEStats (a tuple itself), ...
            raise ValueError(f"stats: got {type(stats).__name__}; allowed: a sequence of MoEStats (one per "
                             "layer) or int [num_layers, num_experts] counts")
        if not jnp.issubdtype(counts.dtype, jnp.integer):
            raise ValueError(f"stats: counts of dtype {counts.dtype}; allowed: an integer dtype")
        counts = counts_on_mesh(counts, self.mesh)
        weights = [self._slot_weights(layer) for layer in self.layers]
        check_update(self.state, weights, stats if isinstance(stats, np.ndarray) else counts, self.master,
                     self.config, self.mesh, self.axis)
        step = compiled_step(self.config, self.mesh, self.axis, weights, self.master)
        self.state, weights, placements = step(self.state, weights, counts, self.master)
        for layer, (gate_up, down), placement in zip(self.layers, weights, placements):
            # set_value, not ``v[...] = x``: the old buffers were donated to the step.
            layer.w_gate_up.set_value(gate_up)
            layer.w_down.set_value(down)
            layer.slot_to_expert.set_value(placement)
        return self.state
