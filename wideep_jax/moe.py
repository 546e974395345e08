"""Functional MoE forward: router -> dispatch plan -> all-to-all -> experts -> combine.

:class:`wideep_jax.MoELayer` holds the weights and calls :func:`moe_forward`;
benchmarks and tests may call it directly. Everything that depends on the
routing or the placement is data, so neither recompiles.
"""
from __future__ import annotations

import copy
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from wideep_jax._checks import is_mask_dtype
from wideep_jax.comm import ENV_VAR as ALLTOALL_ENV_VAR, get_alltoall_backend
from wideep_jax.config import MoEConfig
from wideep_jax.dispatch import make_dispatch_plan
from wideep_jax.experts import routed_experts, shared_experts
from wideep_jax.placement import choose_slots, replica_table
from wideep_jax.routing import Routing, route
from wideep_jax.spec import MoESpec


class MoEWeights(NamedTuple):
    """The arrays of one MoE layer (global shapes)."""

    router: jax.Array  # [H, E]
    w_gate_up: jax.Array  # [S, H, 2I], sharded over the EP axis when there is a mesh
    w_down: jax.Array  # [S, I, H]
    slot_to_expert: jax.Array  # int32 [S]
    correction_bias: jax.Array | None = None  # [E], noaux_tc routing only
    shared_gate_up: jax.Array | None = None  # [H, 2Is]
    shared_down: jax.Array | None = None  # [Is, H]


class MoEStats(NamedTuple):
    """Load statistics of one forward, replicated on every device (no host sync).

    Attributes:
      expert_counts: int32 [E] routed (token, k) pairs per expert, summed over ranks.
        A pair with no slot to run on (under jit: an id outside [0, E), or an expert the
        slot table gives no slot) is computed nowhere and counted nowhere, here or below.
      slot_counts: int32 [S] rows computed per slot (sums to ``expert_counts``' total).
      rank_tokens: int32 [R] tokens each rank ran experts for (deduplicated): those it
        received (WIDEEP), or those of the gathered tokens with a pair on its slots
        (CUTLASS); without a mesh, the tokens computed.
      rank_expert_counts: int32 [R, E] routed pairs per expert of the tokens that
        started on each rank (what TensorRT-LLM's per-rank statistics files hold).
    """

    expert_counts: jax.Array
    slot_counts: jax.Array
    rank_tokens: jax.Array
    rank_expert_counts: jax.Array


def _as_array(name: str, value, allowed: str):
    """``value`` as an array: arrays (tracers included) pass, a list or tuple is converted;
    ``TypeError`` naming ``name`` for anything else (it would fail later on ``.shape``)."""
    if isinstance(value, (jax.Array, np.ndarray)):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return jnp.asarray(value)
        except (TypeError, ValueError) as e:  # ragged, or not numbers
            raise TypeError(f"{name}: got a {type(value).__name__} that is not an array ({e}); "
                            f"allowed: {allowed}") from None
    raise TypeError(f"{name}: got {type(value).__name__}; allowed: {allowed}")


def _as_mask(token_mask):
    if token_mask is None:
        return None
    return _as_array("token_mask", token_mask, "a bool [tokens] array (or a list of bools), or None")


def _as_routing(routing) -> Routing | None:
    """``routing`` as a :class:`Routing`. A plain 2-tuple is read in Routing's field order,
    (ids, weights), as the docstrings write it; a (weights, ids) pair (``jax.lax.top_k``'s
    order) is refused by the dtype checks, not run swapped."""
    if routing is None:
        return None
    if not isinstance(routing, tuple) or len(routing) != 2:  # a Routing is a 2-tuple too
        raise TypeError(f"routing: got {type(routing).__name__}"
                        + (f" of length {len(routing)}" if isinstance(routing, (tuple, list)) else "")
                        + "; allowed: a Routing(ids, weights), a plain (ids, weights) tuple, or None")
    ids, weights = routing
    return Routing(_as_array("routing.ids", ids, "an int [tokens, top_k] array"),
                   _as_array("routing.weights", weights, "a float [tokens, top_k] array"))


