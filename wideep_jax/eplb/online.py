"""Online EPLB: one jit-compiled functional step per iteration.

``state, weights = eplb_update(state, weights, counts, config=..., mesh=...)``:

1. statistics: ``load = decay * load + counts`` (skipped during warm-up; negative
   counts are refused in NumPy counts and count as 0 in device arrays, which are not
   read back: that would be a host sync);
2. schedule: the layers of group ``iteration % num_groups`` (layer ``l`` is in
   group ``l % num_groups``, ``num_groups = ceil(L / layer_updates_per_iter)``,
   TRT-LLM's interleaving; its cycle's extra idle iteration, added when all groups have the
   same size, is left out) get a new placement from their load, migration-aware
   so that slots whose expert need not move stay put; a layer keeps its current
   placement unless the new one lowers its busiest rank's load by more than
   ``tolerance`` (relative), so noise in the counts does not churn weights;
3. re-sharding: only slots whose expert changed are written (see
   :mod:`wideep_jax.eplb.resharding`); a layer whose placement changed has its
   load reset to zero.

Everything is data: changing loads or placements never recompiles, and the step
makes no host sync, so it is dispatched asynchronously behind inference.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wideep_jax.eplb.algorithm import compute_placement, rank_loads
from wideep_jax.eplb.resharding import (host_memory_kind, master_is_replicated, reshard_collective,
                                       reshard_from_host, reshard_from_sharded_host)
from wideep_jax.eplb.state import EplbConfig, EplbState, accumulate, group_layers
from wideep_jax.moe import constrain

Pytree = Any


def check_update(state: EplbState, weights: Sequence[Pytree], counts: jax.Array, master, config: EplbConfig,
                 mesh: Mesh, axis: str):
    if axis not in mesh.shape:
        raise ValueError(f"axis: got {axis!r}; allowed: an axis of the mesh {dict(mesh.shape)}")
    if config.ep_size != mesh.shape[axis]:
        # Placements count ranks by ep_size; the weights are split by the mesh: a mismatch
        # would put other experts' weights in slots.
        raise ValueError(f"EplbConfig.ep_size: got {config.ep_size}; allowed: {mesh.shape[axis]} "
                         f"(the size of mesh axis {axis!r})")
    want = (config.num_layers, config.num_experts)
    if not (hasattr(counts, "shape") and hasattr(counts, "dtype")):
        raise ValueError(f"counts: got {type(counts).__name__}; allowed: an int array [num_layers, num_experts]")
    if not jnp.issubdtype(counts.dtype, jnp.integer):
        # Float counts are taken as loads: one NaN makes the layer's load NaN for good, and a
        # layer with a NaN load is never re-placed again.
        raise ValueError(f"counts: got dtype {counts.dtype}; allowed: an integer dtype (routed pairs)")
    if tuple(counts.shape) != want:
        raise ValueError(f"counts has shape {tuple(counts.shape)}; allowed: [num_layers, num_experts] = {list(want)}")
    # Host counts only: device counts would need a sync; the step counts their negatives as 0.
    if isinstance(counts, np.ndarray) and counts.size and counts.min() < 0:
        raise ValueError(f"counts: got a minimum of {counts.min()}; allowed: routed pairs, >= 0")
    if tuple(state.placement.shape) != (config.num_layers, config.num_slots):
        raise ValueError(f"state.placement has shape {tuple(state.placement.shape)}; allowed: "
                         f"[{config.num_layers}, {config.num_slots}]")
    if tuple(state.load.shape) != want:
        raise ValueError(f"state.load has shape {tuple(state.load.shape)}; allowed: [num_layers, num_experts] = "
                         f"{list(want)} (init_state's num_experts must be EplbConfig.num_experts)")
    if len(weights) != config.num_layers:
        raise ValueError(f"weights has {len(weights)} layers; allowed: num_layers = {config.num_layers}")
    for leaf in jax.tree.leaves(weights):
        if leaf.shape[0] != config.num_slots:
            raise ValueError(f"a slot-weight leaf has shape {leaf.shape}; allowed: leading dim num_slots = "
                             f"{config.num_slots}")
    seen = {}
    for layer, w in enumerate(weights):
        for leaf in jax.tree.leaves(w):
            if id(leaf) in seen:  # donated twice: XLA refuses it only at run time
                raise ValueError(f"weights[{layer}] holds the array of weights[{seen[id(leaf)]}] again; allowed: "
                                 "distinct arrays (the weights are donated to the step)")
            seen[id(leaf)] = layer
    if config.reshard == "host":
        if master is None or len(master) != config.num_layers:
            raise ValueError("reshard='host' needs master: one [num_experts, ...] pytree per layer "
                             "(see make_master_copy)")
        padded = -(-config.num_experts // config.ep_size) * config.ep_size
        replicated = master_is_replicated(master)
        for leaf in jax.tree.leaves(master):
            want = config.num_experts if replicated else padded
            if leaf.shape[0] != want:
                raise ValueError(f"a master leaf has shape {leaf.shape}; allowed: leading dim {want} "
                                 "(num_experts replicated, or padded to a multiple of ep_size when sharded)")
        for layer, (w, m) in enumerate(zip(weights, master)):
            # Moved slots take master rows: each leaf must be its slot-weight leaf's expert.
            if jax.tree.structure(m) != jax.tree.structure(w):
                raise ValueError(f"master[{layer}] is a {jax.tree.structure(m)}; allowed: the structure of "
                                 f"weights[{layer}], {jax.tree.structure(w)}")
            for index, (wl, ml) in enumerate(zip(jax.tree.leaves(w), jax.tree.leaves(m))):
                if tuple(ml.shape[1:]) != tuple(wl.shape[1:]):
                    raise ValueError(f"master[{layer}] leaf {index} has shape {tuple(ml.shape)}; allowed: "
                                     f"[experts, *{list(wl.shape[1:])}] (the expert shape of weights[{layer}] "
                                     f"leaf {index})")
                if ml.dtype != wl.dtype:  # moved slots would be cast to the weights' dtype silently
                    raise ValueError(f"master[{layer}] leaf {index} has dtype {ml.dtype}; allowed: {wl.dtype} "
                                     f"(the dtype of weights[{layer}] leaf {index})")
    elif master is not None:
        raise ValueError("reshard='collective' moves weights between devices; got a master copy, allowed: None")


def new_placements(state: EplbState, counts: jax.Array, config: EplbConfig) -> tuple[jax.Array, jax.Array]:
    """Statistics and scheduling: returns ``(load [L, E], placement [L, S])`` after this step."""
    active = state.iteration >= config.warmup_iters
    load = accumulate(state.load, counts, decay=config.decay, active=active)
    layers, valid = group_layers(state.iteration - config.warmup_iters, config)
    current = state.placement[layers]
    group_load = load[layers]
    busiest = lambda p: rank_loads(group_load, p, config.ep_size).max(axis=1)
    # Hysteresis: the current placement moves nothing, so it stays unless a new one
    # lowers the busiest rank's load by more than the tolerance. No placement beats
    # the mean rank load, so a layer already within the tolerance of it is not
    # re-solved at all (the steady state costs no solve).
    current_max = busiest(current)
    mean_rank_load = group_load.sum(axis=1) / config.ep_size
    need = (valid & active & (group_load.sum(axis=1) > 0)  # no statistics yet: keep
            & (current_max > mean_rank_load * (1.0 + config.tolerance)))
    proposal = jax.lax.cond(
        need.any(),
        lambda: compute_placement(group_load, config.num_slots, config.ep_size, num_nodes=config.num_nodes,
                                  current=current, tolerance=config.tolerance).astype(jnp.int32),
        lambda: current)
    take = need & (current_max > busiest(proposal) * (1.0 + config.tolerance))
    rows = jnp.where(take, layers, config.num_layers)  # out of range = not written
    placement = state.placement.at[rows].set(proposal, mode="drop")
    return load, placement


def _reshard(weights, old, new, master, *, config: EplbConfig, mesh: Mesh, axis: str,
             master_replicated: bool = False):
    """Moves each layer's changed slots (``old``/``new``: int32 [L, S], replicated)."""
    ranks = config.ep_size
    slot_spec = P(axis)
    weight_specs = jax.tree.map(lambda _: slot_spec, weights)
    to_device = host_memory_kind(mesh) is not None

    def move(w, o, n, m):
        if config.reshard == "collective":
            return reshard_collective(w, o, n, axis_name=axis, num_ranks=ranks)
        if master_replicated:
            return reshard_from_host(w, o, n, m, axis_name=axis, num_ranks=ranks, to_device=to_device)
        return reshard_from_sharded_host(w, m, o, n, num_experts=config.num_experts, axis_name=axis,
                                         num_ranks=ranks, to_device=to_device)

    def body(weights, old, new, master):
        out = []
        for i, w in enumerate(weights):
            m = None if master is None else master[i]
            # Placements are replicated, so every device takes the same branch and
            # the collectives inside run everywhere or nowhere; an unchanged layer
            # costs nothing (no loop, no scratch copy).
            changed = (old[i] != new[i]).any()
            out.append(jax.lax.cond(changed, lambda w, i=i, m=m: move(w, old[i], new[i], m), lambda w: w, w))
        return out

    master_spec = P() if master_replicated else P(axis)
    master_specs = None if master is None else jax.tree.map(lambda _: master_spec, master)
    return jax.shard_map(body, mesh=mesh, in_specs=(weight_specs, P(), P(), master_specs),
                         out_specs=weight_specs, check_vma=False)(weights, old, new, master)


