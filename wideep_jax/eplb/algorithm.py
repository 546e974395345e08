"""EPLB: expert-parallel load balancing, jit-compiled and vectorised over layers.

Given a per-expert load ``[L, E]`` it returns ``slot_to_expert: int32 [L, S]``;
rank ``r`` of ``R = ep_size`` owns the contiguous slots ``[r*S/R, (r+1)*S/R)``.
Every layer is solved independently (``vmap``); only the sizes are static, so new
loads or a new current placement never recompile.

Steps, per layer (``N = num_nodes`` nodes of ``G = R/N`` ranks, ``k = S/R`` slots
per rank):

1. Nodes (only if ``N > 1``, as DeepSeek's hierarchical EPLB). Experts, heaviest
   first (ties: lower id), go one by one to the least-loaded node (ties: lower node)
   that has fewer than ``E/N`` experts. An expert and all its replicas then live on
   that node, so its tokens never cross nodes to reach a replica; each node gets
   ``S/N`` slots. For ``N = 1`` the single node is everything.
2. Replication, per node: each expert starts with one replica; each extra slot goes
   to the expert with the largest load per replica (``load / count``; ties: lower
   id), never beyond ``G`` replicas because two replicas of one expert never share
   a rank. Closed form: the greedy takes the largest ``S/N - E/N`` of the values
   ``load_e / j`` (``j = 1..G-1``), found with one ``top_k``.
3. Packing, per node: replicas, heaviest per-replica load first (ties: lower
   expert id), each to the least-loaded rank (ties: lower rank) that has a free
   slot and no replica of that expert yet. If no rank qualifies (every rank with a
   free slot already holds the expert) a repair keeps the placement valid: the
   lightest rank ``u`` without the expert is full, so its lightest replica that the
   lightest free rank ``f`` lacks moves to ``f`` and the expert takes its slot.
   Steps 2-3 alone are :func:`greedy_placement`.
4. Refinement: while it lowers the maximum, swap one replica of the most-loaded
   rank with one replica of another rank of its node (the pair minimising the
   larger of the two new loads; ties: lowest index). The maximum never rises, so
   the result is never worse than the greedy placement.
5. Migration (only if ``current`` is given). Ranks are interchangeable for the
   load, so the packed rank contents ("bins") are matched to physical ranks
   greedily by overlap with ``current`` (most shared experts first; ties: lowest
   bin, then rank). With ``N > 1`` whole nodes are matched first, then ranks inside
   each node. Then swaps of two replicas between two ranks of one node keep more
   experts where they are, as long as both ranks stay at most ``(1 + tolerance) *``
   the balanced maximum. They go in rounds: each rank pair's best swap (largest
   gain; ties: lowest slot pair), then pairs by gain (ties: lowest pair), each rank
   at most once per round, until a round finds none. Finally, an expert that stays
   on its rank keeps its slot; the others fill the freed slots in bin order.

Float arithmetic (float32) and every tie-break are fixed, so
:mod:`wideep_jax.eplb.algorithm_reference` (plain NumPy loops) gives identical output.
Loads must be finite; negative and NaN loads count as zero.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["compute_placement", "greedy_placement", "imbalance", "rank_loads"]

_F32 = jnp.float32
_I32 = jnp.int32


def _check(load_shape: tuple[int, ...], num_slots: int, ep_size: int, num_nodes: int,
           current_shape: tuple[int, ...] | None, tolerance: float) -> None:
    """Static argument checks; each error names the argument, its value and what is allowed."""
    if len(load_shape) not in (1, 2) or load_shape[-1] < 1:
        raise ValueError(f"load: got shape {load_shape}; allowed: [E] or [L, E] with E >= 1")
    num_experts = load_shape[-1]
    for name, value in (("num_slots", num_slots), ("ep_size", ep_size), ("num_nodes", num_nodes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: got {value!r}; allowed: a positive int")
    if num_slots < num_experts:
        raise ValueError(f"num_slots: got {num_slots}; allowed: >= num_experts = {num_experts}")
    if num_slots % ep_size:
        raise ValueError(f"num_slots: got {num_slots}; allowed: a multiple of ep_size = {ep_size}")
    if ep_size % num_nodes:
        raise ValueError(f"num_nodes: got {num_nodes}; allowed: a divisor of ep_size = {ep_size}")
    if num_experts % num_nodes:
        raise ValueError(f"num_nodes: got {num_nodes}; allowed: a divisor of num_experts = "
                         f"{num_experts} (each node holds E/num_nodes experts)")
    ranks_per_node = ep_size // num_nodes
    if num_slots > num_experts * ranks_per_node:
        raise ValueError(
            f"num_slots: got {num_slots}; allowed: <= num_experts * ranks per node = "
            f"{num_experts} * {ranks_per_node} = {num_experts * ranks_per_node} (an expert has at "
            "most one replica per rank, and with num_nodes > 1 all its replicas stay in one node)")
    if current_shape is not None and current_shape != (*load_shape[:-1], num_slots):
        raise ValueError(f"current: got shape {current_shape}; allowed: "
                         f"{(*load_shape[:-1], num_slots)} (load's leading shape + [num_slots])")
    if not tolerance >= 0:
        raise ValueError(f"tolerance: got {tolerance!r}; allowed: a float >= 0")


def _masked_argmin(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.argmin(jnp.where(mask, values, jnp.inf)).astype(_I32)


def _partition_nodes(load: jax.Array, num_nodes: int) -> jax.Array:
    """Step 1: int32 [N, E/N] expert ids of each node, ascending."""
    per_node = load.shape[0] // num_nodes
    order = jnp.argsort(-load, stable=True)

    def body(i, state):
        node_load, node_count, node_of = state
        e = order[i]
        n = _masked_argmin(node_load, node_count < per_node)
        return node_load.at[n].add(load[e]), node_count.at[n].add(1), node_of.at[e].set(n)

    init = (jnp.zeros(num_nodes, _F32), jnp.zeros(num_nodes, _I32), jnp.zeros(load.shape, _I32))
    _, _, node_of = lax.fori_loop(0, load.shape[0], body, init)
    return jnp.argsort(node_of, stable=True).astype(_I32).reshape(num_nodes, per_node)


def _replicate(load: jax.Array, num_slots: int, cap: int) -> jax.Array:
    """Step 2: int32 [E] replica counts (sum ``num_slots``, each in ``[1, cap]``)."""
    num_experts = load.shape[0]
    extra = num_slots - num_experts
    if extra == 0:
        return jnp.ones(num_experts, _I32)
    # Item (e, j) is "give e its (j+1)-th replica", worth load_e / j. Per expert
    # these strictly decrease, so the greedy takes the top `extra` items in
    # (value desc, e asc) order; top_k breaks ties by the lower flat index = lower e.
    depth = min(cap - 1, extra)
    values = load[:, None] / jnp.arange(1, depth + 1, dtype=_F32)[None, :]
    _, chosen = lax.top_k(values.reshape(-1), extra)
    return jnp.ones(num_experts, _I32).at[chosen // depth].add(1)


def _pack(w: jax.Array, count: jax.Array, num_ranks: int, per_rank: int):
    """Step 3: (slots int32 [R, k] of expert ids, rank load float32 [R])."""
    order = jnp.argsort(-w, stable=True)
    ends = jnp.cumsum(count[order])  # replica i belongs to the first expert whose end > i
    replicas = order[(ends[None, :] <= jnp.arange(num_ranks * per_rank)[:, None]).sum(1)]
    rank_ids = jnp.arange(num_ranks, dtype=_I32)
    cols = jnp.arange(per_rank, dtype=_I32)

    # Updates are one-hot selects, not scatters: the arrays are tiny, and under
    # vmap selects compile and run faster than batched scatters.
    def body(i, state):
        slots, fill, load = state
        e = replicas[i]
        holds = (slots == e).any(1)
        free = fill < per_rank
        ok = (free & ~holds).any()
        b = _masked_argmin(load, free & ~holds)
        # Repair operands (used only when not ok): see the module docstring.
        bf = _masked_argmin(load, free)
        bu = _masked_argmin(load, ~holds)
        row_u, row_f = slots[bu], slots[bf]
        lacks = ~(row_u[:, None] == row_f[None, :]).any(1)
        j = _masked_argmin(w[jnp.maximum(row_u, 0)], lacks)
        x = row_u[j]
        wx = w[jnp.maximum(x, 0)]
        at_f = ~ok & (rank_ids == bf)
        slots = jnp.where(at_f[:, None] & (cols == fill[bf])[None, :], x, slots)
        fill = fill + at_f
        load = jnp.where(at_f, load + wx, load)
        target = jnp.where(ok, b, bu)
        col = jnp.where(ok, fill[b], j)
        at_t = rank_ids == target
        slots = jnp.where(at_t[:, None] & (cols == col)[None, :], e, slots)
        fill = fill + (at_t & ok)
        load = jnp.where(at_t, jnp.where(ok, load + w[e], (load - wx) + w[e]), load)
        return slots, fill, load

    init = (jnp.full((num_ranks, per_rank), -1, _I32), jnp.zeros(num_ranks, _I32),
            jnp.zeros(num_ranks, _F32))
    slots, _, load = lax.fori_loop(0, num_ranks * per_rank, body, init)
    return slots, load


def _refine(slots: jax.Array, load: jax.Array, w: jax.Array, max_iter: int):
    """Step 4: swaps that lower the most-loaded rank; returns (slots, load)."""
    num_ranks, per_rank = slots.shape
    size = num_ranks * per_rank
    rank_of = jnp.arange(size, dtype=_I32) // per_rank
    ranks, cols = jnp.arange(num_ranks, dtype=_I32), jnp.arange(per_rank, dtype=_I32)

    def body(state):
        slots, load, _, it = state
        a = jnp.argmax(load).astype(_I32)
        row, x = slots[a], slots.reshape(-1)
        t_on_a = (x[:, None] == row[None, :]).any(1)  # [S]: slot t's expert already on a
        i_on = jnp.repeat((row[:, None, None] == slots[None]).any(2), per_rank, axis=1)  # [k, S]
        wi, wt = w[row], w[x]
        new_a = (load[a] - wi)[:, None] + wt[None, :]
        new_b = (load[rank_of] - wt)[None, :] + wi[:, None]
        worst = jnp.maximum(new_a, new_b)
        valid = (rank_of != a)[None, :] & ~t_on_a[None, :] & ~i_on & (worst < load[a])
        idx = jnp.argmin(jnp.where(valid, worst, jnp.inf).reshape(-1))
        found = valid.reshape(-1)[idx]
        i, t = idx // size, idx % size
        b, j = rank_of[t], t % per_rank
        xi, xt = row[i], x[t]
        at_a, at_b = found & (ranks == a), found & (ranks == b)
        slots = jnp.where(at_a[:, None] & (cols == i)[None, :], xt, slots)
        slots = jnp.where(at_b[:, None] & (cols == j)[None, :], xi, slots)
        load = jnp.where(at_a, new_a[i, t], jnp.where(at_b, new_b[i, t], load))
        return slots, load, found, it + 1

    state = (slots, load, jnp.array(True), jnp.array(0, _I32))
    slots, load, _, _ = lax.while_loop(lambda s: s[2] & (s[3] < max_iter), body, state)
    return slots, load


def _greedy_match(score: jax.Array, allowed: jax.Array) -> jax.Array:
    """int32 [n]: bin -> rank, repeatedly taking the best remaining allowed pair."""
    n = score.shape[0]

    def body(_, state):
        s, perm = state
        idx = jnp.argmax(s.reshape(-1))
        b, r = idx // n, idx % n
        return s.at[b, :].set(-2).at[:, r].set(-2), perm.at[b].set(r.astype(_I32))

    init = (jnp.where(allowed, score, -1).astype(_I32), jnp.zeros(n, _I32))
    return lax.fori_loop(0, n, body, init)[1]


def _migration_swaps(bins, load, w, cur_has, cap, rank_node, max_rounds: int):
    """Step 5 swaps, in rounds of rank-disjoint swaps: more experts kept, every load <= cap."""
    num_ranks, per_rank = bins.shape
    ranks = jnp.arange(num_ranks, dtype=_I32)
    pair_ok = (rank_node[:, None] == rank_node[None, :]) & (ranks[:, None] < ranks[None, :])

    def flip(a):  # a[r, r2, j] -> [r1, i, r2] = a[r2, r1, i]
        return a.transpose(1, 2, 0)

    def body(state):
        x, load, _, it = state
        flat = x.reshape(-1)
        was = cur_has[:, flat].reshape(num_ranks, num_ranks, per_rank)  # expert at (r2, j) was on r
        now = (x[:, :, None] == flat[None, None, :]).any(1)  # [r, t]: x_t on rank r
        now = now.reshape(num_ranks, num_ranks, per_rank)
        keep = cur_has[ranks[:, None], x].astype(_I32)
        # Pair axes [r1, i, r2, j]: swap x[r1, i] with x[r2, j].
        gain = (was[:, None].astype(_I32) + flip(was)[..., None].astype(_I32)
                - keep[:, :, None, None] - keep[None, None])
        blocked = now[:, None] | flip(now)[..., None]
        wx = w[x]
        rest = load[:, None] - wx
        new1 = rest[:, :, None, None] + wx[None, None]
        new2 = rest[None, None] + wx[:, :, None, None]
        valid = (pair_ok[:, None, :, None] & ~blocked & (new1 <= cap) & (new2 <= cap) & (gain > 0))
        score = jnp.where(valid, gain, 0).transpose(0, 2, 1, 3).reshape(num_ranks, num_ranks, -1)
        best, arg = score.max(-1), score.argmax(-1).astype(_I32)

        def pick(n, st):
            best, sel = st
            idx = jnp.argmax(best.reshape(-1))
            r1, r2 = idx // num_ranks, idx % num_ranks
            ok = best[r1, r2] > 0
            used = (ranks == r1) | (ranks == r2)
            best = jnp.where(used[:, None] | used[None, :], 0, best)
            entry = jnp.where(ok, jnp.stack([r1, r2]).astype(_I32), num_ranks)
            return best, jnp.where((jnp.arange(num_ranks // 2) == n)[:, None], entry, sel)

        sel = jnp.full((num_ranks // 2, 2), num_ranks, _I32)
        _, sel = lax.fori_loop(0, num_ranks // 2, pick, (best, sel))
        r1, r2 = sel[:, 0], sel[:, 1]
        ok = r1 < num_ranks
        c1, c2 = jnp.minimum(r1, num_ranks - 1), jnp.minimum(r2, num_ranks - 1)
        i, j = arg[c1, c2] // per_rank, arg[c1, c2] % per_rank
        x1, x2 = x[c1, i], x[c2, j]
        l1, l2 = new1[c1, i, c2, j], new2[c1, i, c2, j]
        x = x.at[r1, i].set(x2, mode="drop").at[r2, j].set(x1, mode="drop")
        load = load.at[r1].set(l1, mode="drop").at[r2].set(l2, mode="drop")
        return x, load, ok.any(), it + 1

    state = (bins, load, jnp.array(True), jnp.array(0, _I32))
    x, load, _, _ = lax.while_loop(lambda s: s[2] & (s[3] < max_rounds), body, state)
    return x, load


def _order_rank(b: jax.Array, c: jax.Array) -> jax.Array:
    """One rank's slots: experts of ``b`` already in ``c`` keep their slot, the rest fill in."""
    k = b.shape[0]
    pos = jnp.arange(k)
    earlier_dup = ((c[:, None] == c[None, :]) & (pos[None, :] < pos[:, None])).any(1)
    kept = (c[:, None] == b[None, :]).any(1) & ~earlier_dup
    b_new = ~(b[:, None] == c[None, :]).any(1)
    new_rank = jnp.cumsum(b_new) - 1
    free_rank = jnp.cumsum(~kept) - 1
    pick = b_new[None, :] & (new_rank[None, :] == free_rank[:, None])
    return jnp.where(kept, c, (pick * b[None, :]).sum(1)).astype(_I32)