# The Pallas expert kernels' width rule (their tiles): both GEMMs' K and N are the hidden
# and expert widths.
_KERNEL_WIDTH_MULTIPLE = {"mosaic_gpu": 64, "triton": 16}


def expert_kernel_takes_dtype(kernel: str, dtype) -> bool:
    """Whether ``moe_config.expert_kernel`` ``kernel`` computes in ``dtype``: the Pallas
    kernels take 16-bit operands only (tensor cores), ``auto`` and ``xla`` any float."""
    return kernel not in _KERNEL_WIDTH_MULTIPLE or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _check_expert_kernel(kernel: str, spec: MoESpec) -> None:
    """A named Pallas expert kernel fits the layer's compute dtype and widths: said here,
    naming the key, instead of by the kernel at its first call. The experts compute in
    ``MoESpec.dtype`` (tokens and weights are cast to it), whatever x's dtype."""
    multiple = _KERNEL_WIDTH_MULTIPLE.get(kernel)
    if multiple is None:
        return
    allowed = "or moe_config.expert_kernel 'auto' (picks a kernel that fits) or 'xla'"
    if not expert_kernel_takes_dtype(kernel, spec.dtype):
        raise ValueError(f"moe_config.expert_kernel={kernel!r} takes bfloat16 or float16 operands, got "
                         f"MoESpec.dtype={jnp.dtype(spec.dtype).name} (the experts' compute dtype, whatever "
                         f"x's); allowed: MoESpec.dtype bfloat16/float16, {allowed}")
    widths = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size}
    bad = {name: width for name, width in widths.items() if width % multiple}
    if bad:
        raise ValueError(f"moe_config.expert_kernel={kernel!r} needs hidden_size and intermediate_size that are "
                         f"multiples of {multiple}, got {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                         f"allowed: such widths, {allowed}")


def _check_inputs(x, token_mask, routing, spec: MoESpec):
    if x.ndim != 2 or x.shape[1] != spec.hidden_size:
        raise ValueError(f"x has shape {x.shape}; allowed: [tokens, hidden_size={spec.hidden_size}]")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        # The output has x's dtype: integer x would get its expert sums truncated, silently.
        raise ValueError(f"x has dtype {x.dtype}; allowed: a floating dtype (the output has x's dtype)")
    if token_mask is not None and token_mask.shape != x.shape[:1]:
        raise ValueError(f"token_mask has shape {token_mask.shape}; allowed: [{x.shape[0]}]")
    if token_mask is not None and not is_mask_dtype(token_mask.dtype):
        raise ValueError(f"token_mask has dtype {token_mask.dtype}; allowed: bool (or 0/1 integers)")
    if routing is not None:
        want = (x.shape[0], spec.top_k)
        if routing.ids.shape != want or routing.weights.shape != want:
            raise ValueError(
                f"routing has ids {routing.ids.shape} / weights {routing.weights.shape}; allowed: {want}"
            )
        # Float ids would be cut to integers (or ids and weights passed swapped run silently).
        if jnp.issubdtype(routing.ids.dtype, jnp.floating) and jnp.issubdtype(routing.weights.dtype, jnp.integer):
            raise ValueError(f"routing has float ids ({routing.ids.dtype}) and integer weights "
                             f"({routing.weights.dtype}): swapped? allowed: (ids, weights), Routing's order "
                             "(jax.lax.top_k returns (values, indices))")
        if not jnp.issubdtype(routing.ids.dtype, jnp.integer):
            raise ValueError(f"routing.ids has dtype {routing.ids.dtype}; allowed: an integer dtype (expert ids)")
        if not jnp.issubdtype(routing.weights.dtype, jnp.floating):
            raise ValueError(f"routing.weights has dtype {routing.weights.dtype}; allowed: a floating dtype")


def _check_weights(w: MoEWeights, spec: MoESpec, num_ranks: int) -> None:
    """Shapes and dtypes always; the slot table's values where they are concrete (not under jit)."""
    if not isinstance(w, MoEWeights):
        raise TypeError(f"weights: got {type(w).__name__}; allowed: a MoEWeights (e.g. MoELayer.weights())")
    h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    for name, array in w._asdict().items():
        if array is not None and not isinstance(array, (jax.Array, np.ndarray)):
            raise TypeError(f"weights.{name}: got {type(array).__name__}; allowed: an array")
    # A float table would be cut to integers (2.7 -> expert 2), and integer weights (say int8
    # without their scales) cast to float: both run silently on the wrong numbers.
    if not jnp.issubdtype(w.slot_to_expert.dtype, jnp.integer):
        raise ValueError(f"weights.slot_to_expert has dtype {w.slot_to_expert.dtype}; allowed: an integer "
                         "dtype (expert ids)")
    for name in ("router", "w_gate_up", "w_down", "correction_bias", "shared_gate_up", "shared_down"):
        array = getattr(w, name)
        if array is not None and not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"weights.{name} has dtype {array.dtype}; allowed: a floating dtype")
    if w.slot_to_expert.ndim != 1:
        raise ValueError(f"weights.slot_to_expert has shape {tuple(w.slot_to_expert.shape)}; allowed: [num_slots]")
    s = w.slot_to_expert.shape[0]
    want = {"router": (w.router, (h, e)), "w_gate_up": (w.w_gate_up, (s, h, 2 * i)),
            "w_down": (w.w_down, (s, i, h)), "slot_to_expert": (w.slot_to_expert, (s,))}
    if w.correction_bias is not None:
        want["correction_bias"] = (w.correction_bias, (e,))
    if spec.shared_width:
        want["shared_gate_up"] = (w.shared_gate_up, (h, 2 * spec.shared_width))
        want["shared_down"] = (w.shared_down, (spec.shared_width, h))
    elif w.shared_gate_up is not None or w.shared_down is not None:
        raise ValueError("weights.shared_gate_up / shared_down are given but MoESpec.num_shared_experts is 0; "
                         "allowed: None")
    for name, (array, shape) in want.items():
        if array is None or tuple(array.shape) != shape:
            got = None if array is None else tuple(array.shape)
            raise ValueError(f"weights.{name} has shape {got}; allowed: {shape} (hidden_size {h}, "
                             f"intermediate_size {i}, num_experts {e}, slots = len(slot_to_expert) {s})")
    if s < e or s % num_ranks:
        raise ValueError(f"weights.slot_to_expert has {s} slots; allowed: >= num_experts={e}"
                         + (f" and a multiple of the {num_ranks} EP ranks" if num_ranks > 1 else ""))
    if _on_host(w.slot_to_expert):
        table = np.asarray(w.slot_to_expert)
        if table.min() < 0 or table.max() >= e or len(np.unique(table)) != e:
            missing = sorted(set(range(e)) - set(table.tolist()))[:8]
            raise ValueError(f"weights.slot_to_expert: got values in [{table.min()}, {table.max()}], experts "
                             f"without a slot {missing}; allowed: ids in [0, {e}), each expert in >= 1 slot")