def _step(state, weights, counts, master, *, config: EplbConfig, mesh: Mesh, axis: str,
          master_replicated: bool):
    load, placement = new_placements(state, counts, config)
    moved = (placement != state.placement).sum(axis=1).astype(jnp.int32)
    load = jnp.where((moved > 0)[:, None], 0.0, load)
    old, new = constrain(state.placement, mesh, P()), constrain(placement, mesh, P())
    weights = _reshard(list(weights), old, new, master, config=config, mesh=mesh, axis=axis,
                       master_replicated=master_replicated)
    layer_placements = tuple(placement[i] for i in range(config.num_layers))
    return EplbState(load, placement, state.iteration + 1, moved), weights, layer_placements


@functools.cache
def _jitted_step(config: EplbConfig, mesh: Mesh, axis: str, weight_shardings, master_replicated: bool):
    """The step compiled for one set of static settings and weight layouts.

    Outputs keep exactly the inputs' sharding objects, so a model jitted on the
    layers before the step does not recompile after it.
    """
    rep = NamedSharding(mesh, P())
    state_shardings = EplbState(rep, rep, rep, rep)
    placements = (rep,) * config.num_layers
    step = functools.partial(_step, config=config, mesh=mesh, axis=axis, master_replicated=master_replicated)
    return jax.jit(step, donate_argnums=(1,),
                   out_shardings=(state_shardings, list(weight_shardings), placements))


