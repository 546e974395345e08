"""Plain NumPy reference of :mod:`wideep_jax.eplb.algorithm` (loops, one layer at a time).

Same steps, same float32 arithmetic in the same order and same tie-breaks as the
JAX version, so the two give identical placements; the tests compare them exactly.
Replication here is the literal greedy loop (the JAX version uses its closed form).
"""
from __future__ import annotations

import numpy as np

from wideep_jax.config import default_placement

__all__ = ["compute_placement", "greedy_placement"]

_F32 = np.float32
_MAX_TOTAL = float(np.finfo(np.float32).max) / 2
_MIN_LOAD = 2.0 ** -80  # smaller loads count as 0: see algorithm._MIN_LOAD


def _argmin(values: np.ndarray, mask: np.ndarray) -> int:
    return int(np.argmin(np.where(mask, values, np.inf)))


def _partition_nodes(load: np.ndarray, num_nodes: int) -> np.ndarray:
    per_node = len(load) // num_nodes
    node_load = np.zeros(num_nodes, _F32)
    node_count = np.zeros(num_nodes, int)
    node_of = np.zeros(len(load), int)
    for e in np.argsort(-load, kind="stable"):
        n = _argmin(node_load, node_count < per_node)
        node_of[e] = n
        node_count[n] += 1
        node_load[n] = node_load[n] + load[e]
    return np.argsort(node_of, kind="stable").reshape(num_nodes, per_node)