def _on_host(a) -> bool:
    """Whether ``a``'s values can be read here: not a tracer (under jit) and not spread
    over other processes' devices."""
    return not isinstance(a, jax.core.Tracer) and getattr(a, "is_fully_addressable", True)


def _check_routing_ids(routing: Routing | None, token_mask, num_experts: int) -> bool:
    """Out-of-range ids would run another expert's weights: refused where the ids (and
    the mask) are concrete; returns whether they were checked (if not, moe_forward makes
    those tokens' outputs NaN under jit). Masked-out tokens are not routed, so their ids
    (padding rows often hold -1) are not checked, here as under jit."""
    if routing is None:
        return True
    if not _on_host(routing.ids) or (token_mask is not None and not _on_host(token_mask)):
        return False
    ids = np.asarray(routing.ids)
    bad = (ids < 0) | (ids >= num_experts)
    if token_mask is not None:
        bad &= np.asarray(token_mask).astype(bool)[:, None]
    if bad.any():
        token, k = np.argwhere(bad)[0]
        raise ValueError(f"routing.ids: got values in [{ids[bad].min()}, {ids[bad].max()}] "
                         f"(first: {ids[token, k]} at token {token}, k {k}); allowed: [0, {num_experts})"
                         + ("" if token_mask is None else " for tokens the token_mask keeps"))
    return True


