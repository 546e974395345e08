"""Moving expert weights into their new slots after a placement change.

Slot weights are pytrees whose leaves are ``[num_slots, ...]`` arrays sharded
over the EP axis (rank ``r`` holds slots ``[r*S/R, (r+1)*S/R)``). Only slots
whose expert changed are written; every other slot keeps its buffer untouched.
Two sources for the moved weights:

* ``host``: a master copy of every expert in host memory (memory kind
  ``pinned_host`` where the backend has it), by default sharded over the EP axis
  by expert: the owner of a changed slot's expert copies it host -> device and,
  if the slot is on another rank, sends it by collective permute. With a
  replicated master every device copies from its own full host copy. Either
  way only the changed slots' bytes move.
* ``collective``: no host copy. A changed slot takes its expert from a slot that
  held it under the old placement: from its own rank if there is one, else from
  the nearest rank ``r - d`` through a collective permute by ``d``. Per shift the
  loop runs as many rounds as the busiest receiver needs (the same count on
  every device, since placements are replicated), so it never deadlocks.

Both are loops whose trip counts are data, so placements never recompile.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wideep_jax.config import experts_without_slot

Pytree = Any


def host_memory_kind(mesh: Mesh) -> str | None:
    """``pinned_host`` if the mesh's devices have it, else None (default memory)."""
    kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


def make_master_copy(slot_weights: Pytree, slot_to_expert: jax.Array | np.ndarray, num_experts: int,
                     mesh: Mesh, *, axis: str = "ep", replicated: bool = False,
                     scratch_bytes: int = 1 << 30) -> Pytree:
    """Builds the host master copy of one layer's experts from its slot weights.

    Each expert comes from a slot that holds it, the nearest rank first, by
    collective permutes on the devices, so this works when the EP group spans
    processes (hosts). The experts pass through device scratch in chunks of at
    most ``scratch_bytes`` per device (at least one expert), then through host RAM
    into ``pinned_host`` memory where the backend has it. Default: sharded over
    ``axis`` by expert (rank ``q`` holds experts ``[q*E_r, (q+1)*E_r)``, leaves
    ``[ceil(E/R)*R, ...]``, zero-padded), so the EP group holds one copy in all.
    ``replicated=True`` gives every device its own full copy (``[E, ...]``): each
    reads its moved slots from its own host memory, no NVLink hop, at R times the
    host memory. For real checkpoints, load the experts straight into this layout.
    """
    placement = np.asarray(slot_to_expert)  # replicated: readable in every process
    missing = experts_without_slot(placement, num_experts)
    if missing:
        raise ValueError(f"slot_to_expert gives no slot to experts {missing}; allowed: every expert "
                         f"in [0, {num_experts}) in at least one slot")
    ranks = mesh.shape[axis]
    if placement.shape[0] % ranks:
        raise ValueError(f"slot_to_expert has {placement.shape[0]} slots; allowed: a multiple of the "
                         f"{axis!r} axis size {ranks}")
    leaves, treedef = jax.tree.flatten(slot_weights)
    per_rank = -(-num_experts // ranks)
    ids = np.arange(per_rank * ranks, dtype=np.int32)
    ids[ids >= num_experts] = -1  # padding rows stay zero
    # Rows each rank keeps: its shard of the experts, or all of them.
    wanted = np.tile(ids[:num_experts], (ranks, 1)) if replicated else ids.reshape(ranks, per_rank)
    expert_bytes = sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in leaves)
    chunk = int(min(wanted.shape[1], max(1, scratch_bytes // max(expert_bytes, 1))))
    gather = _expert_gather(mesh, axis)
    replicated_spec = NamedSharding(mesh, P())
    placed = jax.device_put(placement.astype(np.int32), replicated_spec)
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    # Host RAM per device and leaf, filled chunk by chunk in place (no concatenation
    # copy). Replicated: every device holds the same rows, so a process keeps one
    # host copy (its first device's) and hands it to all its devices.
    readers = devices[:1] if replicated else devices
    host = {d: [np.empty((wanted.shape[1], *leaf.shape[1:]), leaf.dtype) for leaf in leaves] for d in readers}
    for begin in range(0, wanted.shape[1], chunk):
        part = np.full((ranks, chunk), -1, np.int32)
        part[:, :wanted.shape[1] - begin] = wanted[:, begin:begin + chunk]
        rows = gather(tuple(leaves), placed, jax.device_put(part.reshape(-1), replicated_spec))
        shards = [(i, s) for i, leaf in enumerate(rows) for s in leaf.addressable_shards if s.device in host]
        for _, shard in shards:  # every device's transfer in flight before the first wait
            shard.data.copy_to_host_async()
        for i, shard in shards:
            rows_here = host[shard.device][i][begin:begin + chunk]
            rows_here[...] = np.asarray(shard.data)[:len(rows_here)]
        del rows, shards
    kind = host_memory_kind(mesh)
    sharding = NamedSharding(mesh, P() if replicated else P(axis), memory_kind=kind)
    out = []
    for i, leaf in enumerate(leaves):
        shape = (wanted.shape[1] * (1 if replicated else ranks), *leaf.shape[1:])
        arrays = [jax.device_put(host[d if d in host else readers[0]][i],
                                 jax.sharding.make_single_device_sharding(d, memory_kind=kind)) for d in devices]
        out.append(jax.make_array_from_single_device_arrays(shape, sharding, arrays))
        for d in host:  # let host RAM go leaf by leaf
            host[d][i] = None
    return jax.tree.unflatten(treedef, out)


@functools.cache
def _expert_gather(mesh: Mesh, axis: str):
    """Jitted: per rank ``r``, the weights of experts ``targets[r*n:(r+1)*n]``
    (int32, replicated; -1 = a zero row), taken from the slots of ``placement``."""
    ranks = mesh.shape[axis]

    def body(local_weights, placement, targets):
        n = targets.shape[0] // ranks
        out = jax.tree.map(lambda w: jnp.zeros((n, *w.shape[1:]), w.dtype), local_weights)
        before = jnp.where(targets < 0, targets, -2)  # every real row counts as changed
        return _fill_by_permutes(out, lambda i: _rows(local_weights, i, to_device=False),
                                 placement.reshape(ranks, -1), before, targets, axis_name=axis, num_ranks=ranks)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(), P()), out_specs=P(axis),
                                 check_vma=False))


