"""EPLB: expert-parallel load balancing, jit-compiled and vectorised over layers.

Given per-expert loads ``[L, E]`` it returns ``slot_to_expert: int32 [L, S]``; rank
``r`` of ``R = ep_size`` owns the contiguous slots ``[r*S/R, (r+1)*S/R)``. Layers are
solved independently (``vmap``); only sizes are static, so new loads or a new
current placement never recompile. With ``N = num_nodes`` nodes of ``G = R/N``
ranks and ``k = S/R`` slots per rank, per layer:

1. Nodes (only if ``N > 1``; DeepSeek's hierarchical EPLB). Experts, heaviest first
   (ties: lower id), each go to the least-loaded node (ties: lower) with fewer than
   ``E/N`` experts. An expert and all its replicas live on that node, so its tokens
   never cross nodes to reach a replica; each node gets ``S/N`` slots.
2. Replication, per node: one replica each, then each extra slot goes to the expert
   with the largest ``load / count`` (ties: lower id), at most ``G`` replicas (two
   replicas of one expert never share a rank). Closed form: the top ``S/N - E/N``
   of the values ``load_e / j`` (``j = 1..G-1``), by one ``top_k``.
3. Packing, per node: replicas, heaviest per-replica load first (ties: lower id),
   each to the least-loaded rank (ties: lower) with a free slot and no replica of
   that expert yet. A replica that finds none is set aside, and placed the same way
   after all others (in order). If it still finds none, a repair keeps the
   placement valid: the lightest rank ``u`` without the expert is full, so ``u``'s
   lightest replica (ties: lowest slot) that the lightest free rank ``f`` lacks
   moves to ``f``, and the expert takes its slot. Steps 2-3 are :func:`greedy_placement`.
4. Refinement: while it lowers the maximum, swap a replica of the most-loaded rank
   with one of another rank of its node (the pair minimising the larger new load;
   ties: lowest index). The maximum never rises: never worse than the greedy.
   A fresh placement (no ``current``) with ``N = 1`` is then compared with
   TensorRT-LLM's default placement (``config.default_placement``): if the default's
   maximum rank load is strictly lower, it is returned instead. Replica counts chosen
   for the load alone (step 2) can force two heavy experts onto one rank when ranks
   hold few slots (E=5, S=8, R=4: 78.25 against the default's 75), so a placement file
   is never worse than having none. Rank loads here are summed slot by slot, in order.
5. Migration (only with ``current``); ``cap = (1 + tolerance + 1e-6) *`` the maximum
   of step 4. Two starting points: (A) ranks are interchangeable for the load, so
   the packed rank contents ("bins") are matched to physical ranks greedily by the
   number of experts shared with ``current`` (ties: lowest bin, then rank; with
   ``N > 1`` nodes are matched first, then ranks inside them). (B) "Sticky": ranks
   keep their current experts (slot order, at most the new count of each, no
   duplicates, only experts of the rank's node as matched in A), the missing
   replicas are packed as in step 3 into the freed slots, then step 4 runs until
   the maximum is at most ``cap``. B is used if it is within ``cap`` and keeps more
   experts in place than A. Then, in rounds, swaps of two replicas between two
   ranks of one node that keep more experts in place with both ranks within
   ``cap``: each rank pair's best swap (ties: lowest slot pair), then pairs by gain
   (ties: lowest pair), each rank once per round, until a round finds none. Kept
   experts keep their slots; new ones fill the freed slots in bin order. If this
   changed more slots than the step-4 placement as is, that one is returned.

Float32 arithmetic and every tie-break are fixed, so the NumPy loops of
:mod:`wideep_jax.eplb.algorithm_reference` give identical output. Loads must be
finite, each layer's total within float32 range (refused otherwise outside jit);
under jit, negative and NaN loads count as zero, if any load is +inf those count as
1 and the others as 0, and a layer of huge loads is scaled by ``2**-64`` (exactly).
Then loads below ``2**-80`` count as zero (in both versions, jit or not), so no value
computed is a subnormal float, which XLA may flush to zero and NumPy does not.
"""
from __future__ import annotations