def constrain(a: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    """Puts ``a`` in the layout shard_map expects, on Explicit and Auto meshes alike."""
    sharding = NamedSharding(mesh, spec)
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(a, sharding)
    return jax.lax.with_sharding_constraint(a, sharding)


def _pad_rows(a: jax.Array, pad: int, value=0) -> jax.Array:
    if pad == 0:
        return a
    return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=value)


def moe_forward(
    x: jax.Array,
    weights: MoEWeights,
    *,
    spec: MoESpec,
    config: MoEConfig,
    mesh: Mesh | None = None,
    token_mask: jax.Array | None = None,
    routing: Routing | None = None,
) -> tuple[jax.Array, MoEStats]:
    """One MoE layer forward.

    Args:
      x: [T, H] tokens. With a mesh they are data-parallel over ``config.ep_axis``;
        a T that the axis size does not divide is padded, not rejected.
      weights: the layer's arrays.
      spec: model dims and router.
      config: backend, chunking, all-to-all backend, EP axis.
      mesh: device mesh; required for ``WIDEEP``.
      token_mask: bool [T] (a list is converted); False tokens are not routed (output 0,
        not counted, and their values, NaN or inf included, reach no other output and no
        gradient).
      routing: precomputed top-k (ids, weights) instead of the router: a :class:`Routing`
        or a plain ``(ids, weights)`` tuple, in that order. Ids outside
        [0, num_experts) of tokens the mask keeps raise where the ids are concrete; under
        jit they cannot, so those tokens' outputs are NaN instead of another expert's
        result. Likewise a token routed to an expert that ``weights.slot_to_expert`` gives
        no slot. Such a pair is computed nowhere and counted in no :class:`MoEStats`
        field. Masked-out tokens' ids are never read (padding rows may hold -1).

    Returns:
      ``(y [T, H] in x.dtype, MoEStats)``.
    """
    if not isinstance(spec, MoESpec):
        raise TypeError(f"spec: got {type(spec).__name__}; allowed: a MoESpec")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config: got {type(config).__name__}; allowed: a MoEConfig (e.g. "
                        "load_moe_config(path or dict), or MoEConfig())")
    x = _as_array("x", x, "a float [tokens, hidden_size] array")
    token_mask, routing = _as_mask(token_mask), _as_routing(routing)
    _check_inputs(x, token_mask, routing, spec)
    _check_expert_kernel(config.expert_kernel, spec)
    wide = config.backend == "WIDEEP"
    axis = config.ep_axis
    if mesh is None:
        if wide:
            raise ValueError(f"backend='WIDEEP' needs a mesh with an axis named {axis!r}; got mesh=None; "
                             "allowed: such a mesh, or backend CUTLASS")
        num_ranks = 1
    else:
        if axis not in mesh.axis_names:
            raise ValueError(f"ep_axis={axis!r} is not an axis of the mesh; allowed: {mesh.axis_names}")
        num_ranks = mesh.shape[axis]
    _check_weights(weights, spec, num_ranks)
    ids_checked = _check_routing_ids(routing, token_mask, spec.num_experts)
    # What the value checks above could not see (traced arrays) is guarded on the device.
    guard = not _on_host(weights.slot_to_expert) or not ids_checked
    inputs = (x, weights, token_mask, routing)
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(inputs)):
        # Called eagerly (a notebook, a plain script): one cached program per static setup,
        # not a fresh trace and two compiles per call.
        # $WIDEEP_ALLTOALL is read when the program is traced: part of the key, so that
        # setting it between calls takes effect for every input shape alike.
        env = os.environ.get(ALLTOALL_ENV_VAR, "") if config.backend == "WIDEEP" else ""
        return _eager_forward(spec, forward_config(config), mesh, guard, env)(*inputs)
    return _forward(*inputs, spec=spec, config=config, mesh=mesh, guard=guard)