def master_is_replicated(master: Pytree) -> bool:
    """True for a :func:`make_master_copy` ``replicated=True`` copy. Read from the
    partition spec: on one EP rank a sharded copy is also fully replicated, yet its
    spec (which shard_map checks) still names the axis."""
    def replicated(leaf) -> bool:
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            return all(entry is None for entry in sharding.spec)
        return sharding.is_fully_replicated
    return all(replicated(leaf) for leaf in jax.tree.leaves(master))


def _changed_order(old: jax.Array, new: jax.Array):
    """Indices of changed local slots first, and how many there are."""
    changed = old != new
    return jnp.argsort(~changed, stable=True).astype(jnp.int32), changed.sum().astype(jnp.int32)


def reshard_from_host(local_weights: Pytree, old_global: jax.Array, new_global: jax.Array,
                      master: Pytree, *, axis_name: str, num_ranks: int, to_device: bool) -> Pytree:
    """Per device: copies ``master[new[j]]`` into every local slot ``j`` that changed.

    Args:
      local_weights: this device's slots, leaves ``[S_r, ...]``.
      old_global, new_global: int32 [S] placements before/after (replicated).
      master: this device's full copy, leaves ``[E, ...]``, in host memory (or device
        memory if ``to_device`` is False).
      to_device: move each read row to device memory (master is in host memory).
    """
    per_rank = new_global.shape[0] // num_ranks
    start = jax.lax.axis_index(axis_name) * per_rank
    old = jax.lax.dynamic_slice_in_dim(old_global, start, per_rank)
    new = jax.lax.dynamic_slice_in_dim(new_global, start, per_rank)
    order, num_changed = _changed_order(old, new)

    def copy_one(k, weights):
        slot = order[k]
        expert = new[slot]

        def put(w, m):
            row = jax.lax.dynamic_index_in_dim(m, expert, keepdims=True)
            if to_device:
                row = jax.device_put(row, jax.memory.Space.Device)
            return jax.lax.dynamic_update_index_in_dim(w, row.astype(w.dtype), slot, 0)

        return jax.tree.map(put, weights, master)

    return jax.lax.fori_loop(0, num_changed, copy_one, local_weights)