def _migrate(bins, load, w, cur, tolerance, num_nodes: int):
    """Step 5: bins [R, k] -> slots [R, k] placed to keep as much of ``cur`` as possible."""
    num_ranks, per_rank = bins.shape
    experts = jnp.arange(w.shape[0], dtype=_I32)
    bin_has = (bins[:, :, None] == experts).any(1)
    cur_has = (cur[:, :, None] == experts).any(1)
    overlap = jnp.dot(bin_has.astype(_F32), cur_has.T.astype(_F32),
                      precision=lax.Precision.HIGHEST).astype(_I32)
    rank_node = jnp.arange(num_ranks, dtype=_I32) // (num_ranks // num_nodes)
    allowed = jnp.ones((num_ranks, num_ranks), bool)
    if num_nodes > 1:
        node_bins = bin_has.reshape(num_nodes, -1, w.shape[0]).sum(1)
        node_cur = cur_has.reshape(num_nodes, -1, w.shape[0]).sum(1)
        node_overlap = jnp.minimum(node_bins[:, None], node_cur[None, :]).sum(-1)
        node_perm = _greedy_match(node_overlap, jnp.ones((num_nodes, num_nodes), bool))
        allowed = rank_node[None, :] == node_perm[rank_node][:, None]
    perm = _greedy_match(overlap, allowed)
    holder = jnp.zeros(num_ranks, _I32).at[perm].set(jnp.arange(num_ranks, dtype=_I32))
    bins, load = bins[holder], load[holder]
    cap = jnp.max(load) * (jnp.asarray(1, _F32) + tolerance)
    bins, _ = _migration_swaps(bins, load, w, cur_has, cap, rank_node, num_ranks * per_rank)
    return jax.vmap(_order_rank)(bins, cur)