def forward_config(config: MoEConfig) -> MoEConfig:
    """``config`` less ``load_balancer.initial_global_assignments``, which no forward pass
    reads (the placement arrives as ``slot_to_expert``): layers built from different
    placement files then share one cache key and compiled program. Not re-validated
    (it was), so no ConfigWarning is given twice."""
    lb = config.load_balancer
    if lb is None or lb.initial_global_assignments is None:
        return config
    lb, config = copy.copy(lb), copy.copy(config)
    object.__setattr__(lb, "initial_global_assignments", None)
    object.__setattr__(config, "load_balancer", lb)
    return config


@functools.cache
def _eager_forward(spec: MoESpec, config: MoEConfig, mesh: Mesh | None, guard: bool, alltoall_env: str):
    del alltoall_env  # a cache key only (the trace reads the variable)
    return jax.jit(functools.partial(_forward, spec=spec, config=config, mesh=mesh, guard=guard))


def _forward(x, weights: MoEWeights, token_mask, routing, *, spec: MoESpec, config: MoEConfig,
             mesh: Mesh | None, guard: bool) -> tuple[jax.Array, MoEStats]:
    wide = config.backend == "WIDEEP"
    axis = config.ep_axis
    num_ranks = 1 if mesh is None else mesh.shape[axis]
    num_tokens = x.shape[0]
    # Zero tokens run as one masked-out row per rank: the same program, empty output, zero counts.
    pad = -num_tokens % num_ranks if num_tokens else num_ranks
    mask = jnp.ones((num_tokens,), bool) if token_mask is None else token_mask.astype(bool)
    args = {
        "x": _pad_rows(x, pad),
        "mask": _pad_rows(mask, pad, False),
        "weights": weights,
    }
    if routing is not None:
        args["routing"] = Routing(_pad_rows(routing.ids.astype(jnp.int32), pad),
                                  _pad_rows(routing.weights.astype(jnp.float32), pad))

    body = _Body(spec, config, num_ranks, axis if mesh is not None else None, wide, mesh, guard=guard)
    if mesh is None:
        y, stats = body(args)
    else:
        tok, rep = P(axis), P()
        slot_spec = P(axis)  # both backends shard the slots over the EP axis
        w = weights
        weight_specs = MoEWeights(
            router=rep, w_gate_up=slot_spec, w_down=slot_spec, slot_to_expert=rep,
            correction_bias=None if w.correction_bias is None else rep,
            shared_gate_up=None if w.shared_gate_up is None else rep,
            shared_down=None if w.shared_down is None else rep,
        )
        in_specs = {"x": tok, "mask": tok, "weights": weight_specs}
        if routing is not None:
            in_specs["routing"] = Routing(tok, tok)
        args = jax.tree.map(lambda a, s: constrain(a, mesh, s), args, in_specs)
        y, stats = jax.shard_map(
            body, mesh=mesh, in_specs=(in_specs,),
            out_specs=(tok, MoEStats(rep, rep, rep, rep)),
            # The stats are made replicated by psum/all_gather; loops inside the
            # kernels carry per-device state, which the vma checker cannot see.
            check_vma=False,
        )(args)
        if pad:
            # An uneven token count cannot stay sharded: hand it back replicated, like x came.
            y = constrain(y, mesh, P())
    return y[:num_tokens], stats