def _replicate(load: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    count = np.ones(len(load), np.int32)
    for _ in range(num_slots - len(load)):
        per_replica = np.where(count < cap, load / count.astype(_F32), -np.inf)
        count[int(np.argmax(per_replica))] += 1
    return count


def _pack(w, need, slots, load, rank_node, expert_node):
    slots, load = slots.copy(), load.copy()
    order = np.argsort(-w, kind="stable")
    aside = []
    for e in np.repeat(order, need[order]):
        fits = (rank_node == expert_node[e]) & (slots < 0).any(1) & ~(slots == e).any(1)
        if not fits.any():
            aside.append(e)
            continue
        b = _argmin(load, fits)
        slots[b, np.argmax(slots[b] < 0)] = e
        load[b] = load[b] + w[e]
    for e in aside:
        node_ok = rank_node == expert_node[e]
        holds = (slots == e).any(1)
        free = (slots < 0).any(1) & node_ok
        if (free & ~holds).any():
            b = _argmin(load, free & ~holds)
            slots[b, np.argmax(slots[b] < 0)] = e
            load[b] = load[b] + w[e]
            continue
        # Repair: every rank of the node with a free slot holds e already.
        bf, bu = _argmin(load, free), _argmin(load, node_ok & ~holds)
        j = _argmin(w[slots[bu]], ~np.isin(slots[bu], slots[bf]))
        x = slots[bu, j]
        slots[bf, np.argmax(slots[bf] < 0)] = x
        load[bf] = load[bf] + w[x]
        slots[bu, j] = e
        load[bu] = (load[bu] - w[x]) + w[e]
    return slots, load


def _refine(slots, load, w, rank_node, max_iter: int, target=None):
    num_ranks, per_rank = slots.shape
    for _ in range(max_iter):
        if target is not None and load.max() <= target:
            break
        a = int(np.argmax(load))
        best = None
        for i in range(per_rank):
            xi = slots[a, i]
            for t in range(num_ranks * per_rank):
                b, j = divmod(t, per_rank)
                xt = slots[b, j]
                if b == a or rank_node[b] != rank_node[a] or xt in slots[a] or xi in slots[b]:
                    continue
                new_a = (load[a] - w[xi]) + w[xt]
                new_b = (load[b] - w[xt]) + w[xi]
                worst = max(new_a, new_b)
                if worst < load[a] and (best is None or worst < best[0]):
                    best = (worst, i, b, j, new_a, new_b)
        if best is None:
            break
        _, i, b, j, new_a, new_b = best
        slots[a, i], slots[b, j] = slots[b, j], slots[a, i]
        load[a], load[b] = new_a, new_b
    return slots, load


def _greedy_match(score: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    n = len(score)
    s = np.where(allowed, score, -1).astype(np.int64)
    perm = np.zeros(n, int)
    for _ in range(n):
        b, r = divmod(int(np.argmax(s)), n)
        perm[b] = r
        s[b, :] = -2
        s[:, r] = -2
    return perm


def _migration_swaps(bins, load, w, cur_has, cap, rank_node, max_rounds: int):
    num_ranks, per_rank = bins.shape
    x = bins.copy()
    for _ in range(max_rounds):
        best = np.zeros((num_ranks, num_ranks), int)
        arg = {}
        for r1 in range(num_ranks):
            for r2 in range(r1 + 1, num_ranks):
                if rank_node[r1] != rank_node[r2]:
                    continue
                for i in range(per_rank):
                    for j in range(per_rank):
                        e1, e2 = x[r1, i], x[r2, j]
                        if e2 in x[r1] or e1 in x[r2]:
                            continue
                        gain = (int(cur_has[r1, e2]) + int(cur_has[r2, e1])
                                - int(cur_has[r1, e1]) - int(cur_has[r2, e2]))
                        new1 = (load[r1] - w[e1]) + w[e2]
                        new2 = (load[r2] - w[e2]) + w[e1]
                        if gain > best[r1, r2] and new1 <= cap and new2 <= cap:
                            best[r1, r2] = gain
                            arg[r1, r2] = (i, j, new1, new2)
        swaps = []
        for _ in range(num_ranks // 2):
            r1, r2 = divmod(int(np.argmax(best)), num_ranks)
            if best[r1, r2] <= 0:
                break
            swaps.append((r1, r2, *arg[r1, r2]))
            best[[r1, r2], :] = 0
            best[:, [r1, r2]] = 0
        if not swaps:
            break
        for r1, r2, i, j, new1, new2 in swaps:
            x[r1, i], x[r2, j] = x[r2, j], x[r1, i]
            load[r1], load[r2] = new1, new2
    return x


def _order_rank(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    out = np.full(len(c), -1, np.int64)
    for j, e in enumerate(c):
        if e in b and e not in out:
            out[j] = e
    out[out == -1] = [e for e in b if e not in c]
    return out


def _sticky(cur, w, count, expert_node, rank_node, cap):
    num_ranks, per_rank = cur.shape
    slots = np.full((num_ranks, per_rank), -1, np.int64)
    need = count.astype(np.int64).copy()
    for r in range(num_ranks):
        for j, e in enumerate(cur[r]):
            if (0 <= e < len(w) and e not in slots[r] and rank_node[r] == expert_node[e]
                    and need[e] > 0):
                slots[r, j] = e
                need[e] -= 1
    load = np.zeros(num_ranks, _F32)
    for j in range(per_rank):
        load = load + np.where(slots[:, j] >= 0, w[np.maximum(slots[:, j], 0)], _F32(0))
    slots, load = _pack(w, need, slots, load, rank_node, expert_node)
    return _refine(slots, load, w, rank_node, num_ranks * per_rank, target=cap)


def _migrate(bins, load, w, count, expert_node, cur, tolerance, num_nodes: int) -> np.ndarray:
    num_ranks, per_rank = bins.shape
    num_experts = len(w)
    bin_has = np.zeros((num_ranks, num_experts), bool)
    cur_has = np.zeros((num_ranks, num_experts), bool)
    for rank in range(num_ranks):
        bin_has[rank, bins[rank]] = True
        cur_has[rank, [e for e in cur[rank] if 0 <= e < num_experts]] = True
    overlap = bin_has.astype(int) @ cur_has.T.astype(int)
    rank_node = np.arange(num_ranks) // (num_ranks // num_nodes)
    allowed = np.ones((num_ranks, num_ranks), bool)
    if num_nodes > 1:
        node_bins = bin_has.reshape(num_nodes, -1, num_experts).sum(1)
        node_cur = cur_has.reshape(num_nodes, -1, num_experts).sum(1)
        node_overlap = np.minimum(node_bins[:, None], node_cur[None, :]).sum(-1)
        node_perm = _greedy_match(node_overlap, np.ones((num_nodes, num_nodes), bool))
        allowed = rank_node[None, :] == node_perm[rank_node][:, None]
        expert_node = node_perm[expert_node]
    holder = np.argsort(_greedy_match(overlap, allowed))
    cap = _F32(load.max()) * (_F32(1) + _F32(tolerance) + _F32(1e-6))
    sticky, sticky_load = _sticky(cur, w, count, expert_node, rank_node, cap)

    def kept(slots):
        return sum(cur_has[r, e] for r in range(num_ranks) for e in slots[r])

    if sticky_load.max() <= cap and kept(sticky) > kept(bins[holder]):
        start, start_load = sticky, sticky_load
    else:
        start, start_load = bins[holder], load[holder]
    slots = _migration_swaps(start, start_load.copy(), w, cur_has, cap, rank_node,
                             num_ranks * per_rank)
    slots = np.stack([_order_rank(slots[rank], cur[rank]) for rank in range(num_ranks)])
    return slots if (slots != cur).sum() <= (bins != cur).sum() else bins


def _solve_layer(load, current, tolerance, num_slots, ep_size, num_nodes, refine) -> np.ndarray:
    num_experts = len(load)
    ranks_per_node, per_rank = ep_size // num_nodes, num_slots // ep_size
    load = np.where(load > 0, load, 0).astype(_F32)
    if np.isinf(load).any():  # +inf dominates: those count as 1, the others as 0
        load = np.isinf(load).astype(_F32)
    elif load.max() > _F32(_MAX_TOTAL / num_experts):  # float32 sums could overflow
        load = load * _F32(2.0 ** -64)
    load = np.where(load >= _F32(_MIN_LOAD), load, _F32(0))  # no subnormals, as under XLA
    if num_nodes > 1:
        ids = _partition_nodes(load, num_nodes)
    else:
        ids = np.arange(num_experts)[None]
    bins, rank_load = [], []
    w_global = np.zeros(num_experts, _F32)
    count_global = np.zeros(num_experts, np.int64)
    expert_node = np.zeros(num_experts, np.int64)
    one_node = np.zeros(ranks_per_node, np.int64)
    for n, node_ids in enumerate(ids):
        node_load = load[node_ids]
        count = _replicate(node_load, num_slots // num_nodes, ranks_per_node)
        w = node_load / count.astype(_F32)
        slots, rl = _pack(w, count, np.full((ranks_per_node, per_rank), -1, np.int64),
                          np.zeros(ranks_per_node, _F32), one_node, np.zeros(len(w), np.int64))
        if refine:
            slots, rl = _refine(slots, rl, w, one_node, num_slots // num_nodes)
        bins.append(node_ids[slots])
        rank_load.append(rl)
        w_global[node_ids], count_global[node_ids], expert_node[node_ids] = w, count, n
    bins = np.concatenate(bins)
    if current is None:
        if refine and num_nodes == 1:  # step 4's last part: the default placement, if strictly better
            default = default_placement(num_slots, num_experts, ep_size).reshape(ep_size, per_rank)
            if _max_rank_load(load, default) < _max_rank_load(load, bins):
                return default.reshape(-1).astype(np.int32)
        return bins.reshape(-1).astype(np.int32)
    cur = np.asarray(current, np.int64).reshape(ep_size, per_rank)
    out = _migrate(bins, np.concatenate(rank_load), w_global, count_global, expert_node, cur,
                   tolerance, num_nodes)
    return out.reshape(-1).astype(np.int32)


def _max_rank_load(load: np.ndarray, slots: np.ndarray) -> np.float32:
    """Largest rank load of ``slots`` [R, k], each slot carrying ``load / count`` of its expert,
    summed slot by slot in order (float32)."""
    count = np.bincount(slots.reshape(-1), minlength=len(load))
    per = load / np.maximum(count, 1).astype(_F32)
    total = per[slots[:, 0]]
    for j in range(1, slots.shape[1]):
        total = (total + per[slots[:, j]]).astype(_F32)
    return total.max()


def compute_placement(load, num_slots: int, ep_size: int, *, num_nodes: int = 1, current=None,
                      tolerance: float = 0.0) -> np.ndarray:
    """NumPy twin of :func:`wideep_jax.eplb.algorithm.compute_placement` (no argument checks)."""
    load = np.asarray(load, _F32)
    squeeze = load.ndim == 1
    load2 = load[None] if squeeze else load
    cur2 = None if current is None else np.asarray(current).reshape(load2.shape[0], num_slots)
    out = np.stack([
        _solve_layer(load2[i], None if cur2 is None else cur2[i], tolerance, num_slots, ep_size,
                     num_nodes, True) for i in range(load2.shape[0])])
    return out[0] if squeeze else out


def greedy_placement(load, num_slots: int, ep_size: int) -> np.ndarray:
    """NumPy twin of :func:`wideep_jax.eplb.algorithm.greedy_placement`."""
    load = np.asarray(load, _F32)
    squeeze = load.ndim == 1
    load2 = load[None] if squeeze else load
    out = np.stack([_solve_layer(row, None, 0.0, num_slots, ep_size, 1, False) for row in load2])
    return out[0] if squeeze else out