import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from wideep_jax.config import default_placement, placement_violation

__all__ = ["compute_placement", "greedy_placement", "imbalance", "rank_loads"]

_F32 = jnp.float32
_I32 = jnp.int32
_SLACK = 1e-6  # relative; absorbs float32 rounding of loads summed in another order
_MAX_TOTAL = float(np.finfo(np.float32).max) / 2  # a layer's loads sum to less: no float32 overflow
# Smallest load counted (smaller ones count as 0): a share load / count (count <= ranks per
# node, far below 2**23) is then >= 2**-103, and sums and differences of such shares are 0
# or >= 2**-126, the smallest normal float32; subnormals would differ between XLA and NumPy.
_MIN_LOAD = 2.0 ** -80


def _check(load_shape: tuple[int, ...], num_slots: int, ep_size: int, num_nodes: int,
           current_shape: tuple[int, ...] | None, tolerance: float) -> None:
    """Static argument checks; each error names the argument, its value and what is allowed."""
    if len(load_shape) not in (1, 2) or load_shape[-1] < 1:
        raise ValueError(f"load: got shape {load_shape}; allowed: [E] or [L, E] with E >= 1")
    num_experts = load_shape[-1]
    for name, value in (("num_slots", num_slots), ("ep_size", ep_size), ("num_nodes", num_nodes)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: got {value!r}; allowed: a positive int")
    bad = placement_violation(num_experts, num_slots, ep_size, num_nodes, computed=True)
    if bad:
        raise ValueError(f"{bad[0]}: got {bad[1]}; allowed: {bad[2]}")
    if current_shape is not None and current_shape != (*load_shape[:-1], num_slots):
        raise ValueError(f"current: got shape {current_shape}; allowed: "
                         f"{(*load_shape[:-1], num_slots)} (load's leading shape + [num_slots])")
    if isinstance(tolerance, numbers.Real) and not tolerance >= 0:  # a tracer is not checked
        raise ValueError(f"tolerance: got {tolerance!r}; allowed: a float >= 0")


def _first(mask: jax.Array) -> jax.Array:
    """First True index of ``mask`` (flat; 0 if none). A plain min-reduction: XLA runs
    it much faster than argmax's paired (value, index) reduction."""
    mask = mask.reshape(-1)
    first = jnp.min(jnp.where(mask, jnp.arange(mask.shape[0], dtype=_I32), mask.shape[0]))
    return jnp.where(first < mask.shape[0], first, 0)


def _masked_argmin(values: jax.Array, mask: jax.Array) -> jax.Array:
    values = jnp.where(mask, values, jnp.inf)
    return _first(values == jnp.min(values))


def _argmax(values: jax.Array) -> jax.Array:
    return _first(values == jnp.max(values))


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


def _pack(w, need, slots, load, rank_node, expert_node):
    """Step 3: fills free (-1) slots with ``need[e]`` replicas of ``e`` on ranks of its node."""
    num_ranks, per_rank = slots.shape
    order = jnp.argsort(-w, stable=True)
    ends = jnp.cumsum(need[order])  # replica i belongs to the first expert whose end > i
    replicas = order[jnp.minimum((ends[None, :] <= jnp.arange(slots.size)[:, None]).sum(1),
                                 w.shape[0] - 1)]
    rank_ids, cols = jnp.arange(num_ranks, dtype=_I32), jnp.arange(per_rank, dtype=_I32)
    iota = jnp.arange(slots.size, dtype=_I32)

    # Updates are one-hot selects, not scatters: the arrays are tiny, and under
    # vmap selects compile and run faster than batched scatters.
    def put(slots, at_rank, col, e):  # col: scalar or [R, 1]
        return jnp.where(at_rank[:, None] & (cols == col), e, slots)

    def fast(i, state):  # the common case; a stuck replica is set aside
        slots, load, aside, num_aside = state
        e = replicas[i]
        fits = (rank_node == expert_node[e]) & (slots < 0).any(1) & ~(slots == e).any(1)
        at = (i < ends[-1]) & fits.any() & (rank_ids == _masked_argmin(load, fits))
        slots = put(slots, at, jnp.min(jnp.where(slots < 0, cols, per_rank), 1, keepdims=True), e)
        stuck = (i < ends[-1]) & ~fits.any()
        aside = jnp.where(stuck & (iota == num_aside), e, aside)
        return slots, jnp.where(at, load + w[e], load), aside, num_aside + stuck

    def repair(state):  # set-aside replicas, in order, with the repair if still stuck
        slots, load, aside, num_aside, n = state
        e = aside[n]
        node_ok = rank_node == expert_node[e]
        holds = (slots == e).any(1)
        free = (slots < 0).any(1) & node_ok
        ok = (free & ~holds).any()
        b = _masked_argmin(load, free & ~holds)
        bf = _masked_argmin(load, free)
        bu = _masked_argmin(load, node_ok & ~holds)
        row_u, row_f = slots[bu], slots[bf]
        j = _masked_argmin(w[jnp.maximum(row_u, 0)], ~(row_u[:, None] == row_f[None, :]).any(1))
        x = row_u[j]
        wx = w[jnp.maximum(x, 0)]
        at_f = ~ok & (rank_ids == bf)
        slots = put(slots, at_f, _first(row_f < 0), x)
        load = jnp.where(at_f, load + wx, load)
        at_t = rank_ids == jnp.where(ok, b, bu)
        slots = put(slots, at_t, jnp.where(ok, _first(slots[b] < 0), j), e)
        load = jnp.where(at_t, jnp.where(ok, load + w[e], (load - wx) + w[e]), load)
        return slots, load, aside, num_aside, n + 1

    state = (slots, load, jnp.full(slots.size, -1, _I32), jnp.array(0, _I32))
    state = lax.fori_loop(0, slots.size, fast, state)
    state = lax.while_loop(lambda s: s[4] < s[3], repair, (*state, jnp.array(0, _I32)))
    return state[0], state[1]


def _refine(slots, load, w, rank_node, max_iter: int, target=None):
    """Step 4: swaps (inside a node) that lower the most-loaded rank, until ``max <= target``."""
    num_ranks, per_rank = slots.shape
    size = slots.size
    rank_of = jnp.arange(size, dtype=_I32) // per_rank
    ranks, cols = jnp.arange(num_ranks, dtype=_I32), jnp.arange(per_rank, dtype=_I32)

    def body(state):
        slots, load, _, it = state
        a = _argmax(load)
        row, x = slots[a], slots.reshape(-1)
        t_on_a = (x[:, None] == row[None, :]).any(1)  # [S]: slot t's expert already on a
        i_on = jnp.repeat((row[:, None, None] == slots[None]).any(2), per_rank, axis=1)  # [k, S]
        wi, wt = w[row], w[x]
        new_a = (load[a] - wi)[:, None] + wt[None, :]
        new_b = (load[rank_of] - wt)[None, :] + wi[:, None]
        worst = jnp.maximum(new_a, new_b)
        other = (rank_of != a) & (rank_node[rank_of] == rank_node[a])
        valid = other[None, :] & ~t_on_a[None, :] & ~i_on & (worst < load[a])
        idx = _masked_argmin(worst, valid)
        found = valid.reshape(-1)[idx]
        i, t = idx // size, idx % size
        b, j = rank_of[t], t % per_rank
        xi, xt = row[i], x[t]
        at_a, at_b = found & (ranks == a), found & (ranks == b)
        slots = jnp.where(at_a[:, None] & (cols == i)[None, :], xt, slots)
        slots = jnp.where(at_b[:, None] & (cols == j)[None, :], xi, slots)
        load = jnp.where(at_a, new_a[i, t], jnp.where(at_b, new_b[i, t], load))
        return slots, load, found, it + 1

    def cond(state):
        go = state[2] & (state[3] < max_iter)
        return go if target is None else go & (jnp.max(state[1]) > target)

    state = (slots, load, jnp.array(True), jnp.array(0, _I32))
    slots, load, _, _ = lax.while_loop(cond, body, state)
    return slots, load


def _greedy_match(score: jax.Array, allowed: jax.Array) -> jax.Array:
    """int32 [n]: bin -> rank, repeatedly taking the best remaining allowed pair."""
    n = score.shape[0]

    def body(_, state):
        s, perm = state
        idx = _argmax(s)
        b, r = idx // n, idx % n
        return s.at[b, :].set(-2).at[:, r].set(-2), perm.at[b].set(r.astype(_I32))

    init = (jnp.where(allowed, score, -1).astype(_I32), jnp.zeros(n, _I32))
    return lax.fori_loop(0, n, body, init)[1]


def _migration_swaps(bins, load, w, cur_has, cap, rank_node, max_rounds: int):
    """Step 5 swaps, in rounds of rank-disjoint swaps: more experts kept, every load <= cap."""
    num_ranks, per_rank = bins.shape
    ranks = jnp.arange(num_ranks, dtype=_I32)
    pair_ok = (rank_node[:, None] == rank_node[None, :]) & (ranks[:, None] < ranks[None, :])
    slot_pair = jnp.arange(per_rank * per_rank, dtype=_I32).reshape(per_rank, per_rank)

    def body(state):
        x, load, _, it = state
        flat = x.reshape(-1)
        was = cur_has[:, flat].reshape(num_ranks, num_ranks, per_rank)  # expert at (r2, j) was on r
        now = (x[:, :, None] == flat).any(1).reshape(was.shape)  # expert at (r2, j) is on r
        keep = cur_has[ranks[:, None], x].astype(_I32)
        # Pair axes [r1, r2, i, j]: swap x[r1, i] with x[r2, j]. Axis-1 swaps of the
        # [r, r2, j] tables give [r1, r2, i] = table[r2, r1, i]: x[r1, i] was/is on r2.
        gain = (was[:, :, None, :].astype(_I32) + was.transpose(1, 0, 2)[..., None].astype(_I32)
                - keep[:, None, :, None] - keep[None, :, None, :])
        blocked = now[:, :, None, :] | now.transpose(1, 0, 2)[..., None]
        wx = w[x]
        rest = load[:, None] - wx  # rank minus the slot's replica
        new1 = rest[:, None, :, None] + wx[None, :, None, :]
        new2 = rest[None, :, None, :] + wx[:, None, :, None]
        valid = (pair_ok[:, :, None, None] & ~blocked & (new1 <= cap) & (new2 <= cap) & (gain > 0))
        # One max-reduce instead of an argmax: code = gain * k^2 + (k^2 - 1 - (i*k + j)),
        # so the largest code is the largest gain, then the lowest slot pair.
        pairs = per_rank * per_rank
        code = jnp.where(valid, gain * pairs + (pairs - 1 - slot_pair), -1).max((2, 3))
        best = jnp.where(code >= 0, code // pairs, 0)
        arg = pairs - 1 - code % pairs

        def pick(n, st):
            best, sel = st
            idx = _argmax(best)
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
        l1, l2 = rest[c1, i] + wx[c2, j], rest[c2, j] + wx[c1, i]  # = new1, new2 there
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


def _sticky(cur, w, count, expert_node, rank_node, cap):
    """Candidate B of step 5: keep what ``cur`` may keep, pack the rest, refine to ``cap``."""
    num_ranks, per_rank = cur.shape
    flat, num_experts = cur.reshape(-1), w.shape[0]
    pos = jnp.arange(flat.shape[0])
    rank_of = pos // per_rank
    e = jnp.clip(flat, 0, num_experts - 1)
    same = (flat[:, None] == flat[None, :]) & (pos[None, :] < pos[:, None])  # [s, earlier s']
    dup = (same & (rank_of[:, None] == rank_of[None, :])).any(1)
    valid = (flat == e) & ~dup & (rank_node[rank_of] == expert_node[e])
    keep = valid & ((same & valid[None, :]).sum(1) < count[e])  # first count[e] copies stay
    need = count - (keep[:, None] & (e[:, None] == jnp.arange(num_experts))).sum(0)
    slot_w = jnp.where(keep, w[e], 0).reshape(num_ranks, per_rank)
    load = jnp.zeros(num_ranks, _F32)
    for j in range(per_rank):  # column by column: the reference adds in this order too
        load = load + slot_w[:, j]
    slots = jnp.where(keep, flat, -1).reshape(num_ranks, per_rank).astype(_I32)
    slots, load = _pack(w, need, slots, load, rank_node, expert_node)
    return _refine(slots, load, w, rank_node, flat.shape[0], target=cap)


def _migrate(bins, load, w, count, expert_node, cur, tolerance, num_nodes: int):
    """Step 5: bins [R, k] -> slots [R, k] placed to keep as much of ``cur`` as possible."""
    num_ranks, per_rank = bins.shape
    ranks = jnp.arange(num_ranks, dtype=_I32)
    experts = jnp.arange(w.shape[0], dtype=_I32)
    bin_has = (bins[:, :, None] == experts).any(1)
    cur_has = (cur[:, :, None] == experts).any(1)
    overlap = jnp.dot(bin_has.astype(_F32), cur_has.T.astype(_F32),
                      precision=lax.Precision.HIGHEST).astype(_I32)
    rank_node = ranks // (num_ranks // num_nodes)
    allowed = jnp.ones((num_ranks, num_ranks), bool)
    if num_nodes > 1:
        node_bins = bin_has.reshape(num_nodes, -1, w.shape[0]).sum(1)
        node_cur = cur_has.reshape(num_nodes, -1, w.shape[0]).sum(1)
        node_overlap = jnp.minimum(node_bins[:, None], node_cur[None, :]).sum(-1)
        node_perm = _greedy_match(node_overlap, jnp.ones((num_nodes, num_nodes), bool))
        allowed = rank_node[None, :] == node_perm[rank_node][:, None]
        expert_node = node_perm[expert_node]  # sticky candidate: experts follow their node
    perm = _greedy_match(overlap, allowed)
    holder = jnp.zeros(num_ranks, _I32).at[perm].set(ranks)
    cap = jnp.max(load) * (jnp.asarray(1, _F32) + tolerance + _SLACK)
    sticky, sticky_load = _sticky(cur, w, count, expert_node, rank_node, cap)

    def kept(slots):
        return cur_has[ranks[:, None], slots].sum()

    use = (jnp.max(sticky_load) <= cap) & (kept(sticky) > kept(bins[holder]))
    slots, _ = _migration_swaps(jnp.where(use, sticky, bins[holder]),
                                jnp.where(use, sticky_load, load[holder]), w, cur_has, cap,
                                rank_node, num_ranks * per_rank)
    slots = jax.vmap(_order_rank)(slots, cur)
    # Never more moves than the load-only placement as it is.
    return jnp.where((slots != cur).sum() <= (bins != cur).sum(), slots, bins)


def _solve_layer(load, current, tolerance, *, num_slots: int, ep_size: int, num_nodes: int,
                 refine: bool) -> jax.Array:
    num_experts = load.shape[0]
    ranks_per_node, per_rank = ep_size // num_nodes, num_slots // ep_size
    load = jnp.where(load > 0, load, 0).astype(_F32)  # also turns -0.0 and NaN into +0.0
    # Under jit (unchecked): +inf would break every comparison (experts without a slot),
    # so +inf loads dominate: they count as 1, the others as 0. A layer whose float32
    # sums could overflow is scaled by 2**-64: exact, so no comparison changes.
    inf = jnp.isinf(load)
    big = jnp.max(load) > _F32(_MAX_TOTAL / num_experts)
    load = jnp.where(inf.any(), inf.astype(_F32), jnp.where(big, load * _F32(2.0 ** -64), load))
    # XLA may flush subnormal floats to zero (on CPU it does), NumPy keeps them: loads
    # below _MIN_LOAD count as 0, so no load, replica share or sum here is subnormal.
    load = jnp.where(load >= _F32(_MIN_LOAD), load, 0)
    ids = (_partition_nodes(load, num_nodes) if num_nodes > 1
           else jnp.arange(num_experts, dtype=_I32)[None])  # [N, E/N] expert ids per node
    node_load = load[ids]
    replicate = partial(_replicate, num_slots=num_slots // num_nodes, cap=ranks_per_node)
    count = jax.vmap(replicate)(node_load)
    w = node_load / count.astype(_F32)
    one_node = jnp.zeros(ranks_per_node, _I32)
    empty = jnp.full((ranks_per_node, per_rank), -1, _I32)
    slots, rload = jax.vmap(lambda w_, c_: _pack(w_, c_, empty, jnp.zeros(ranks_per_node, _F32),
                                                 one_node, jnp.zeros_like(c_)))(w, count)
    if refine:
        slots, rload = jax.vmap(partial(_refine, rank_node=one_node,
                                        max_iter=num_slots // num_nodes))(slots, rload, w)
    bins = jax.vmap(lambda i, s: i[s])(ids, slots).reshape(ep_size, per_rank)
    if current is None:
        if not refine or num_nodes > 1:  # the default may split replicas across nodes
            return bins.reshape(-1)
        default = jnp.asarray(default_placement(num_slots, num_experts, ep_size))
        better = _max_rank_load(load, default, ep_size) < _max_rank_load(load, bins.reshape(-1), ep_size)
        return jnp.where(better, default, bins.reshape(-1))

    def by_expert(v):  # [N, E/N] per node -> [E] per expert id
        return jnp.zeros(num_experts, v.dtype).at[ids.reshape(-1)].set(v.reshape(-1))

    expert_node = by_expert(jnp.broadcast_to(jnp.arange(num_nodes, dtype=_I32)[:, None], ids.shape))
    cur = current.astype(_I32).reshape(ep_size, per_rank)
    return _migrate(bins, rload.reshape(-1), by_expert(w), by_expert(count), expert_node, cur,
                    tolerance, num_nodes).reshape(-1)


def _max_rank_load(load: jax.Array, s2e: jax.Array, ep_size: int) -> jax.Array:
    """The largest rank load of placement ``s2e`` [S], each slot carrying ``load / count``
    of its expert, summed slot by slot in order (as the NumPy reference does)."""
    count = jnp.zeros(load.shape, _I32).at[s2e].add(1)
    per_slot = (load / jnp.maximum(count, 1).astype(_F32))[s2e].reshape(ep_size, -1)
    total = per_slot[:, 0]
    for j in range(1, per_slot.shape[1]):
        total = total + per_slot[:, j]
    return jnp.max(total)


@partial(jax.jit, static_argnames=("num_slots", "ep_size", "num_nodes", "refine"))
def _solve(load, current, tolerance, *, num_slots, ep_size, num_nodes, refine):
    fn = partial(_solve_layer, num_slots=num_slots, ep_size=ep_size, num_nodes=num_nodes,
                 refine=refine)
    if current is None:
        return jax.vmap(lambda l: fn(l, None, tolerance))(load)
    return jax.vmap(fn, in_axes=(0, 0, None))(load, current, tolerance)


def _run(load, current, tolerance, num_slots: int, ep_size: int, num_nodes: int,
         refine: bool) -> jax.Array:
    if not isinstance(load, jax.core.Tracer):
        # Inf or NaN loads give invalid placements (duplicates, experts without a slot);
        # under jit the loads are counts (finite) and cannot be checked here.
        values = np.asarray(load, np.float64)
        if values.size and (not np.isfinite(values).all() or (values < 0).any()):
            raise ValueError(f"load: got values in [{np.nanmin(values)}, {np.nanmax(values)}]"
                             f"{' with NaN' if np.isnan(values).any() else ''}; allowed: finite and >= 0")
        # Rank and node loads are float32 sums of a layer's loads: a sum that overflows
        # to inf breaks every comparison (experts without a slot, duplicates on a rank).
        if values.ndim in (1, 2) and values.size and values.sum(-1).max() > _MAX_TOTAL:
            raise ValueError(f"load: got a layer total of {values.sum(-1).max():.4g}; allowed: at most "
                             f"{_MAX_TOTAL:.4g} (loads are summed in float32)")
        # int64 counts above 2**31 would wrap to negative int32 in jnp.asarray (x64 off).
        if not isinstance(load, jax.Array) and np.asarray(load).dtype.kind in "iu":
            load = np.asarray(load, np.float32)
    load = jnp.asarray(load)
    current_shape = None if current is None else tuple(jnp.shape(current))
    _check(tuple(load.shape), num_slots, ep_size, num_nodes, current_shape, tolerance)
    num_slots, ep_size, num_nodes = int(num_slots), int(ep_size), int(num_nodes)
    squeeze = load.ndim == 1
    if current is not None:
        current = jnp.asarray(current, _I32).reshape(-1, num_slots)
    out = _solve(load.reshape(-1, load.shape[-1]), current, jnp.asarray(tolerance, _F32),
                 num_slots=num_slots, ep_size=ep_size, num_nodes=num_nodes, refine=refine)
    return out[0] if squeeze else out


def compute_placement(load, num_slots: int, ep_size: int, *, num_nodes: int = 1, current=None,
                      tolerance: float = 0.0) -> jax.Array:
    """Balanced placement ``int32 [L, num_slots]`` (``[num_slots]`` for a 1-D ``load``).

    Args:
      load: float [L, E] or [E], non-negative load per expert (e.g. token counts).
      num_slots: total slots S over the EP group (``E <= S <= E * ep_size / num_nodes``).
      ep_size: ranks R; rank r owns slots ``[r*S/R, (r+1)*S/R)``.
      num_nodes: nodes (``N`` divides ``R`` and ``E``); > 1 keeps each expert's
        replicas inside one node.
      current: int [L, S] (or [S]) current placement; if given, the result moves
        as few slots as it can (see the module docstring, step 5).
      tolerance: relative slack on the maximum rank load that step 5 may spend
        to keep experts in place (used only with ``current``).
    """
    return _run(load, current, tolerance, num_slots, ep_size, num_nodes, True)


def greedy_placement(load, num_slots: int, ep_size: int) -> jax.Array:
    """Baseline: steps 2-3 only (replicate, then largest-first onto the least-loaded rank)."""
    return _run(load, None, 0.0, num_slots, ep_size, 1, False)


def rank_loads(load, slot_to_expert, ep_size: int) -> jax.Array:
    """float32 [..., ep]: each slot carries ``load[e] / count[e]`` of its expert ``e``; a slot
    whose entry is outside ``[0, E)`` holds no expert (as in ``placement``) and carries 0."""
    load = jnp.asarray(load, _F32)
    s2e = jnp.asarray(slot_to_expert, _I32)
    num_experts = load.shape[-1]
    one_hot = s2e[..., :, None] == jnp.arange(num_experts, dtype=_I32)
    count = one_hot.sum(-2)
    per_replica = load / jnp.maximum(count, 1).astype(_F32)
    held = (s2e >= 0) & (s2e < num_experts)
    slot_load = jnp.where(held, jnp.take_along_axis(per_replica, jnp.clip(s2e, 0, num_experts - 1), axis=-1), 0)
    return slot_load.reshape(*s2e.shape[:-1], ep_size, -1).sum(-1)


def imbalance(rank_load) -> jax.Array:
    """``(max - mean) / mean`` over the last axis (0 where the mean is 0)."""
    rank_load = jnp.asarray(rank_load, _F32)
    mean = rank_load.mean(-1)
    return jnp.where(mean > 0, (rank_load.max(-1) - mean) / jnp.where(mean > 0, mean, 1), 0.0)