class _Body:
    """The per-device program (inside shard_map when there is a mesh)."""

    def __init__(self, spec: MoESpec, config: MoEConfig, num_ranks: int, axis: str | None, wide: bool,
                 mesh: Mesh | None, *, guard: bool = False):
        self.spec, self.config, self.num_ranks, self.axis, self.wide = spec, config, num_ranks, axis, wide
        self.guard = guard
        self.backend = (get_alltoall_backend(config.alltoall_backend, mesh=mesh, axis=config.ep_axis)
                        if wide else None)
        self.kernel = None if config.expert_kernel == "auto" else config.expert_kernel

    def __call__(self, args):
        spec, w = self.spec, args["weights"]
        x, mask = args["x"], args["mask"]
        # A masked-out row is never routed: zeroed (with its routing weights), whatever it
        # holds (NaN, inf) reaches no gradient, the shared experts' weights' included.
        x = jnp.where(mask[:, None], x, jnp.zeros((), x.dtype))
        rank = jax.lax.axis_index(self.axis) if self.axis else 0
        routing = args.get("routing")
        if routing is not None:
            routing = Routing(routing.ids, jnp.where(mask[:, None], routing.weights, 0.0))
        else:
            logits = jnp.dot(x.astype(jnp.float32), w.router.astype(jnp.float32),
                             preferred_element_type=jnp.float32)
            routing = route(logits, spec.top_k, spec.router, correction_bias=w.correction_bias)
        table = replica_table(w.slot_to_expert, spec.num_experts)
        # local_first: a pair uses a replica on its own rank when there is one.
        local_rank = rank if (self.wide and self.config.replica_selection == "local_first") else None
        w_gate_up = w.w_gate_up.astype(spec.dtype)
        w_down = w.w_down.astype(spec.dtype)
        x_c = x.astype(spec.dtype)

        def chunk(operands):
            xc, mc, ids, rw = operands
            # A pair whose id is outside [0, E), or whose expert has no slot (possible only where
            # the checks could not see the values, under jit), gets slot -1: it is computed
            # nowhere and counted in no statistic; its token comes out NaN below.
            slots = choose_slots(ids, mc, table, rank_offset=rank, local_rank=local_rank,
                                 num_ranks=self.num_ranks)
            counted = mc[:, None] & (slots >= 0)
            counts = jnp.zeros((spec.num_experts + 1,), jnp.int32).at[
                jnp.where(counted, ids, spec.num_experts)].add(1)[:-1]
            if self.wide:
                y, group_sizes, received = self._wide(xc, mc, slots, rw, w_gate_up, w_down)
            elif self.axis is not None:
                y, group_sizes, received = self._gathered(xc, mc, slots, rw, w_gate_up, w_down)
            else:
                out = routed_experts(xc, slots, rw, mc, w_gate_up, w_down, gmm_implementation=self.kernel,
                                     weight_on_input=spec.apply_router_weight_on_input)
                y, group_sizes = out.partial.astype(jnp.float32), out.group_sizes
                received = counted.any(axis=1).sum()
            if self.guard:
                # A token with a pair that has no slot: NaN, not a silently partial sum. (Where
                # the values were checked on the host no pair lacks a slot: no select then.)
                y = jnp.where((mc[:, None] & (slots < 0)).any(axis=1)[:, None], jnp.nan, y)
            return y, (counts, group_sizes, received.astype(jnp.int32))

        operands = (x_c, mask, routing.ids, routing.weights)
        rows = rows_per_chunk(x.shape[0], self.num_ranks, self.config.max_num_tokens)
        y, (counts, group_sizes, received) = _chunked(chunk, operands, rows)
        if w.shared_gate_up is not None:
            y = y + shared_experts(x_c, w.shared_gate_up, w.shared_down)
        y = jnp.where(mask[:, None], y, 0.0).astype(x.dtype)
        return y, self._stats(counts, group_sizes, received)

    def _wide(self, x, mask, slots, rw, w_gate_up, w_down):
        num_ranks, axis = self.num_ranks, self.axis
        local_slots = w_gate_up.shape[0]
        plan = make_dispatch_plan(slots, rw, mask, num_ranks=num_ranks, slots_per_rank=local_slots)
        recv = self.backend.dispatch(x, plan, axis_name=axis)
        rows = num_ranks * plan.capacity
        out = routed_experts(
            recv.x.reshape(rows, -1), recv.slot.reshape(rows, -1), recv.weight.reshape(rows, -1),
            recv.valid_rows().reshape(rows), w_gate_up, w_down, gmm_implementation=self.kernel,
            weight_on_input=self.spec.apply_router_weight_on_input,
        )
        y = self.backend.combine(out.partial.reshape(num_ranks, plan.capacity, -1), plan, recv.count,
                                axis_name=axis)
        return y, out.group_sizes, recv.count.sum()

    def _gathered(self, x, mask, slots, rw, w_gate_up, w_down):
        """TensorRT-LLM's EP without all-to-all (its CUTLASS backend with attention DP):
        every rank gathers the EP group's tokens, runs the pairs routed to its own
        slots, and the partial sums go back to their tokens' ranks by reduce-scatter."""
        axis, local_slots = self.axis, w_gate_up.shape[0]
        gather = lambda a: jax.lax.all_gather(a, axis, tiled=True)
        xs, mask_all, slots_all, rw_all = gather(x), gather(mask), gather(slots), gather(rw)
        local = slots_all - jax.lax.axis_index(axis) * local_slots
        mine = (local >= 0) & (local < local_slots) & mask_all[:, None]
        rows = mine.any(axis=1)
        out = routed_experts(xs, jnp.where(mine, local, -1), rw_all, rows, w_gate_up, w_down,
                             gmm_implementation=self.kernel, weight_on_input=self.spec.apply_router_weight_on_input)
        # Summed in float32: a token's pairs on different ranks meet only here.
        y = jax.lax.psum_scatter(out.partial.astype(jnp.float32), axis, scatter_dimension=0, tiled=True)
        return y, out.group_sizes, rows.sum()

    def _stats(self, counts, group_sizes, received) -> MoEStats:
        if self.axis is None:
            return MoEStats(counts, group_sizes, received[None], counts[None])
        rank_counts = jax.lax.all_gather(counts, self.axis)
        counts = rank_counts.sum(axis=0)
        slot_counts = jax.lax.all_gather(group_sizes, self.axis, tiled=True)  # each rank's own slots
        rank_tokens = jax.lax.all_gather(received, self.axis)
        return MoEStats(counts, slot_counts, rank_tokens, rank_counts)