def _solve_layer(load, current, tolerance, *, num_slots: int, ep_size: int, num_nodes: int,
                 refine: bool) -> jax.Array:
    num_experts = load.shape[0]
    ranks_per_node, per_rank = ep_size // num_nodes, num_slots // ep_size
    load = jnp.where(load > 0, load, 0).astype(_F32)  # also turns -0.0 and NaN into +0.0
    if num_nodes > 1:
        ids = _partition_nodes(load, num_nodes)
    else:
        ids = jnp.arange(num_experts, dtype=_I32)[None]
    node_load = load[ids]
    count = jax.vmap(partial(_replicate, num_slots=num_slots // num_nodes, cap=ranks_per_node))(
        node_load)
    w = node_load / count.astype(_F32)
    slots, rload = jax.vmap(partial(_pack, num_ranks=ranks_per_node, per_rank=per_rank))(w, count)
    if refine:
        slots, rload = jax.vmap(partial(_refine, max_iter=num_slots // num_nodes))(slots, rload, w)
    bins = jax.vmap(lambda i, s: i[s])(ids, slots).reshape(ep_size, per_rank)
    if current is None:
        return bins.reshape(-1)
    w_global = jnp.zeros(num_experts, _F32).at[ids.reshape(-1)].set(w.reshape(-1))
    cur = current.astype(_I32).reshape(ep_size, per_rank)
    return _migrate(bins, rload.reshape(-1), w_global, cur, tolerance, num_nodes).reshape(-1)


@partial(jax.jit, static_argnames=("num_slots", "ep_size", "num_nodes", "refine"))
def _solve(load, current, tolerance, *, num_slots, ep_size, num_nodes, refine):
    fn = partial(_solve_layer, num_slots=num_slots, ep_size=ep_size, num_nodes=num_nodes,
                 refine=refine)
    if current is None:
        return jax.vmap(lambda l: fn(l, None, tolerance))(load)
    return jax.vmap(fn, in_axes=(0, 0, None))(load, current, tolerance)


def compute_placement(load, num_slots: int, ep_size: int, *, num_nodes: int = 1, current=None,
                      tolerance: float = 0.0) -> jax.Array:
    """Balanced placement ``int32 [L, num_slots]`` (``[num_slots]`` for a 1-D ``load``).

    Args:
      load: float [L, E] or [E], non-negative load per expert (e.g. token counts).
      num_slots: total slots S over the EP group (``E <= S <= E * ep_size / num_nodes``).
      ep_size: ranks R; rank r owns slots ``[r*S/R, (r+1)*S/R)``.
      num_nodes: nodes; > 1 keeps each expert's replicas inside one node.
      current: int [L, S] (or [S]) current placement; if given, ranks are relabelled
        and replicas swapped so that fewer slots change (see the module docstring).
      tolerance: relative slack of the maximum rank load allowed for keeping
        experts in place (only used with ``current``).
    """
    load = jnp.asarray(load)
    current_shape = None if current is None else tuple(jnp.shape(current))
    _check(tuple(load.shape), num_slots, ep_size, num_nodes, current_shape, tolerance)
    squeeze = load.ndim == 1
    load2 = load[None] if squeeze else load
    cur2 = None
    if current is not None:
        cur2 = jnp.asarray(current, _I32)
        cur2 = cur2[None] if squeeze else cur2
    out = _solve(load2, cur2, jnp.asarray(tolerance, _F32), num_slots=num_slots,
                 ep_size=ep_size, num_nodes=num_nodes, refine=True)
    return out[0] if squeeze else out


def greedy_placement(load, num_slots: int, ep_size: int) -> jax.Array:
    """Baseline: steps 2-3 only (replicate, then largest-first onto the least-loaded rank)."""
    load = jnp.asarray(load)
    _check(tuple(load.shape), num_slots, ep_size, 1, None, 0.0)
    squeeze = load.ndim == 1
    out = _solve(load[None] if squeeze else load, None, jnp.zeros((), _F32),
                 num_slots=num_slots, ep_size=ep_size, num_nodes=1, refine=False)
    return out[0] if squeeze else out


def rank_loads(load, slot_to_expert, ep_size: int) -> jax.Array:
    """float32 [..., ep]: each slot carries ``load[e] / count[e]`` of its expert ``e``."""
    load = jnp.asarray(load, _F32)
    s2e = jnp.asarray(slot_to_expert, _I32)
    one_hot = s2e[..., :, None] == jnp.arange(load.shape[-1], dtype=_I32)
    count = one_hot.sum(-2)
    per_replica = load / jnp.maximum(count, 1).astype(_F32)
    slot_load = jnp.take_along_axis(per_replica, s2e, axis=-1)
    return slot_load.reshape(*s2e.shape[:-1], ep_size, -1).sum(-1)


def imbalance(rank_load) -> jax.Array:
    """``(max - mean) / mean`` over the last axis (0 where the mean is 0)."""
    rank_load = jnp.asarray(rank_load, _F32)
    mean = rank_load.mean(-1)
    return jnp.where(mean > 0, (rank_load.max(-1) - mean) / jnp.where(mean > 0, mean, 1), 0.0)