def compiled_step(config: EplbConfig, mesh: Mesh, axis: str, weights: Sequence[Pytree], master=None):
    """The jitted ``(state, weights, counts, master) -> (state, weights, per-layer placements)``."""
    shardings = tuple(jax.tree.map(lambda a: a.sharding, w) for w in weights)
    return _jitted_step(config, mesh, axis, shardings, master is not None and master_is_replicated(master))


def counts_on_mesh(counts, mesh: Mesh):
    """``counts`` replicated on ``mesh`` in a one-process run: NumPy counts, single-device
    arrays and stacked ``MoEStats`` counts (those sit on the mesh) then share one compiled
    step, which each kind compiled again otherwise. Across processes the counts are global
    arrays already, or host data the jitted step places itself: returned as given."""
    if jax.process_count() == 1:
        return jax.device_put(counts, NamedSharding(mesh, P()))
    return counts


def eplb_update(state: EplbState, weights: Sequence[Pytree], counts: jax.Array, *,
                config: EplbConfig, mesh: Mesh, axis: str = "ep",
                master: Sequence[Pytree] | None = None) -> tuple[EplbState, list[Pytree]]:
    """One online balancing step (jit-compiled; ``weights`` are donated).

    Args:
      state: the balancer state (:func:`wideep_jax.eplb.init_state`).
      weights: per MoE layer, a pytree of slot weights with leaves ``[num_slots, ...]``
        sharded over ``axis`` (e.g. ``(w_gate_up, w_down)``).
      counts: int [num_layers, num_experts] routed pairs of this iteration
        (stack of each layer's ``MoEStats.expert_counts``), >= 0: NumPy counts with a
        negative are refused; a device array's are not read back (no host sync) and
        count as 0.
      config: static balancer settings.
      mesh: the device mesh of the weights.
      axis: the EP mesh axis.
      master: ``reshard='host'`` only: per layer, the experts' weights ``[num_experts, ...]``
        in host memory (:func:`wideep_jax.eplb.make_master_copy`).

    Returns:
      ``(state, weights)``; slots whose expert changed hold their new expert's weights.
    """
    check_update(state, weights, counts, master, config, mesh, axis)
    # The step's state comes out replicated on the mesh: put a fresh state (init_state's
    # arrays sit on one device) there too, or the second call compiles the step again.
    state = jax.device_put(state, NamedSharding(mesh, P()))
    counts = counts_on_mesh(counts, mesh)
    weights = list(weights)
    step = compiled_step(config, mesh, axis, weights, master)
    state, weights, _ = step(state, weights, counts, None if master is None else list(master))
    return state, weights