def rows_per_chunk(local_tokens: int, num_ranks: int, max_num_tokens: int | None) -> int | None:
    """Each rank's rows per MoE chunk, as TensorRT-LLM counts ``max_num_tokens``.

    It bounds the tokens of the whole EP group per chunk (attention data parallel:
    ``sum(all_rank_num_tokens)``), not one rank's. The group's ``R * local_tokens``
    tokens go in ``n = ceil(R * local_tokens / max_num_tokens)`` chunks, every rank's
    split evenly (at most ``max_num_tokens // R`` rows, but at least one). None: no
    chunking (also for zero tokens).
    """
    if max_num_tokens is None or local_tokens == 0:
        return None
    num_chunks = -(-local_tokens * num_ranks // max_num_tokens)
    return max(1, min(-(-local_tokens // num_chunks), max_num_tokens // num_ranks))


def _chunked(fn, operands, chunk_size: int | None):
    """Runs ``fn`` over row chunks of at most ``chunk_size`` inside one program.

    ``fn`` returns (rows [n, ...], stats pytree); stats are summed over chunks.
    """
    num_rows = operands[0].shape[0]
    if chunk_size is None or num_rows <= chunk_size:
        return fn(operands)
    num_chunks = -(-num_rows // chunk_size)
    pad = num_chunks * chunk_size - num_rows
    padded = [_pad_rows(a, pad, False if a.dtype == bool else 0) for a in operands]
    stacked = [a.reshape(num_chunks, chunk_size, *a.shape[1:]) for a in padded]
    ys, stats = jax.lax.map(fn, tuple(stacked))
    y = ys.reshape(num_chunks * chunk_size, *ys.shape[2:])[:num_rows]
    return y, jax.tree.map(lambda s: s.sum(axis=0), stats)