def _plan(holders: jax.Array, new_global: jax.Array, old_global: jax.Array, rank, num_ranks: int):
    """Where each of ``rank``'s slots gets its new expert.

    ``holders[q]`` lists the experts source rank ``q`` can send (its old slots, or
    its shard of the master copy). Returns, per local slot, the shift ``d`` to
    receive from (rank ``rank - d``; 0 = itself; -1 = slot unchanged) and the
    index of the expert in the source's ``holders`` row.
    """
    per_rank = new_global.shape[0] // num_ranks
    new_local = jax.lax.dynamic_slice_in_dim(new_global, rank * per_rank, per_rank)
    old_local = jax.lax.dynamic_slice_in_dim(old_global, rank * per_rank, per_rank)
    source_ranks = (rank - jnp.arange(num_ranks, dtype=jnp.int32)) % num_ranks
    match = holders[source_ranks][None, :, :] == new_local[:, None, None]  # [S_r, shift, index]
    shift = jnp.argmax(match.any(axis=2), axis=1).astype(jnp.int32)  # nearest shift that has it
    index = jnp.argmax(match[jnp.arange(per_rank), shift], axis=1).astype(jnp.int32)
    return jnp.where(new_local != old_local, shift, -1), index


def _fill_by_permutes(out: Pytree, read, holders: jax.Array, old_global: jax.Array, new_global: jax.Array,
                      *, axis_name: str, num_ranks: int) -> Pytree:
    """Writes every changed local slot with ``read(index)`` of its source rank,
    by shift: local reads for shift 0, a collective permute by ``d`` otherwise.

    Placements are replicated, so every device computes every device's plan and
    all run the same number of rounds per shift (the busiest receiver's count).
    """
    rank = jax.lax.axis_index(axis_name)
    plans = jax.vmap(lambda r: _plan(holders, new_global, old_global, r, num_ranks))
    all_shift, all_index = plans(jnp.arange(num_ranks, dtype=jnp.int32))
    shift = all_shift[rank]
    for d in range(num_ranks):
        mine = shift == d  # receiver: my slots that take shift d, in slot order
        recv_order = jnp.argsort(~mine, stable=True).astype(jnp.int32)
        recv_count = mine.sum()
        dest = (rank + d) % num_ranks  # sender: rank + d takes these from me
        send_index = all_index[dest][jnp.argsort(~(all_shift[dest] == d), stable=True)]
        rounds = (all_shift == d).sum(axis=1).max()

        def one_round(k, out, d=d, recv_order=recv_order, recv_count=recv_count, send_index=send_index):
            payload = read(send_index[k])
            if d:
                perm = [(r, (r + d) % num_ranks) for r in range(num_ranks)]
                payload = jax.lax.ppermute(payload, axis_name, perm)
            slot = recv_order[k]

            def write(o, p):
                # Past my own count the round is someone else's: rewrite the slot
                # with itself (a one-slot select, not a whole-buffer one).
                keep = jax.lax.dynamic_index_in_dim(o, slot, keepdims=True)
                return jax.lax.dynamic_update_index_in_dim(o, jnp.where(k < recv_count, p, keep), slot, 0)

            return jax.tree.map(write, out, payload)

        out = jax.lax.fori_loop(0, rounds, one_round, out)
    return out


def _rows(tree: Pytree, index, *, to_device: bool) -> Pytree:
    def row(a):
        r = jax.lax.dynamic_index_in_dim(a, index, keepdims=True)
        return jax.device_put(r, jax.memory.Space.Device) if to_device else r
    return jax.tree.map(row, tree)


def reshard_collective(local_weights: Pytree, old_global: jax.Array, new_global: jax.Array,
                       *, axis_name: str, num_ranks: int) -> Pytree:
    """Per device (inside shard_map): fills changed local slots from slots that held
    the expert under ``old_global`` (int32 [S], replicated), nearest rank first.

    Reads come from the old weights, so a layer being moved needs one extra copy
    of its local slots for the duration of its move.
    """
    holders = old_global.reshape(num_ranks, -1)
    source = local_weights
    return _fill_by_permutes(local_weights, lambda i: _rows(source, i, to_device=False), holders,
                             old_global, new_global, axis_name=axis_name, num_ranks=num_ranks)


def reshard_from_sharded_host(local_weights: Pytree, local_master: Pytree, old_global: jax.Array,
                              new_global: jax.Array, *, num_experts: int, axis_name: str, num_ranks: int,
                              to_device: bool) -> Pytree:
    """Per device: changed slots get their expert from the master shard that owns it
    (rank ``q`` holds experts ``[q*E_r, (q+1)*E_r)`` in host memory), copied to the
    owner's device and, if the owner is another rank, sent by collective permute."""
    per_rank = jax.tree.leaves(local_master)[0].shape[0]
    ids = jnp.arange(num_ranks * per_rank, dtype=jnp.int32)
    holders = jnp.where(ids < num_experts, ids, -1).reshape(num_ranks, per_rank)
    return _fill_by_permutes(local_weights, lambda i: _rows(local_master, i, to_device=to_device), holders,
                             old_global, new_global, axis_name=axis_name, num_ranks=num_ranks)
